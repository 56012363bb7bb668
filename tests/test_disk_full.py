"""A full disk at a checkpoint: one error line with the size needed and the directory, the
partial file removed, the older checkpoints kept, summary.json saying so, a non-zero exit, and a
run that resumes once there is room."""
from __future__ import annotations

import errno
import json
import subprocess

import pytest
import torch

from engine.checkpoint import list_checkpoints, load_checkpoint
from engine.errors import HarnessError
from engine.run import run
from train_helpers import compose_cfg, read_metrics, run_train_cli, tiny_overrides


def _summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def test_no_room_for_a_checkpoint_fails_in_one_line_and_the_run_resumes(tiny_data, tmp_path,
                                                                        monkeypatch,
                                                                        one_torch_thread):
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == 20:  # the disk fills up mid-write
            f.write(b"\0" * 4096)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    cfg = compose_cfg(tiny_overrides(tiny_data, "adamw", **{"model.dropout": 0.1}))
    run_dir = tmp_path / "run"
    with pytest.raises(HarnessError) as failed:
        run(cfg, run_dir)
    message = str(failed.value)
    assert "\n" not in message
    assert message.startswith("disk full: checkpoint ckpt_0000020.pt needs about ")
    assert f" MiB in {run_dir / 'checkpoints'}, " in message
    assert message.endswith("then rerun the same command to resume from ckpt_0000010.pt.")
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["ckpt_0000010.pt"]
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))
    summary = _summary(run_dir)
    assert summary["status"] == "failed: disk full" and summary["step"] == 20
    assert summary["checkpoint"].endswith("ckpt_0000010.pt")

    monkeypatch.setattr(torch, "save", real_save)
    assert run(cfg, run_dir)["status"] == "done"
    run(cfg, tmp_path / "straight")
    assert read_metrics(run_dir)[-1]["val/loss"] == \
        read_metrics(tmp_path / "straight")[-1]["val/loss"]
    final = [load_checkpoint(list_checkpoints(d / "checkpoints")[-1])["model"]
             for d in (run_dir, tmp_path / "straight")]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[1])


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs: room for two checkpoints of the tiny model, not three."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                          capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.decode().strip()})")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_real_full_disk_exits_2_in_one_line_and_resumes_once_there_is_room(tiny_data,
                                                                            tmp_path,
                                                                            small_disk):
    run_dir = small_disk / "run"
    args = tiny_overrides(tiny_data, "adamw") + [f"hydra.run.dir={run_dir}"]
    res = run_train_cli(args, cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    [line] = res.stderr.strip().splitlines()
    assert line.startswith("error: disk full: checkpoint ckpt_0000030.pt needs about ")
    assert f" MiB in {run_dir / 'checkpoints'}, " in line and " MiB free." in line
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == \
        ["ckpt_0000010.pt", "ckpt_0000020.pt"]
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))
    assert _summary(run_dir)["status"] == "failed: disk full"

    subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)
    res = run_train_cli(args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "ckpt_0000020.pt at step 20" in res.stdout
    assert _summary(run_dir)["status"] == "done"
