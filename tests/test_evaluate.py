"""Downstream evaluation (engine/hellaswag.py, scripts/evaluate.py): HellaSwag-style scoring rules,
the task file, the cached download, the CLI on a real checkpoint. Offline: urlopen raises."""
from __future__ import annotations

import io
import itertools
import json
import math
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from data.tokenizers import get_tokenizer
from engine.checkpoint import load_trained
from evals import hellaswag
from evals.hellaswag import ChoiceCounts, Example, TaskError
from model import GPT, GPTConfig
from train_helpers import REPO, compose_cfg, load_script, tiny_overrides

SCRIPT = REPO / "scripts" / "evaluate.py"
BYTE = get_tokenizer("byte")
V = BYTE.vocab_size

evaluate_script = load_script("evaluate", "evaluate_script")


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    """Any download attempt fails the test; the cache is a fresh empty folder."""
    def no_network(*args, **kwargs):
        raise AssertionError(f"network touched: urlopen{args}")
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setenv("SOPHIA_BENCH_CACHE", str(tmp_path / "cache"))
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread beats two that contend on 2 shared cores
    yield
    torch.set_num_threads(before)


def write_task(path: Path, examples: list[dict]) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in examples))
    return path


class BigramModel(nn.Module):
    """Stub with GPT's forward signature: the logits at a position are ``table[token there]``."""

    def __init__(self, table: torch.Tensor, block_size: int = 1024):
        super().__init__()
        self.register_buffer("table", table)
        self.config = SimpleNamespace(block_size=block_size)

    def forward(self, idx, targets=None):
        return self.table[idx], None


def uniform_model() -> BigramModel:
    return BigramModel(torch.zeros(V, V))


# --- scoring rules -------------------------------------------------------------------------------

def test_a_model_that_prefers_the_right_endings_scores_one(tmp_path):
    # Context letters, right-ending letters and wrong-ending letters are disjoint, and every ending
    # has 8 letters: a bigram model fitted on context + right ending prefers it by both scores.
    g = torch.Generator().manual_seed(0)

    def word(letters: str, n: int) -> str:
        return "".join(letters[i] for i in torch.randint(len(letters), (n,), generator=g).tolist())

    rows = []
    for i in range(12):
        label = i % 4
        endings = [word("uvwxyz", 8) for _ in range(4)]
        endings[label] = word("abcdef", 8)
        rows.append({"ctx": word("klmnop ", 20), "endings": endings, "label": label})
    examples = hellaswag.load_task(write_task(tmp_path / "task.jsonl", rows))
    table = torch.zeros(V, V)
    for ex in examples:
        ids = BYTE.encode(ex.ctx + " " + ex.endings[ex.label])
        for a, b in itertools.pairwise(ids):
            table[a, b] += 4.0
    result = hellaswag.evaluate_multiple_choice(BigramModel(table), examples, BYTE.encode,
                                                 batch_size=5)
    assert result == {"acc": 1.0, "acc_norm": 1.0, "n": 12}


# (endings, label, acc's pick: the first shortest ending). Every ending costs len * log(V) under
# all-equal logits, so acc picks the shortest (the first of equals) and acc_norm ties everywhere
# and picks ending 0.
UNIFORM_CASES = [
    (["aaaa", "bb", "ccc", "ddddd"], 1, 1),   # acc right, acc_norm wrong
    (["aaaa", "bb", "ccc", "ddddd"], 0, 1),   # acc wrong, acc_norm right
    (["a", "bb", "c", "dd"], 2, 0),           # length tie 0/2 -> 0: both wrong
    (["aa", "bb", "c", "d"], 2, 2),           # length tie 2/3 -> 2: acc right
    (["aaa", "bbb", "ccc", "ddd"], 0, 0),     # all tie: both right
    (["aaa", "bbb", "ccc", "d"], 3, 3),       # acc right
    (["aaa", "bbb", "ccc", "d"], 1, 3),       # both wrong
]


