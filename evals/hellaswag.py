"""Zero-shot multiple-choice evaluation (HellaSwag), as llm.c and build-nanogpt's hellaswag.py do it.

For each example the model reads the context followed by each candidate ending (``" " + ending``,
tokenized separately from the context and appended to it), and every ending is scored by the
cross-entropy of its own tokens given what precedes them:

- ``acc``: the ending with the lowest *summed* loss (the highest log-likelihood) is the prediction;
- ``acc_norm``: the ending with the lowest *mean* loss per ending token is the prediction.

Ties go to the lowest index. Losses are summed in float64 from float32 per-token values, so equal
per-token losses give exactly equal scores whatever the padding or batch (a uniform model ties on
every mean and so always predicts ending 0 under ``acc_norm``).

Sequences longer than the model's context are cut from the left: the last ``block_size + 1``
tokens of context + ending are kept, so the model reads ``block_size`` tokens and the ending is
scored in full as long as it has at most ``block_size`` tokens (otherwise only its last
``block_size`` tokens are scored). HellaSwag examples are about 100 GPT-2 tokens, so a 1024-token
model never truncates.

The task file is the jsonl of rowanz/hellaswag (one example per line with ``ctx``, ``endings``,
``label``). :func:`load_task` reads a given file, or downloads the validation split once into a
cache folder (``$SOPHIA_BENCH_CACHE``, else ``$XDG_CACHE_HOME/sophia-bench``, else
``~/.cache/sophia-bench``) and reuses it afterwards.

Used by ``scripts/evaluate.py`` and, through :func:`evaluate_multiple_choice`, by training runs.
"""
from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from data.files import write_bytes_atomic
from engine.errors import HarnessError
from engine.schema import Int, Optional, Str, check_values
from evals import register_eval

HELLASWAG_VAL_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
HELLASWAG_FILE = "hellaswag_val.jsonl"
NUM_CHOICES = 4
DEFAULT_BATCH_SIZE = 8  # examples per forward pass (4 rows each)
# The eval.hellaswag_* keys, without the prefix: their types and ranges.
OPTIONS = {
    "interval": Int(min=0, doc="steps between HellaSwag evaluations; 0 disables them"),
    "task_file": Optional(Str(), doc="a local hellaswag_val.jsonl; null: downloaded once"),
    "limit": Optional(Int(min=1), doc="the first N examples; null: every example"),
    "batch_size": Int(min=1, doc="examples per forward pass"),
}

Encode = Callable[[str], Sequence[int]]
Autocast = Callable[[], ContextManager]


class TaskError(HarnessError):
    """A task file that cannot be read or downloaded, or an example that cannot be scored."""


@dataclass(frozen=True)
class Example:
    """One multiple-choice question: a context, its candidate endings and the correct index."""

    ctx: str
    endings: tuple[str, ...]
    label: int


@dataclass(frozen=True)
class ChoiceCounts:
    """Correct predictions of both scores over ``total`` examples.

    Counts (not accuracies) are what ranks add up: :meth:`to_tensor` -> ``all_reduce(SUM)`` ->
    :meth:`from_tensor`.
    """

    correct: int
    correct_norm: int
    total: int

    def to_tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """``[correct, correct_norm, total]`` as int64, ready for ``dist.all_reduce``."""
        return torch.tensor([self.correct, self.correct_norm, self.total], dtype=torch.int64,
                            device=device)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> ChoiceCounts:
        correct, correct_norm, total = (int(v) for v in t.tolist())
        return cls(correct, correct_norm, total)

    def __add__(self, other: ChoiceCounts) -> ChoiceCounts:
        return ChoiceCounts(self.correct + other.correct, self.correct_norm + other.correct_norm,
                            self.total + other.total)

    def result(self) -> dict[str, Any]:
        """``{"acc", "acc_norm", "n"}``; accuracies are NaN when no example was evaluated."""
        n = self.total
        return {"acc": self.correct / n if n else math.nan,
                "acc_norm": self.correct_norm / n if n else math.nan, "n": n}


