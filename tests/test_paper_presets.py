"""experiment=paper-<size>-<optimizer>[-fair]: the reproduction presets equal the official Sophia
GPT-2 configs key by key, the fair presets of a size differ in the optimizer only, the Lion and Muon
names are aliases of their fair presets, and every preset passes the config check."""
from __future__ import annotations

import math

import pytest
from omegaconf import OmegaConf

from engine.build import build_model_config
from engine.config_check import check_config
from engine.schedules import Span, build_schedule
from train_helpers import REPO, compose_cfg

SIZES = ("125m", "355m", "770m")
OPTIMIZERS = ("adamw", "sophia", "lion", "muon")
PAPER = sorted(p.stem for p in (REPO / "configs" / "experiment").glob("paper-*.yaml"))

# Transcribed from Liuhong99/Sophia at commit a7e157229b71d58cf995d32854f1be15c265b350, one column
# per file: config/train_gpt2_small_adam.py, config/train_gpt2_small_sophiag.py,
# config/train_gpt2_medium_adam.py, config/train_gpt2_medium_sophiag.py,
# config/train_gpt2_large_adam.py, config/train_gpt2_large_sophiag.py. A key a file leaves unset
# takes its train script's default (train_adam.py, train_sophiag.py): scale_attn_by_inverse_layer_idx
# True in both, dtype 'bfloat16', decay_lr True. batch_size and gradient_accumulation_steps are per
# GPU (neither script divides by the world size); the README's rule is batch_size x accumulation x
# GPUs = 480 sequences, train_sophiag.py's total_bs = 480 (Sophia's bs = total_bs x block_size).
OFFICIAL_FILES = ("paper-125m-adamw", "paper-125m-sophia", "paper-355m-adamw",
                  "paper-355m-sophia", "paper-770m-adamw", "paper-770m-sophia")
OFFICIAL_TABLE = {
    #                        small    small    medium   medium   large    large
    #                        adam     sophiag  adam     sophiag  adam     sophiag
    "optimizer_name":       ("adamw", "sophiag", "adamw", "sophiag", "adamw", "sophiag"),
    "learning_rate":        (6e-4,    7e-4,    3e-4,    7e-4,    2e-4,    3e-4),
    "min_lr":               (3e-5,    1.5e-5,  6e-5,    1e-5,    1e-5,    1e-5),
    "weight_decay":         (1e-1,    2e-1,    1e-1,    2e-1,    1e-1,    2e-1),
    "beta1":                (0.9,     0.965,   0.9,     0.965,   0.9,     0.965),
    "beta2":                (0.95,    0.99,    0.95,    0.99,    0.95,    0.99),
    "rho":                  (None,    0.05,    None,    0.08,    None,    0.05),
    "interval":             (None,    10,      None,    10,      None,    10),
    "grad_clip":            (1.0,     1.0,     1.0,     1.0,     1.0,     1.0),
    "decay_lr":             (True,    True,    True,    True,    True,    True),
    "warmup_iters":         (2000,    2000,    2000,    2000,    2000,    2000),
    "max_iters":            (100000,  100000,  100000,  100000,  100000,  100000),
    "lr_decay_iters":       (100000,  100000,  100000,  100000,  100000,  100000),
    "batch_size":           (8,       8,       6,       10,      4,       4),
    "gradient_accumulation_steps": (6, 6,      8,       6,       12,      12),
    "total_bs":             (480,     480,     480,     480,     480,     480),
    "block_size":           (1024,    1024,    1024,    1024,    1024,    1024),
    "n_layer":              (12,      12,      24,      24,      36,      36),
    "n_head":               (12,      12,      16,      16,      20,      20),
    "n_embd":               (768,     768,     1024,    1024,    1280,    1280),
    "dropout":              (0.0,     0.0,     0.0,     0.0,     0.0,     0.0),
    "bias":                 (False,   False,   False,   False,   False,   False),
    "scale_attn_by_inverse_layer_idx": (True, True, True, True,  True,    True),
    "eval_interval":        (1000,    1000,    1000,    1000,    1000,    1000),
    "eval_iters":           (200,     200,     200,     200,     200,     200),
    "log_interval":         (10,      10,      10,      10,      10,      10),
    "dtype":                ("bfloat16",) * 6,
    "compile":              (True,    True,    True,    True,    True,    True),
}


def official(preset: str) -> dict:
    column = OFFICIAL_FILES.index(preset)
    return {key: values[column] for key, values in OFFICIAL_TABLE.items()}


def decay_end(train) -> int:
    return train.max_steps if train.decay_steps is None else train.decay_steps


def nanogpt_lr(it: int, o: dict) -> float:
    """get_lr() of train_adam.py / train_sophiag.py at the pinned commit."""
    lr, min_lr, warmup, decay = o["learning_rate"], o["min_lr"], o["warmup_iters"], o["lr_decay_iters"]
    if it < warmup:
        return lr * it / warmup
    if it > decay:
        return min_lr
    coeff = 0.5 * (1.0 + math.cos(math.pi * (it - warmup) / (decay - warmup)))
    return min_lr + coeff * (lr - min_lr)


def test_the_table_covers_every_official_preset_once():
    assert all(len(values) == len(OFFICIAL_FILES) for values in OFFICIAL_TABLE.values())
    for preset in OFFICIAL_FILES:
        o = official(preset)
        # every file's per-GPU batch fills the 480 sequences on a whole number of GPUs (8 or 10)
        assert o["total_bs"] % (o["batch_size"] * o["gradient_accumulation_steps"]) == 0