def test_a_uniform_model_gets_exactly_what_the_tie_rules_say(tmp_path):
    rows = [{"ctx": "Some context.", "endings": e, "label": label} for e, label, _ in UNIFORM_CASES]
    examples = hellaswag.load_task(write_task(tmp_path / "task.jsonl", rows))
    for batch_size in (1, 3, 8):  # padding to other rows' lengths must not break the ties
        scores = hellaswag.score_examples(uniform_model(), examples, BYTE.encode, batch_size=batch_size)
        for s, (endings, label, pick) in zip(scores, UNIFORM_CASES):
            assert s.num_tokens == tuple(len(e) + 1 for e in endings)  # " " + ending, in bytes
            assert s.sum_loss == pytest.approx([n * math.log(V) for n in s.num_tokens], rel=1e-6)
            assert len(set(s.mean_loss)) == 1  # exactly equal: a tie, not nearly one
            assert s.pred == pick and s.pred_norm == 0
        counts = hellaswag.count_correct(scores)
        assert counts == ChoiceCounts(correct=4, correct_norm=2, total=7)
    result = hellaswag.evaluate_multiple_choice(uniform_model(), examples, BYTE.encode)
    assert result == {"acc": 4 / 7, "acc_norm": 2 / 7, "n": 7}


def test_summed_and_length_normalised_scores_pick_differently(tmp_path):
    # After an 'x' the model expects another 'x' (logit 3, every other token 0): the long x-run
    # has a low loss per token but a high total; the one-letter "y" has the lowest total.
    table = torch.zeros(V, V)
    table[ord("x"), ord("x")] = 3.0
    endings = ["y", "xxxxxxxxxx", "zzz", "wwww"]  # acc -> 0 ("y"), acc_norm -> 1 (the x-run)
    rows = [{"ctx": "Hello there", "endings": endings, "label": label} for label in (1, 1, 0)]
    examples = hellaswag.load_task(write_task(tmp_path / "task.jsonl", rows))
    scores = hellaswag.score_examples(BigramModel(table), examples, BYTE.encode)
    for s in scores:
        assert (s.pred, s.pred_norm) == (0, 1)
        assert s.sum_loss[0] < s.sum_loss[1] and s.mean_loss[1] < s.mean_loss[0]
    result = hellaswag.evaluate_multiple_choice(BigramModel(table), examples, BYTE.encode)
    assert result == {"acc": pytest.approx(1 / 3), "acc_norm": pytest.approx(2 / 3), "n": 3}


def _reference_sum_loss(model: GPT, ctx: list[int], end: list[int], block: int) -> float:
    """One sequence at a time, no padding: the summed loss of the ending's scored tokens."""
    window = (ctx + end)[-(block + 1):]
    logits, _ = model(torch.tensor([window[:-1]]))
    logp = torch.log_softmax(logits[0].double(), dim=-1)
    n = min(len(end), len(window) - 1)
    targets = window[-n:]
    positions = range(len(window) - 1 - n, len(window) - 1)
    return -sum(logp[p, t].item() for p, t in zip(positions, targets))