@dataclass(frozen=True)
class ExampleScore:
    """The scores of one example's endings: summed and mean loss (nats) and tokens scored."""

    sum_loss: tuple[float, ...]
    mean_loss: tuple[float, ...]
    num_tokens: tuple[int, ...]
    label: int
    truncated: bool  # some ending's context was cut to fit the block size

    @property
    def pred(self) -> int:
        """Index of the lowest summed loss (first one on a tie): the ``acc`` prediction."""
        return _argmin(self.sum_loss)

    @property
    def pred_norm(self) -> int:
        """Index of the lowest mean loss (first one on a tie): the ``acc_norm`` prediction."""
        return _argmin(self.mean_loss)


def _argmin(values: Sequence[float]) -> int:
    # Spelled out rather than torch.argmin so the tie rule (lowest index) is explicit and the same
    # on every device.
    return min(range(len(values)), key=lambda i: (values[i], i))


# --- the task file -------------------------------------------------------------------------------

def parse_example(obj: Any, where: str) -> Example:
    """Check one decoded jsonl line; ``where`` (``"FILE line N"``) names it in the error."""
    fix = (f"each line must be a JSON object with \"ctx\" (a non-empty string), \"endings\" "
           f"(a list of {NUM_CHOICES} strings) and \"label\" (an integer 0..{NUM_CHOICES - 1}), "
           f"as in {HELLASWAG_FILE} of rowanz/hellaswag")
    if not isinstance(obj, dict):
        raise TaskError(f"{where}: expected a JSON object, got {type(obj).__name__}; {fix}.")
    missing = [k for k in ("ctx", "endings", "label") if k not in obj]
    if missing:
        raise TaskError(f"{where}: missing key{'s' if len(missing) > 1 else ''} "
                        f"{', '.join(map(repr, missing))}; {fix}.")
    ctx, endings, label = obj["ctx"], obj["endings"], obj["label"]
    # An empty context leaves nothing to predict the first ending token from.
    if not isinstance(ctx, str) or not ctx:
        raise TaskError(f"{where}: \"ctx\" is {ctx!r}; {fix}.")
    if (not isinstance(endings, list) or len(endings) != NUM_CHOICES
            or not all(isinstance(e, str) for e in endings)):
        shown = f"a list of {len(endings)} items" if isinstance(endings, list) else repr(endings)
        if isinstance(endings, list) and len(endings) == NUM_CHOICES:
            shown = "a list with a non-string item"
        raise TaskError(f"{where}: \"endings\" is {shown}; {fix}.")
    # bool is an int subclass, but true/false as a label is a broken file, not index 1/0.
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < NUM_CHOICES:
        raise TaskError(f"{where}: \"label\" is {label!r}; {fix}.")
    return Example(ctx, tuple(endings), label)