@pytest.mark.parametrize("preset", OFFICIAL_FILES)
def test_reproduction_preset_equals_the_official_file(preset):
    o, cfg = official(preset), compose_cfg([f"experiment={preset}"])
    opt, train = cfg.optimizer, cfg.train
    assert opt.name == {"adamw": "adamw", "sophiag": "sophia"}[o["optimizer_name"]]
    assert opt.lr == o["learning_rate"]
    assert train.min_lr_ratio == pytest.approx(o["min_lr"] / o["learning_rate"], rel=1e-12)
    assert train.min_lr_ratio * opt.lr == pytest.approx(o["min_lr"], rel=1e-12)
    assert opt.weight_decay == o["weight_decay"]
    assert list(opt.betas) == [o["beta1"], o["beta2"]]
    if o["rho"] is None:
        assert "rho" not in opt and "k" not in opt
    else:
        assert (opt.rho, opt.k) == (o["rho"], o["interval"])
        assert opt.hessian_estimator == "gnb" and opt.hessian_micro_batches is None  # whole batch
    assert opt.decay_rule == "linear_weights"  # model.py: nn.Linear weights decay, nothing else
    assert train.grad_clip == o["grad_clip"]
    assert cfg.schedule.name == ("cosine" if o["decay_lr"] else "constant")
    assert train.warmup_steps == o["warmup_iters"]
    assert train.max_steps == o["max_iters"]
    assert decay_end(train) == o["lr_decay_iters"]
    assert train.global_batch_tokens == o["total_bs"] * o["block_size"]
    assert train.block_size in (None, o["block_size"])
    model = build_model_config(cfg, data_vocab=50257)
    assert (model.n_layer, model.n_head, model.n_embd) == (o["n_layer"], o["n_head"], o["n_embd"])
    assert (model.block_size, model.vocab_size) == (o["block_size"], 50304)
    assert (model.dropout, model.bias) == (o["dropout"], o["bias"])
    assert model.scale_attn_by_inverse_layer_idx is o["scale_attn_by_inverse_layer_idx"]
    assert (train.eval_interval, train.eval_batches) == (o["eval_interval"], o["eval_iters"])
    assert train.log_interval == o["log_interval"]
    assert (cfg.dtype, cfg.compile) == (o["dtype"], o["compile"])
    assert cfg.data.name == "openwebtext"


@pytest.mark.parametrize("preset", OFFICIAL_FILES)
def test_the_schedule_is_nanogpts_get_lr_one_step_ahead_in_warmup(preset):
    """The harness's cosine (engine/schedules.py) at optimizer step s equals the official get_lr at
    iteration s from the end of warmup on; during warmup it equals get_lr(s + 1) (the harness never
    takes a step at lr 0)."""
    o, cfg = official(preset), compose_cfg([f"experiment={preset}"])
    t = cfg.train
    lr = build_schedule(OmegaConf.to_container(cfg.schedule),
                        Span(t.warmup_steps, decay_end(t), t.min_lr_ratio))
    for step in (0, 1, 999, 1998, 1999):
        assert cfg.optimizer.lr * lr(step) == pytest.approx(nanogpt_lr(step + 1, o), rel=1e-9)
    for step in (2000, 2001, 30000, 50000, 99999, 100000, 100001):
        assert cfg.optimizer.lr * lr(step) == pytest.approx(nanogpt_lr(step, o), rel=1e-9)


SHARED = ("schedule", "model", "data", "dtype", "compile", "seed", "train.max_steps",
          "train.decay_steps", "train.warmup_steps", "train.min_lr_ratio", "train.global_batch_tokens",
          "train.micro_batch_size", "train.block_size", "train.grad_clip", "train.eval_interval",
          "train.eval_batches")


def shared(cfg) -> dict:
    return {key: OmegaConf.to_container(OmegaConf.create({"v": OmegaConf.select(cfg, key)}))["v"]
            for key in SHARED}


@pytest.mark.parametrize("size", SIZES)
def test_fair_presets_of_a_size_differ_in_the_optimizer_only(size):
    cfgs = {opt: compose_cfg([f"experiment=paper-{size}-{opt}-fair"]) for opt in OPTIMIZERS}
    first = shared(cfgs["adamw"])
    for opt, cfg in cfgs.items():
        assert cfg.optimizer.name == opt
        assert shared(cfg) == first, opt
    assert first["schedule"] == {"name": "cosine"} and first["train.min_lr_ratio"] == 0.05
    assert first["model"]["scale_attn_by_inverse_layer_idx"] is True
    assert first["train.global_batch_tokens"] == 480 * 1024 and first["train.grad_clip"] == 1.0
    assert (first["train.warmup_steps"], first["train.max_steps"]) == (2000, 100000)
    # the fair AdamW and Sophia keep the official optimizer settings, and nothing else moves
    for opt in ("adamw", "sophia"):
        reproduction = compose_cfg([f"experiment=paper-{size}-{opt}"])
        assert cfgs[opt].optimizer == reproduction.optimizer
        assert {k: v for k, v in shared(reproduction).items() if k != "train.min_lr_ratio"} == \
            {k: v for k, v in first.items() if k != "train.min_lr_ratio"}


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("opt", ("lion", "muon"))
def test_lion_and_muon_names_are_aliases_of_their_fair_presets(size, opt):
    assert compose_cfg([f"experiment=paper-{size}-{opt}"]) == \
        compose_cfg([f"experiment=paper-{size}-{opt}-fair"])


def test_every_size_has_a_preset_and_a_fair_preset_per_optimizer():
    expected = {f"paper-{s}-{o}{fair}" for s in SIZES for o in OPTIMIZERS for fair in ("", "-fair")}
    assert set(PAPER) == expected


@pytest.mark.parametrize("preset", PAPER)
def test_every_paper_preset_passes_the_config_check(preset):
    check_config(compose_cfg([f"experiment={preset}"]))