def test_batched_scores_match_one_sequence_at_a_time_with_left_truncation():
    torch.manual_seed(0)
    block = 16
    model = GPT(GPTConfig(block_size=block, vocab_size=V, n_layer=1, n_head=2, n_embd=16,
                          dropout=0.5))  # dropout must be off while scoring
    model.train()
    examples = [
        Example("Hi", ("a", "bcd", "efghij", "k"), 2),                        # fits
        Example("A context longer than the block", ("short", "x", "yz", "w"), 0),  # ctx cut
        Example("Ctx", ("an ending longer than sixteen", "b", "c", "d"), 1),  # ending cut too
    ]
    got = hellaswag.score_examples(model, examples, BYTE.encode, batch_size=2)
    assert model.training  # the caller's mode is restored
    model.eval()
    with torch.no_grad():
        for ex, s in zip(examples, got):
            ctx = BYTE.encode(ex.ctx)
            for i, ending in enumerate(ex.endings):
                end = BYTE.encode(" " + ending)
                want = _reference_sum_loss(model, ctx, end, block)
                assert s.sum_loss[i] == pytest.approx(want, rel=1e-5)
                assert s.num_tokens[i] == min(len(end), block)
                assert s.mean_loss[i] == pytest.approx(want / s.num_tokens[i], rel=1e-5)
    assert [s.truncated for s in got] == [False, True, True]
    # Without truncation the score is the plain conditional log-likelihood of the ending.
    ctx, end = BYTE.encode("Hi"), BYTE.encode(" efghij")
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ctx + end]))[0][0].double(), dim=-1)
    plain = -sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(end))
    assert got[0].sum_loss[2] == pytest.approx(plain, rel=1e-5)
    again = hellaswag.score_examples(model, examples, BYTE.encode, batch_size=3)
    flat = [loss for s in got for loss in s.sum_loss]
    assert [loss for s in again for loss in s.sum_loss] == pytest.approx(flat, rel=1e-5)


def test_counts_add_up_across_shards_and_round_trip_through_a_tensor():
    examples = [Example("Some context.", e, label) for e, label, _ in UNIFORM_CASES]
    whole = hellaswag.count_correct(hellaswag.score_examples(uniform_model(), examples, BYTE.encode))
    parts = [hellaswag.count_correct(hellaswag.score_examples(
        uniform_model(), examples[r::3], BYTE.encode)) for r in range(3)]
    assert sum(parts, ChoiceCounts(0, 0, 0)) == whole
    assert ChoiceCounts.from_tensor(whole.to_tensor()) == whole
    assert whole.to_tensor().dtype == torch.int64
    assert math.isnan(ChoiceCounts(0, 0, 0).result()["acc"])