def parse_task_lines(lines: Sequence[str] | Any, source: str) -> list[Example]:
    """Every example of a jsonl text (blank lines skipped), each line checked; errors name
    ``source`` and the 1-based line number."""
    examples = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{source} line {number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise TaskError(f"{where} is not valid JSON ({err.msg} at column {err.colno}); fix "
                            f"or delete that line, or pass another --task-file.") from None
        examples.append(parse_example(obj, where))
    if not examples:
        raise TaskError(f"{source} holds no examples; pass a jsonl file with one example per line "
                        f"(--task-file).")
    return examples


def read_task_file(path: str | os.PathLike) -> list[Example]:
    """The examples of a local jsonl task file, every line validated."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"task file {path} does not exist; pass an existing jsonl file "
                        f"(--task-file) or omit it to download {HELLASWAG_FILE}.")
    try:
        with open(path, encoding="utf-8") as f:
            return parse_task_lines(f, str(path))
    except UnicodeDecodeError as err:
        raise TaskError(f"task file {path} is not UTF-8 text ({err.reason} at byte {err.start}); "
                        f"pass the jsonl file itself, not an archive.") from None


def cache_dir() -> Path:
    """Where downloaded task files live: ``$SOPHIA_BENCH_CACHE``, else
    ``$XDG_CACHE_HOME/sophia-bench``, else ``~/.cache/sophia-bench``."""
    if os.environ.get("SOPHIA_BENCH_CACHE"):
        return Path(os.environ["SOPHIA_BENCH_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "sophia-bench"


def download_task_file(url: str = HELLASWAG_VAL_URL, dest: str | os.PathLike | None = None,
                       timeout: float = 60.0) -> Path:
    """Fetch ``url`` to ``dest`` (default: the cache folder) unless it is already there.

    The download is validated before it is moved into place (a proxy's HTML error page must not
    become the cached task), and the move is atomic, so the cache holds a complete file or none.
    """
    dest = Path(dest) if dest is not None else cache_dir() / HELLASWAG_FILE
    if dest.is_file():
        return dest
    try:
        # Looked up at call time (not imported by name) so tests can replace urlopen.
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = response.read()
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as err:
        reason = getattr(err, "reason", None) or err
        raise TaskError(
            f"could not download {url} ({type(err).__name__}: {reason}). Without network access, "
            f"fetch that file on another machine and pass it with --task-file PATH (or copy it "
            f"to {dest}, where it is looked for first).") from None
    try:
        parse_task_lines(data.decode("utf-8").splitlines(), url)
    except (TaskError, UnicodeDecodeError) as err:
        raise TaskError(f"the file downloaded from {url} is not a valid task file ({err}); "
                        f"nothing was cached. Download it by hand and pass --task-file PATH.") from None
    return write_bytes_atomic(dest, data)


def task_file_path(path: str | os.PathLike | None = None) -> Path:
    """``path``, or when None the cached HellaSwag validation file (downloaded on first use)."""
    return Path(path) if path is not None else download_task_file()


def load_task(path: str | os.PathLike | None = None, limit: int | None = None) -> list[Example]:
    """HellaSwag examples from ``path``, or from the cached download when ``path`` is None.

    The whole file is validated even with ``limit``, so a broken file is caught on the first run;
    ``limit`` keeps the first N examples.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise TaskError(f"limit must be a positive integer, got {limit!r}; use --limit N with "
                        f"N >= 1, or omit it to evaluate every example.")
    examples = read_task_file(task_file_path(path))
    return examples[:limit] if limit is not None else examples


# --- scoring -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Row:
    tokens: list[int]  # block_size + 1 tokens at most: inputs are tokens[:-1], targets tokens[1:]
    scored: int  # how many of the last targets belong to the ending
    truncated: bool


def _encode_example(example: Example, encode: Encode, block_size: int) -> list[_Row]:
    """One row per ending: context tokens + ``encode(" " + ending)``, cut from the left to the
    last ``block_size + 1`` tokens."""
    ctx = list(encode(example.ctx))
    rows = []
    for i, ending in enumerate(example.endings):
        # The leading space makes the ending tokenize as it would mid-sentence in GPT-2 BPE
        # (" word", one token) rather than as the start of a text ("word").
        end = list(encode(" " + ending))
        seq = ctx + end
        window = seq[-(block_size + 1):]
        scored = min(len(end), len(window) - 1)
        if scored < 1:
            raise TaskError(f"ending {i} of the example with context {example.ctx[:40]!r} has no "
                            f"token to score (context {len(ctx)} tokens, ending {len(end)}); every "
                            f"example needs a non-empty context.")
        rows.append(_Row(window, scored, len(seq) > len(window)))
    return rows


def _score_batch(model: torch.nn.Module, batch: list[list[_Row]], device: torch.device,
                 autocast: Autocast | None) -> torch.Tensor:
    """Summed loss of every ending of every example in ``batch``: float64 ``[examples, choices]``."""
    rows = [r for rows in batch for r in rows]
    width = max(len(r.tokens) for r in rows) - 1
    inputs = torch.zeros(len(rows), width, dtype=torch.long)  # right padding: causal, never read
    targets = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.tokens) - 1
        inputs[i, :n] = torch.tensor(r.tokens[:-1])
        targets[i, n - r.scored:n] = torch.tensor(r.tokens[-r.scored:])
    inputs, targets = inputs.to(device), targets.to(device)
    with autocast() if autocast is not None else contextlib.nullcontext():
        logits, _ = model(inputs)
    scored = targets != -1
    # Only the ending positions go through the float32 softmax: a fraction of [rows, T, V].
    token_loss = F.cross_entropy(logits[scored].float(), targets[scored], reduction="none")
    # Summed in float64: sums of equal float32 terms are then exact, so equal per-token losses give
    # bit-equal scores wherever the padding puts them (the tie rules rely on it).
    dense = torch.zeros(len(rows), width, dtype=torch.float64, device=device)
    dense[scored] = token_loss.double()
    return dense.sum(dim=1).view(len(batch), -1).cpu()


