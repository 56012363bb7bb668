"""engine/run_dir.py: reading a run directory back, and its one rule for bad metrics lines."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import yaml

from engine.run_dir import (RunDirError, RunDirWarning, read_config, read_metrics, read_overrides,
                            read_summary)


def lines(*rows: dict) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def read_quietly(path: Path) -> list[dict]:
    """read_metrics, failing the test on any warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return read_metrics(path)


def test_a_torn_last_line_is_skipped_silently(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(lines({"step": 0, "val/loss": 5.0}, {"step": 10}) + '{"step": 20, "train/lo')
    assert [r["step"] for r in read_quietly(path)] == [0, 10]


def test_a_complete_last_line_without_newline_is_kept(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(lines({"step": 0}) + '{"step": 10}')
    assert [r["step"] for r in read_quietly(path)] == [0, 10]


def test_any_other_bad_line_is_skipped_with_one_warning_naming_file_and_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 0}\n\x00\xff garbage\n{"step": 10}\n[1, 2]\n{"step": "x"}\n'
                     b'{"step": 20}\nnot json either\n')
    with pytest.warns(RunDirWarning) as caught:
        rows = read_metrics(path)
    assert [r["step"] for r in rows] == [0, 10, 20]
    assert len(caught) == 1
    message = str(caught[0].message)
    assert str(path) in message and "lines 2, 4, 5, 7" in message
    # a bad last line that ends with its newline was written whole: damage, not a torn write
    path.write_text(lines({"step": 0}) + "oops\n")
    with pytest.warns(RunDirWarning, match=r"line 2\b"):
        assert [r["step"] for r in read_metrics(path)] == [0]


def test_blank_lines_are_not_damage(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n" + lines({"step": 0}) + "  \n")
    assert [r["step"] for r in read_quietly(path)] == [0]


def test_rows_of_a_rolled_back_branch_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(lines({"step": 10}, {"step": 20, "a": 1}, {"step": 30, "a": 2},
                          {"step": 20, "a": 3}, {"step": 30, "a": 4}))
    assert [(r["step"], r.get("a")) for r in read_quietly(path)] == [(10, None), (20, 3), (30, 4)]


def test_wandb_history_step_is_read_as_step(tmp_path):
    path = tmp_path / "wandb-history.jsonl"
    path.write_text(lines({"_step": 0, "val/loss": 5.0}, {"_step": 5, "val/loss": 4.0}))
    assert [r["step"] for r in read_quietly(path)] == [0, 5]


def test_a_missing_file_has_no_rows_and_an_unreadable_one_is_an_error(tmp_path):
    assert read_quietly(tmp_path / "absent.jsonl") == []
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(RunDirError, match="dir.jsonl cannot be read"):
        read_metrics(tmp_path / "dir.jsonl")


def test_config_overrides_and_summary(tmp_path):
    assert read_config(tmp_path) is None and read_overrides(tmp_path) is None
    assert read_summary(tmp_path) is None
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"seed": 1}))
    assert read_config(tmp_path) == {"seed": 1}  # Hydra's copy until the engine writes its own
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"seed": 2}))
    assert read_config(tmp_path) == {"seed": 2}
    (tmp_path / "config.yaml").write_text("seed: [unclosed\n")
    assert read_config(tmp_path) == {"seed": 1}
    (tmp_path / ".hydra" / "overrides.yaml").write_text("- optimizer=sophia\n- seed=3\n")
    assert read_overrides(tmp_path) == ["optimizer=sophia", "seed=3"]
    (tmp_path / ".hydra" / "overrides.yaml").write_text("optimizer: sophia\n")
    assert read_overrides(tmp_path) is None  # not a list: not Hydra's file
    (tmp_path / "summary.json").write_text(json.dumps({"step": 4, "val_loss": None}))
    assert read_summary(tmp_path) == {"step": 4, "val_loss": None}
    (tmp_path / "summary.json").write_text('{"step": 4')
    assert read_summary(tmp_path) is None