def _ranked_eval(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        examples = [Example("Some context.", tuple(e), label) for e, label, _ in UNIFORM_CASES]
        result = hellaswag.evaluate_multiple_choice(uniform_model(), examples, BYTE.encode,
                                                     rank=rank, world_size=world)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_ranks_split_the_examples_and_all_get_the_global_result(tmp_path):
    torch.multiprocessing.spawn(_ranked_eval, args=(2, str(tmp_path / "store"), str(tmp_path)),
                                nprocs=2, join=True)
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got == {"acc": 4 / 7, "acc_norm": 2 / 7, "n": 7}


# --- the task file -------------------------------------------------------------------------------

GOOD = {"ctx": "A man is", "endings": ["a", "b", "c", "d"], "label": 3, "ind": 7}


@pytest.mark.parametrize("bad,needle", [
    ("{not json", "not valid JSON"),
    (json.dumps([1, 2]), "expected a JSON object"),
    (json.dumps({"ctx": "x", "label": 0}), "missing key 'endings'"),
    (json.dumps({**GOOD, "endings": ["a", "b", "c"]}), "a list of 3 items"),
    (json.dumps({**GOOD, "endings": ["a", "b", "c", 4]}), "non-string item"),
    (json.dumps({**GOOD, "label": 4}), "\"label\" is 4"),
    (json.dumps({**GOOD, "label": "1"}), "\"label\" is '1'"),
    (json.dumps({**GOOD, "label": True}), "\"label\" is True"),
    (json.dumps({**GOOD, "ctx": ""}), "\"ctx\" is ''"),
])
def test_a_malformed_line_is_named(tmp_path, bad, needle):
    path = tmp_path / "task.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + bad + "\n" + json.dumps(GOOD) + "\n")
    with pytest.raises(TaskError) as err:
        hellaswag.load_task(path, limit=1)  # the whole file is checked, not only the first N
    assert f"{path} line 3" in str(err.value) and needle in str(err.value)


def test_limit_keeps_the_first_examples_and_extra_keys_are_ignored(tmp_path):
    rows = [{**GOOD, "ctx": f"ctx {i}", "label": i % 4} for i in range(5)]
    path = write_task(tmp_path / "t.jsonl", rows)
    assert [e.ctx for e in hellaswag.load_task(path, limit=2)] == ["ctx 0", "ctx 1"]
    assert len(hellaswag.load_task(path)) == 5
    assert hellaswag.load_task(path)[0] == Example("ctx 0", ("a", "b", "c", "d"), 0)
    for bad in (0, -1, True):
        with pytest.raises(TaskError, match="limit must be a positive integer"):
            hellaswag.load_task(path, limit=bad)
    with pytest.raises(TaskError, match="does not exist"):
        hellaswag.load_task(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(TaskError, match="holds no examples"):
        hellaswag.load_task(tmp_path / "empty.jsonl")


def test_download_happens_once_then_the_cache_is_reused(monkeypatch, tmp_path):
    payload = "".join(json.dumps({**GOOD, "label": i % 4}) + "\n" for i in range(6)).encode()
    calls = []

    def fake_urlopen(url, timeout=None):
        calls.append(url)
        return io.BytesIO(payload)
    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    first = hellaswag.load_task(None, limit=4)
    cached = tmp_path / "cache" / "hellaswag_val.jsonl"
    assert calls == [hellaswag.HELLASWAG_VAL_URL] and cached.read_bytes() == payload
    assert [e.label for e in first] == [0, 1, 2, 3]
    assert list(cached.parent.iterdir()) == [cached]  # no temp file left behind

    def offline(*args, **kwargs):
        raise AssertionError("the cached file must be reused")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    assert hellaswag.load_task(None) == hellaswag.load_task(cached)


def test_no_network_names_the_url_and_task_file(monkeypatch, tmp_path):
    def unreachable(url, timeout=None):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(urllib.request, "urlopen", unreachable)
    with pytest.raises(TaskError) as err:
        hellaswag.load_task(None)
    msg = str(err.value)
    assert hellaswag.HELLASWAG_VAL_URL in msg and "--task-file" in msg and "\n" not in msg
    assert not (tmp_path / "cache" / "hellaswag_val.jsonl").exists()


def test_a_bad_download_is_not_cached(monkeypatch, tmp_path):
    monkeypatch.setattr(urllib.request, "urlopen",
                        lambda url, timeout=None: io.BytesIO(b"<html>rate limited</html>\n"))
    with pytest.raises(TaskError, match="not a valid task file.*nothing was cached"):
        hellaswag.load_task(None)
    assert not any((tmp_path / "cache").glob("*"))


# --- the command line on a real checkpoint -------------------------------------------------------

TASK_ROWS = [
    {"ctx": "ROMEO: What light through yonder window breaks? It is the east,",
     "endings": ["and Juliet is the sun.", "zq xj vk.", "and the moon is cheese.", "qqqq"], "label": 0},
    {"ctx": "KING: Now is the winter of our discontent made glorious summer",
     "endings": ["by this sun of York.", "by xkcd.", "1234 5678", "by the sea."], "label": 0},
    {"ctx": "First Citizen: Before we proceed any further, hear me speak.",
     "endings": ["zzzz", "All: Speak, speak.", "qx", "Speak!"], "label": 1},
    {"ctx": "HAMLET: To be, or not to be,",
     "endings": ["that is the question.", "xx", "yy", "zz"], "label": 0},
]


@pytest.fixture(scope="module")
def trained_run(tiny_data, tmp_path_factory) -> Path:
    """A real 10-step training run (byte tokenizer, block size 32) with its final checkpoint."""
    from engine.run import run

    run_dir = tmp_path_factory.mktemp("run")
    cfg = compose_cfg(tiny_overrides(tiny_data, **{"train.max_steps": 10, "checkpoint.interval": 0,
                                                   "train.eval_interval": 0, "optimizer.lr": 3e-3}))
    run(cfg, run_dir)
    return run_dir


def test_cli_scores_a_training_checkpoint_and_writes_json(trained_run, tmp_path):
    task = write_task(tmp_path / "task.jsonl", TASK_ROWS)
    # A dead proxy as a second guard: a download attempt in the child would fail, not go out.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "http_proxy": "http://127.0.0.1:9",
           "https_proxy": "http://127.0.0.1:9", "SOPHIA_BENCH_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, str(SCRIPT), str(trained_run), "--task", "hellaswag",
                           "--task-file", str(task), "--limit", "3", "--device", "cpu",
                           "--batch-size", "2"],
                          capture_output=True, text=True, timeout=120, cwd="/", env=env)
    assert proc.returncode == 0, proc.stderr
    out = trained_run / "eval_hellaswag.json"
    record = json.loads(out.read_text())
    assert record["n"] == 3 and record["step"] == 10 and record["limit"] == 3
    assert record["correct"] == round(record["acc"] * 3)
    assert record["correct_norm"] == round(record["acc_norm"] * 3)
    assert record["tokenizer"] == "byte" and record["block_size"] == 32
    assert record["truncated"] == 3  # every context is longer than 32 bytes
    assert record["checkpoint"].endswith("ckpt_0000010.pt")
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith(f"hellaswag: acc {record['acc']:.4f} | acc_norm {record['acc_norm']:.4f} | n 3")
    assert not (tmp_path / "cache").exists()

    # The in-training entry point on the same weights agrees with the command line.
    model = load_trained(trained_run, "cpu").model
    result = hellaswag.evaluate_multiple_choice(model, hellaswag.load_task(task, 3), BYTE.encode,
                                                 model.config.block_size, "cpu")
    assert result == {"acc": record["acc"], "acc_norm": record["acc_norm"], "n": 3}