def score_examples(model: torch.nn.Module, examples: Sequence[Example], encode: Encode,
                   block_size: int | None = None, device: torch.device | str = "cpu",
                   autocast: Autocast | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                   progress: bool = False) -> list[ExampleScore]:
    """Per-example scores of every ending (see the module docstring for the rules).

    ``model`` is any module with ``forward(idx) -> (logits [B, T, V], _)`` already on ``device``;
    it runs in eval mode under ``no_grad`` and its training mode is restored afterwards.
    ``block_size`` defaults to ``model.config.block_size``. ``autocast`` is a zero-argument
    callable returning the mixed-precision context (the trainer's ``autocast``), or None.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise TaskError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if block_size is None:
        block_size = model.config.block_size
    device = torch.device(device)
    encoded = [_encode_example(ex, encode, block_size) for ex in examples]
    was_training = model.training
    model.eval()
    scores: list[ExampleScore] = []
    bar = _progress_bar(len(examples)) if progress else None
    running = ChoiceCounts(0, 0, 0)
    try:
        with torch.no_grad():
            for start in range(0, len(encoded), batch_size):
                batch = encoded[start:start + batch_size]
                sums = _score_batch(model, batch, device, autocast)
                for rows, ex, s in zip(batch, examples[start:start + batch_size], sums.tolist()):
                    counts = tuple(r.scored for r in rows)
                    scores.append(ExampleScore(
                        sum_loss=tuple(s), mean_loss=tuple(v / c for v, c in zip(s, counts)),
                        num_tokens=counts, label=ex.label, truncated=any(r.truncated for r in rows)))
                if bar is not None:
                    running = running + count_correct(scores[start:])
                    result = running.result()
                    bar.set_postfix(acc=f"{result['acc']:.4f}", acc_norm=f"{result['acc_norm']:.4f}",
                                    refresh=False)
                    bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    return scores


def _progress_bar(total: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="ex", file=sys.stderr, dynamic_ncols=True)


def count_correct(scores: Sequence[ExampleScore]) -> ChoiceCounts:
    """How many of ``scores`` each rule gets right."""
    return ChoiceCounts(correct=sum(s.pred == s.label for s in scores),
                        correct_norm=sum(s.pred_norm == s.label for s in scores),
                        total=len(scores))


def evaluate_multiple_choice(model: torch.nn.Module, examples: Sequence[Example], encode: Encode,
                             block_size: int | None = None, device: torch.device | str = "cpu",
                             autocast: Autocast | None = None,
                             batch_size: int = DEFAULT_BATCH_SIZE, *, rank: int = 0,
                             world_size: int = 1, progress: bool = False) -> dict[str, Any]:
    """Zero-shot accuracy on ``examples``: ``{"acc": float, "acc_norm": float, "n": int}``.

    ``model`` is the plain GPT (not a DDP or compiled wrapper). With ``world_size > 1`` every rank
    must call this at the same point: rank r scores examples r, r + world_size, ... and the counts
    are summed with ``all_reduce``, so every rank returns the result over all examples, the same
    as one process would compute.
    """
    if world_size > 1 and not (0 <= rank < world_size):
        raise TaskError(f"rank {rank} is outside 0..{world_size - 1} (world_size {world_size}).")
    mine = examples[rank::world_size] if world_size > 1 else examples
    counts = count_correct(score_examples(model, mine, encode, block_size, device, autocast,
                                          batch_size, progress))
    if world_size > 1:
        t = counts.to_tensor(device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        counts = ChoiceCounts.from_tensor(t)
    return counts.result()


# --- the in-training hook ------------------------------------------------------------------------

@dataclass
class MultipleChoiceEval:
    """HellaSwag during training: when it is due and the metrics it adds to the eval record."""

    examples: list[Example]
    encode: Encode
    interval: int
    batch_size: int = DEFAULT_BATCH_SIZE
    prefix: str = "eval/hellaswag"

    def due(self, step: int, max_steps: int) -> bool:
        """Every ``interval`` steps and at the last step (as ``val/loss``); never at interval 0."""
        return self.interval > 0 and (step % self.interval == 0 or step == max_steps)

    def __call__(self, model: torch.nn.Module, device: torch.device | str,
                 autocast: Autocast | None = None, rank: int = 0,
                 world_size: int = 1) -> dict[str, float]:
        """``{"eval/hellaswag_acc": ..., "eval/hellaswag_acc_norm": ...}`` over every example.

        Every rank must call it (it all-reduces when ``world_size > 1``); ``model`` is the plain
        GPT. It uses no random numbers, so it leaves a bit-exact resume bit-exact.
        """
        result = evaluate_multiple_choice(model, self.examples, self.encode, None, device,
                                          autocast, self.batch_size, rank=rank,
                                          world_size=world_size)
        return {f"{self.prefix}_acc": result["acc"], f"{self.prefix}_acc_norm": result["acc_norm"]}


def build_multiple_choice_eval(interval: int, task_file: str | None, limit: int | None,
                               batch_size: int, tokenizer: str, *, rank: int = 0,
                               world_size: int = 1) -> MultipleChoiceEval | None:
    """The hook for ``eval.hellaswag_*`` config values, or None when ``interval`` is 0.

    Call it on every rank while building the trainer, before the run dir is written, so that a
    missing task file or network is refused up front. Rank 0 loads (and on first use downloads)
    the task first; the other ranks then read the same cached file.
    """
    from data.tokenizers import get_tokenizer

    check_values({"interval": interval, "task_file": task_file, "limit": limit,
                  "batch_size": batch_size}, OPTIONS, prefix="eval.hellaswag_", error=TaskError)
    if interval == 0:
        return None
    examples = load_task(task_file, limit) if rank == 0 else None
    if world_size > 1:
        dist.barrier()  # the download (rank 0) lands before the other ranks look for it
        if rank != 0:
            examples = load_task(task_file, limit)
    return MultipleChoiceEval(examples, get_tokenizer(tokenizer).encode, interval, batch_size)


@register_eval("hellaswag", schema=OPTIONS)
def from_config(options: Mapping[str, Any], tokenizer: str, *, rank: int = 0,
                world_size: int = 1) -> MultipleChoiceEval | None:
    """HellaSwag from the ``eval.hellaswag_*`` keys (``interval``, ``task_file``, ``limit``,
    ``batch_size``), or None when its interval is 0."""
    return build_multiple_choice_eval(
        options.get("interval", 0), options.get("task_file"), options.get("limit"),
        options.get("batch_size", DEFAULT_BATCH_SIZE), tokenizer, rank=rank, world_size=world_size)
