"""The config files and the keys the engine reads stay one set: no knob is declared but ignored,
and a key nothing reads (a typo) is refused before a run starts."""
from __future__ import annotations

import pytest
import yaml

from engine.config_check import SECTION_KEYS, check_config
from engine.errors import HarnessError
from engine.optimizers import OPTIMIZER_KEYS
from engine.run import run
from train_helpers import REPO, compose_cfg, tiny_overrides


def _keys(path) -> set[str]:
    return {k for k in yaml.safe_load(path.read_text()) if k != "defaults"}


@pytest.mark.parametrize("name", sorted(OPTIMIZER_KEYS))
def test_each_optimizer_file_declares_exactly_the_keys_the_builder_reads(name):
    assert _keys(REPO / "configs" / "optimizer" / f"{name}.yaml") == OPTIMIZER_KEYS[name]


def test_root_config_declares_exactly_the_engine_sections():
    root = yaml.safe_load((REPO / "configs" / "config.yaml").read_text())
    assert set(root) - {"defaults", "hydra"} == SECTION_KEYS[""] - {"model", "optimizer", "data"}
    for section in ("train", "checkpoint", "wandb"):
        assert set(root[section]) == SECTION_KEYS[section], section


@pytest.mark.parametrize("group", ["data", "model"])
def test_group_files_use_only_known_keys(group):
    for path in (REPO / "configs" / group).glob("*.yaml"):
        assert _keys(path) <= SECTION_KEYS[group], path.name


def test_a_typo_added_with_plus_is_refused_with_a_suggestion(tiny_data, tmp_path):
    cfg = compose_cfg(tiny_overrides(tiny_data, "sophia") + ["+optimizer.rhoo=0.1"])
    with pytest.raises(HarnessError, match=r"optimizer\.rhoo=0\.1 \(did you mean optimizer\.rho\?\)"):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("extra,message", [
    (["+train.max_step=5"], "did you mean train.max_steps"),
    (["+optimizer.rho=0.1"], "Keys of optimizer=adamw"),  # a Sophia knob on AdamW does nothing
    (["+seeed=1"], "did you mean seed"),
    (["+model.n_layers=2"], "did you mean model.n_layer"),
])
def test_unknown_keys_in_any_section_are_refused(extra, message, tiny_data):
    with pytest.raises(HarnessError, match=message.replace(".", r"\.")):
        check_config(compose_cfg(tiny_overrides(tiny_data, "adamw") + extra))


def test_every_shipped_experiment_passes_the_check():
    for path in (REPO / "configs" / "experiment").glob("*.yaml"):
        if not path.stem.endswith("_base"):
            check_config(compose_cfg([f"experiment={path.stem}"]))


def test_an_unset_mandatory_value_names_the_key_and_the_fix():
    with pytest.raises(HarnessError, match=r"data\.source is not set.*data\.source=PATH"):
        check_config(compose_cfg(["data=local"]))