def test_cli_refuses_a_malformed_task_file_with_one_line(trained_run, tmp_path, capsys):
    task = tmp_path / "task.jsonl"
    task.write_text(json.dumps(TASK_ROWS[0]) + "\n" + json.dumps({**TASK_ROWS[1], "label": 9}) + "\n")
    out = tmp_path / "result.json"
    status = evaluate_script.main([str(trained_run), "--task-file", str(task), "--device", "cpu",
                                   "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and not out.exists()
    assert len(err) == 1 and err[0].startswith("error: ") and f"{task} line 2" in err[0]
    assert "\"label\" is 9" in err[0]


@pytest.mark.parametrize("args,needle", [
    (["--limit", "0"], "--limit must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--dtype", "float16", "--device", "cpu"], "float16 needs a CUDA device"),
])
def test_cli_refuses_bad_options(trained_run, tmp_path, capsys, args, needle):
    task = write_task(tmp_path / "task.jsonl", TASK_ROWS)
    status = evaluate_script.main([str(trained_run), "--task-file", str(task), "--no-progress",
                                   "--out", str(tmp_path / "r.json"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and needle in err[0]


def test_cli_without_network_or_task_file_says_what_to_do(monkeypatch, tmp_path, capsys):
    # The message must name the URL and --task-file; the checkpoint is not read before the task.
    def unreachable(url, timeout=None):
        raise TimeoutError("timed out")
    monkeypatch.setattr(urllib.request, "urlopen", unreachable)
    (tmp_path / "ckpt.pt").write_bytes(b"")
    status = evaluate_script.main([str(tmp_path / "ckpt.pt"), "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1
    assert hellaswag.HELLASWAG_VAL_URL in err[0] and "--task-file" in err[0]


def test_cli_refuses_a_run_without_checkpoints_and_a_foreign_file(tmp_path, capsys):
    task = write_task(tmp_path / "task.jsonl", TASK_ROWS)
    (tmp_path / "empty_run").mkdir()
    assert evaluate_script.main([str(tmp_path / "empty_run"), "--task-file", str(task)]) == 2
    assert "no checkpoint in" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    assert evaluate_script.main([str(tmp_path / "junk.pt"), "--task-file", str(task)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a torch.save archive" in err[0]


# --- the in-training hook ------------------------------------------------------------------------

def test_training_hook_is_due_like_val_loss_and_logs_its_two_metrics(tmp_path):
    rows = [{"ctx": "Some context.", "endings": e, "label": label} for e, label, _ in UNIFORM_CASES]
    task = write_task(tmp_path / "task.jsonl", rows)
    assert hellaswag.build_multiple_choice_eval(0, str(task), None, 8, "byte") is None
    hook = hellaswag.build_multiple_choice_eval(10, str(task), 5, 2, "byte")
    assert len(hook.examples) == 5
    assert [s for s in range(26) if hook.due(s, 25)] == [0, 10, 20, 25]
    metrics = hook(uniform_model(), "cpu")
    assert metrics == {"eval/hellaswag_acc": 3 / 5, "eval/hellaswag_acc_norm": 2 / 5}


@pytest.mark.parametrize("kwargs,needle", [
    ({"interval": -1}, "eval.hellaswag_interval=-1"),
    ({"interval": 1.5}, "eval.hellaswag_interval=1.5"),
    ({"limit": 0}, "eval.hellaswag_limit=0"),
    ({"batch_size": 0}, "eval.hellaswag_batch_size=0"),
    ({"task_file": "/nonexistent/hs.jsonl"}, "/nonexistent/hs.jsonl does not exist"),
])
def test_training_hook_refuses_bad_settings_by_key(tmp_path, kwargs, needle):
    task = write_task(tmp_path / "task.jsonl", [GOOD])
    args = {"interval": 10, "task_file": str(task), "limit": None, "batch_size": 8,
            "tokenizer": "byte", **kwargs}
    with pytest.raises(TaskError, match=needle):
        hellaswag.build_multiple_choice_eval(**args)


def test_training_logs_hellaswag_on_its_schedule_and_it_matches_the_standalone_score(
        tiny_data, tmp_path):
    """eval.hellaswag_interval=5: eval/hellaswag_* at step 0, every 5 steps and the last step,
    equal to scoring the final weights directly; the metric changes nothing in training."""
    from engine.checkpoint import list_checkpoints, load_checkpoint
    from engine.run import run
    from train_helpers import read_metrics

    task = write_task(tmp_path / "task.jsonl", TASK_ROWS)
    base = tiny_overrides(tiny_data, **{"train.max_steps": 12, "checkpoint.interval": 0,
                                        "train.eval_interval": 0})
    run(compose_cfg(base + ["eval.hellaswag_interval=5", f"eval.hellaswag_task_file={task}"]),
        tmp_path / "with")
    run(compose_cfg(base), tmp_path / "without")
    rows = read_metrics(tmp_path / "with")
    scored = [r for r in rows if "eval/hellaswag_acc" in r]
    assert [r["step"] for r in scored] == [0, 5, 10, 12]
    assert all(0 <= r["eval/hellaswag_acc_norm"] <= 1 for r in scored)

    state = load_checkpoint(list_checkpoints(tmp_path / "with" / "checkpoints")[-1])
    model = GPT(GPTConfig(**state["model_config"]))
    model.load_state_dict(state["model"])
    direct = hellaswag.evaluate_multiple_choice(
        model, hellaswag.load_task(task), get_tokenizer("byte").encode, device="cpu")
    assert scored[-1]["eval/hellaswag_acc"] == pytest.approx(direct["acc"])
    assert scored[-1]["eval/hellaswag_acc_norm"] == pytest.approx(direct["acc_norm"])
    other = read_metrics(tmp_path / "without")
    assert [r["train/loss"] for r in rows if "train/loss" in r] == \
        [r["train/loss"] for r in other if "train/loss" in r]
