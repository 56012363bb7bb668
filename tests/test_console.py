"""What the user sees while a run trains: progress lines with an ETA, and a copy in the run dir."""
from __future__ import annotations

import logging
import sys

import pytest

from engine.console_log import tee_console
from engine.metrics import ConsoleSink


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def make_sink(total_steps=None, start_step=0):
    lines: list[str] = []
    clock = FakeClock()
    sink = ConsoleSink(print_fn=lambda line, **_: lines.append(line), total_steps=total_steps,
                       start_step=start_step, clock=clock)
    return sink, clock, lines


def train_record(step: int, elapsed: float, **extra):
    return {"step": step, "time/elapsed": elapsed, "train/loss": 2.51234, "lr": 5e-4,
            "grad/norm": 0.8123, "throughput": 4100.4, **extra}


@pytest.mark.parametrize("seconds, text", [
    (0, "0.0s"), (4.24, "4.2s"), (9.96, "10s"), (45.2, "45s"), (59.6, "1m00s"), (185, "3m05s"),
    (3599, "59m59s"),
    (3720, "1h02m"), (90000, "25h00m"), (float("nan"), "?"), (-1, "?"), (None, "?"),
])
def test_format_duration(seconds, text):
    assert ConsoleSink.format_duration(seconds) == text


def test_progress_line_with_total_shows_percent_metrics_and_eta():
    sink, clock, lines = make_sink(total_steps=400)
    clock.t += 5  # start-up before the first record does not count once a rate is measured
    sink.log({"step": 0, "time/elapsed": 0.0, "val/loss": 2.9})
    clock.t += 31.2
    sink.log(train_record(120, 31.2, **{"val/loss": 2.60012}))
    assert lines[0].startswith("step      0/400 (0%) | val 2.9000 | 0.0s elapsed")
    assert "ETA" not in lines[0]  # no step done yet: no rate
    # 120 steps in 31.2 s of wall-clock, 280 left -> 72.8 s
    assert lines[1] == ("step    120/400 (30%) | loss 2.5123 | val 2.6001 | lr 5.00e-04 | "
                        "gnorm 0.81 | 4,100 tok/s | 31.2s elapsed | ETA 1m13s")


def test_eta_uses_wall_clock_so_eval_time_counts():
    sink, clock, lines = make_sink(total_steps=300)
    sink.log({"step": 0, "time/elapsed": 0.0, "val/loss": 3.0})
    clock.t += 100  # 40 s of it an eval that time/elapsed leaves out
    sink.log(train_record(100, 60.0))
    assert lines[-1].endswith("1m00s elapsed | ETA 3m20s")  # 200 steps at 1 s/step


def test_rate_is_from_this_invocation_after_resume():
    sink, clock, lines = make_sink(total_steps=1000, start_step=900)
    clock.t += 20  # loading the checkpoint, compiling: counted only until a rate is measured
    sink.log(train_record(910, 4990.0))
    assert lines[-1].endswith("ETA 3m00s")  # (1000 - 910) * 20 s / 10 steps
    clock.t += 10
    sink.log(train_record(920, 5000.0))
    assert "(92%)" in lines[-1] and lines[-1].endswith("1h23m elapsed | ETA 1m20s")


def test_last_step_and_rollback_have_no_eta():
    sink, clock, lines = make_sink(total_steps=20)
    sink.log(train_record(10, 1.0))
    clock.t += 10
    sink.log(train_record(20, 2.0))
    assert "(100%)" in lines[-1] and "ETA" not in lines[-1]
    clock.t += 1
    sink.log(train_record(15, 1.5))  # rolled back: the old anchor is no measure of the new rate
    assert "ETA" not in lines[-1]
    clock.t += 5
    sink.log(train_record(18, 1.8))
    assert lines[-1].endswith("ETA 3.3s")  # 2 steps left at 5 s / 3 steps


def test_without_total_the_line_is_as_before():
    sink, clock, lines = make_sink()
    clock.t += 3
    sink.log(train_record(10, 3.0, mfu=0.123))
    assert lines == ["step     10 | loss 2.5123 | lr 5.00e-04 | gnorm 0.81 | 4,100 tok/s | "
                     "mfu 12.3% | 3.0s elapsed"]


def test_nonfinite_values_are_shown_not_dropped():
    sink, _, lines = make_sink()
    sink.log({"step": 5, "train/loss": float("nan"), "throughput": float("inf")})
    assert lines == ["step      5 | loss nan | inf tok/s"]


def test_tee_copies_prints_logging_and_the_exception(tmp_path, capsys):
    log_path = tmp_path / "run" / "console.log"
    logger = logging.getLogger("test_console.tee")
    handler = logging.StreamHandler(sys.stderr)  # as Hydra's: holds the stream it was given
    logger.addHandler(handler)
    logger.propagate = False
    out_before, err_before = sys.stdout, sys.stderr
    try:
        with pytest.raises(RuntimeError):
            with tee_console(log_path):
                print("hello out")
                print("hello err", file=sys.stderr)
                logger.warning("logged warning")
                raise RuntimeError("boom at step 7")
    finally:
        logger.removeHandler(handler)
    assert sys.stdout is out_before and sys.stderr is err_before
    assert handler.stream is err_before
    text = log_path.read_text()
    for expected in ("hello out", "hello err", "logged warning", "RuntimeError: boom at step 7"):
        assert expected in text
    terminal = capsys.readouterr()
    assert "hello out" in terminal.out and "hello err" in terminal.err
    assert "logged warning" in terminal.err and "boom" not in terminal.err  # Python's to report

    print("after the block")
    assert "after the block" not in log_path.read_text()


def test_tee_appends_and_nests(tmp_path, capsys):
    outer, inner = tmp_path / "outer.log", tmp_path / "inner.log"
    outer.write_text("earlier invocation\n")
    out_before = sys.stdout
    with tee_console(outer):
        print("one")
        with tee_console(inner):
            print("two")
        print("three")
    assert sys.stdout is out_before
    assert outer.read_text() == "earlier invocation\none\ntwo\nthree\n"
    assert inner.read_text() == "two\n"
    assert capsys.readouterr().out == "one\ntwo\nthree\n"


def test_tee_copies_an_exit_message_but_no_exit_traceback(tmp_path):
    path = tmp_path / "console.log"
    with pytest.raises(SystemExit):
        with tee_console(path):
            print("error: bad config", file=sys.stderr)
            sys.exit(2)
    with pytest.raises(SystemExit):
        with tee_console(path):
            sys.exit("stopped: out of disk")
    assert path.read_text() == "error: bad config\nstopped: out of disk\n"
