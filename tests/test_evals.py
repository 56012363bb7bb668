"""The evaluation registry: each evaluation gets its own eval.<name>_* keys and is on only when
its builder says so; the loop runs the ones due and logs their metrics."""
from __future__ import annotations

import pytest

import evals
from engine.config_check import check_config, section_keys
from engine.errors import HarnessError
from engine.run import run
from evals import EVALS, build_evals, eval_schema, register_eval
from train_helpers import compose_cfg, read_metrics, tiny_overrides


class Counting:
    """An evaluation due every `interval` steps that reports how often it ran."""

    def __init__(self, interval: int):
        self.interval, self.calls = interval, 0

    def due(self, step: int, max_steps: int) -> bool:
        return step % self.interval == 0 or step == max_steps

    def __call__(self, model, device, autocast=None, rank=0, world_size=1) -> dict[str, float]:
        self.calls += 1
        return {"eval/counting_calls": float(self.calls)}


def test_builders_get_their_own_keys_and_none_means_off(monkeypatch):
    seen = {}

    def builder(options, tokenizer, *, rank=0, world_size=1):
        seen.update(options=options, tokenizer=tokenizer, rank=rank, world_size=world_size)
        return Counting(options["interval"]) if options["interval"] else None

    monkeypatch.setitem(EVALS, "counting", builder)
    cfg = {"counting_interval": 3, "counting_limit": 7, "hellaswag_interval": 0}
    built = build_evals(cfg, "byte", rank=1, world_size=2)
    assert [type(e) for e in built] == [Counting]  # hellaswag is registered but off
    assert seen == {"options": {"interval": 3, "limit": 7}, "tokenizer": "byte", "rank": 1,
                    "world_size": 2}
    assert build_evals({**cfg, "counting_interval": 0}, "byte") == []


def test_hellaswag_is_discovered_and_registered():
    build_evals({}, "byte")
    assert "hellaswag" in EVALS and EVALS["hellaswag"].__module__ == "evals.hellaswag"
    assert evals.hellaswag.from_config({"interval": 0}, "byte") is None


def test_each_evaluation_declares_the_specs_of_its_keys():
    assert set(eval_schema()) == section_keys()["eval"]
    with pytest.raises(TypeError):
        register_eval("unchecked")  # registering without a schema is an error
    with pytest.raises(HarnessError, match=r"^eval\.hellaswag_batch_size=0 must be an integer >= 1"):
        check_config(compose_cfg(["eval.hellaswag_batch_size=0"]))


def test_the_loop_runs_due_evaluations_and_logs_them(tiny_data, tmp_path, monkeypatch):
    counting = Counting(15)
    monkeypatch.setitem(EVALS, "counting", lambda options, tokenizer, **kw: counting)
    run(compose_cfg(tiny_overrides(tiny_data, "adamw")), tmp_path)
    rows = [r for r in read_metrics(tmp_path) if "eval/counting_calls" in r]
    assert [r["step"] for r in rows] == [0, 15, 30]  # at the start, when due, at the end
    assert [r["eval/counting_calls"] for r in rows] == [1.0, 2.0, 3.0]
