"""The config files are the one declaration of the keys the engine reads: every declared key is
read (each optimizer builds from its yaml alone), and a key nothing declares (a typo) is refused
before a run starts. The values' types and ranges: tests/test_config_types.py."""
from __future__ import annotations

import pytest
import torch
import yaml

from engine.config_check import check_config
from engine.errors import HarnessError
from engine.optimizers import build_optimizer, declared_keys, entries, optimizer_defaults
from engine.run import run
from model import GPT, GPTConfig
from train_helpers import REPO, compose_cfg, tiny_overrides


def test_every_optimizer_file_names_a_registered_optimizer():
    for path in (REPO / "configs" / "optimizer").glob("*.yaml"):
        # a file named after its optimizer declares it; others (adamw-nanogpt) are variants of one
        name = yaml.safe_load(path.read_text())["name"]
        assert name in entries(), path.name
        if path.stem != name:
            assert set(yaml.safe_load(path.read_text())) == declared_keys(name), path.name


@pytest.mark.parametrize("name", sorted(entries()))
def test_each_optimizer_builds_from_its_yaml_alone(name):
    """A key the builder reads but the yaml lacks would be a KeyError here."""
    model = GPT(GPTConfig.from_preset("gpt2-nano", vocab_size=64))
    cfg = optimizer_defaults(name)
    assert set(cfg) == declared_keys(name)
    setup = build_optimizer(cfg, model)
    n_opt = sum(p.numel() for g in setup.optimizer.param_groups for p in g["params"])
    assert n_opt == sum(p.numel() for p in model.parameters())
    assert setup.name == name and (setup.k > 0) == (setup.hessian_estimator is not None)


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
    (["+data.text_colum=body"], "did you mean data.text_column"),
    (["+eval.hellaswag_intervall=5"], "did you mean eval.hellaswag_interval"),
])
def test_unknown_keys_in_any_section_are_refused(extra, message, tiny_data):
    with pytest.raises(HarnessError, match=message.replace(".", r"\.")):
        check_config(compose_cfg(tiny_overrides(tiny_data, "adamw") + extra))


@pytest.mark.parametrize("name", sorted(entries()))
def test_every_declared_optimizer_key_is_accepted(name, tiny_data):
    check_config(compose_cfg(tiny_overrides(tiny_data, name)))


def test_every_shipped_experiment_passes_the_check():
    for path in (REPO / "configs" / "experiment").glob("*.yaml"):
        if not path.stem.endswith("_base"):
            check_config(compose_cfg([f"experiment={path.stem}"]))


def test_an_unset_mandatory_value_names_the_key_and_the_fix():
    with pytest.raises(HarnessError, match=r"data\.source is not set.*data\.source=PATH"):
        check_config(compose_cfg(["data=local"]))


def test_an_unknown_optimizer_lists_the_registered_ones():
    with pytest.raises(HarnessError, match=r"optimizer\.name='sofia' is unknown; choose one of "
                                           + ", ".join(sorted(entries()))):
        build_optimizer({"name": "sofia"}, torch.nn.Linear(2, 2))


@pytest.mark.parametrize("fused, path", [(None, "fused"), (True, "fused"), (False, "foreach")])
def test_adamw_takes_torchs_fused_kernel_on_cpu_unless_told_otherwise(fused, path):
    """The seconds axis compares optimizers at their fastest correct path: AdamW's is fused on the
    CPU too, as Sophia's and Lion's are."""
    model = GPT(GPTConfig.from_preset("gpt2-nano", vocab_size=64))
    opt = build_optimizer({**optimizer_defaults("adamw"), "fused": fused}, model).optimizer
    assert (opt.defaults["fused"] is True, opt.defaults["foreach"] is True) == (
        path == "fused", path == "foreach")
