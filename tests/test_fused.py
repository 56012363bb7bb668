"""The fused (compiled) step path of SophiaG, SophiaH and Lion.

fused == reference (values, state, telemetry) over many steps with two param groups that differ
in every hyperparameter including maximize, plus Hessian refreshes, and with NaN and infinite
gradients; one pass over memory per tensor in the generated code; the automatic choice; the
validation errors; the compile-failure guard; no recompiles under a changing lr / bs; a
mixed-dtype group on the multi-tensor path; and a tiny run of benchmarks/bench_optim.py.

Compiling on CPU takes seconds, so every compiled test uses the same parameter structure
(SHAPES, one per group, groups sharing it): the whole file compiles three kernels (SophiaG's,
SophiaH's and Lion's) for it, and the bench test reuses them.
"""
from __future__ import annotations

import importlib

import json
import re
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import sophia
import sophia._fused as fused_mod
from sophia import Lion, SophiaG, SophiaH
from sophia.lion import lion
from sophia.sophia import Denominator, SophiaSettings
from sophia.sophia import sophia as sophia_update

SHAPES = [(8, 6), (5,)]  # the structure of each group below, and of the bench test's parameter set


def _params(seed: int = 0) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES + SHAPES]


def _groups(params: list[nn.Parameter], cls: type) -> list[dict]:
    first = {"params": params[:2]}
    second = {"params": params[2:], "lr": 3e-2, "weight_decay": 0.3, "maximize": True,
              "betas": (0.9, 0.95)}
    if cls is not Lion:
        second["rho"] = 0.1
    return [first, second]


def _make(cls: type, fused: bool, seed: int = 0, **kwargs):
    params = _params(seed)
    kwargs = {"lr": 1e-2, "weight_decay": 0.1, **kwargs}
    return params, cls(_groups(params, cls), fused=fused, **kwargs)


def _set_grads(params: list[nn.Parameter], seed: int, scale: float = 1.0) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * scale


def _step(cls: type, params, opt, t: int) -> None:
    """One training step at index t with a Hessian refresh every third step."""
    _set_grads(params, 1000 + t)
    if cls is SophiaG:
        opt.step(bs=16 + t)
    else:
        opt.step()
    if t % 3 == 2 and cls is SophiaG:
        _set_grads(params, 5000 + t, scale=0.1)  # the sampled-label gradient
        opt.update_hessian()
    elif t % 3 == 2 and cls is SophiaH:
        g = torch.Generator().manual_seed(5000 + t)
        # Hutchinson estimates are signed; these are mostly positive, some negative
        opt.update_hessian([(torch.randn(p.shape, generator=g) + 1) * 30 for p in params])


def _reference_and_fused(cls: type):
    """((params, optimizer) on the reference path, the same on the fused path), equal starts."""
    return _make(cls, fused=False, foreach=False), _make(cls, fused=True)


def _step_both(cls: type, ref_params, ref, fus_params, fus, t: int) -> None:
    _step(cls, ref_params, ref, t)
    _step(cls, fus_params, fus, t)


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("sums", ["as on CPU", "as on CUDA"])
@pytest.mark.parametrize("cls", [SophiaG, SophiaH, Lion])
def test_fused_matches_reference(cls: type, sums: str, monkeypatch) -> None:
    if sums == "as on CUDA":
        # the telemetry sums CUDA compiles (row by row, sophia._fused.partial_sums), run on
        # CPU, compiled apart from the CPU form
        monkeypatch.setattr(fused_mod, "_ROWS_FIRST_DEVICE_TYPES", ("cuda", "cpu"))
        monkeypatch.setattr(fused_mod, "_COMPILED", {})
        monkeypatch.setattr(fused_mod, "_WARMED", set())
    (ref_params, ref), (fus_params, fus) = _reference_and_fused(cls)
    for t in range(24):
        _step_both(cls, ref_params, ref, fus_params, fus, t)
        ref_tel, fus_tel = ref.telemetry(), fus.telemetry()
        assert set(ref_tel) == set(fus_tel)
        for k in ref_tel:
            torch.testing.assert_close(fus_tel[k], ref_tel[k], rtol=1e-5, atol=1e-7)
    start = _params()
    for p, q, p0 in zip(fus_params, ref_params, start):
        _close(p, q)
        assert not torch.equal(p, p0)  # it moved
    for p, q in zip(fus_params, ref_params):
        s, r = fus.state[p], ref.state[q]
        assert set(s) == set(r)
        for key in s:
            if key == "step":
                assert s[key].item() == r[key].item() == 24 and s[key].device.type == "cpu"
            else:
                _close(s[key], r[key])
    if cls is not Lion:  # the comparison of clip_frac is not trivially all or nothing
        assert 0.0 < fus.telemetry()["clip_frac"].item() < 1.0


@pytest.mark.slow
@pytest.mark.parametrize("cls", [SophiaG, SophiaH, Lion])
def test_fused_treats_nan_and_inf_gradients_as_the_reference_does(cls: type) -> None:
    # The fused kernels use cheaper forms than the reference (clamp(m / d) for sign and min,
    # u^2 >= 1 for the clip test): a NaN must still land where the reference puts one, and an
    # infinite m must still clip.
    (ref_params, ref), (fus_params, fus) = _reference_and_fused(cls)
    for t in range(3):
        _step_both(cls, ref_params, ref, fus_params, fus, t)
    for params, opt in ((ref_params, ref), (fus_params, fus)):
        _set_grads(params, 99)
        for p in params[:2]:
            p.grad.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
        opt.step(**({"bs": 20} if cls is SophiaG else {}))
    for p, q in zip(fus_params, ref_params):
        assert torch.equal(p.isnan(), q.isnan())
        _close(p.nan_to_num(0.0), q.nan_to_num(0.0))
    if cls is not Lion:  # Sophia: a NaN gradient poisons its parameter, infinities clip
        assert fus_params[0].view(-1)[0].isnan() and fus_params[0].view(-1)[1:3].isfinite().all()
    for key in fus.telemetry():
        torch.testing.assert_close(fus.telemetry()[key], ref.telemetry()[key], equal_nan=True)


@pytest.mark.parametrize("cls", [SophiaG, Lion])
def test_a_group_mixing_dtypes_steps_like_the_reference(cls: type) -> None:
    # The multi-tensor paths regroup a group's tensors by (device, dtype) every step; the
    # single-dtype case takes a shortcut, so check the regrouping keeps every tensor aligned.
    def make(foreach: bool):
        g = torch.Generator().manual_seed(3)
        params = [nn.Parameter(torch.randn(4, generator=g, dtype=d))
                  for d in (torch.float32, torch.float64, torch.float32, torch.float64)]
        return params, cls(params, lr=1e-2, foreach=foreach, fused=False)

    (ref_params, ref), (multi_params, multi) = make(False), make(True)
    for t in range(4):
        for params, opt in ((ref_params, ref), (multi_params, multi)):
            g = torch.Generator().manual_seed(10 + t)
            for p in params:
                p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
            opt.step()
            if cls is SophiaG:
                opt.update_hessian()
    for p, q in zip(multi_params, ref_params):
        assert p.dtype == q.dtype
        torch.testing.assert_close(p, q)
        for key in ref.state[q]:
            torch.testing.assert_close(multi.state[p][key], ref.state[q][key])


@pytest.mark.slow
def test_fused_sophiag_telemetry_matches_state() -> None:
    params, opt = _make(SophiaG, fused=True, lr=2e-2, rho=0.05)
    for t in range(5):
        _step(SophiaG, params, opt, t)
    bs = 40
    _set_grads(params, 77)
    opt.step(bs=bs)
    tel = opt.telemetry()
    clipped, ratio_sq, numel = 0.0, 0.0, 0
    for group in opt.param_groups:
        for p in group["params"]:
            m, h = opt.state[p]["exp_avg"], opt.state[p]["hessian"]
            ratio = (m.abs() / (group["rho"] * bs * h + 1e-15)).clamp(max=1)
            clipped += (m.abs() >= group["rho"] * bs * h).sum().item()
            ratio_sq += (group["lr"] * ratio).square().sum().item()
            numel += p.numel()
    assert 0 < clipped < numel
    torch.testing.assert_close(tel["clip_frac"].item(), clipped / numel)
    rms = (ratio_sq / numel) ** 0.5
    torch.testing.assert_close(tel["update_rms"].item(), rms, rtol=1e-5, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("cls", [SophiaG, Lion])
def test_changing_lr_and_bs_do_not_recompile(cls: type) -> None:
    from torch._dynamo.utils import counters

    params, opt = _make(cls, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
    _step(cls, params, opt, 0)  # compiles (or reuses) the kernel for this structure
    sched.step()
    graphs = counters["stats"]["unique_graphs"]
    lrs = set()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for t in range(1, 6):
            _step(cls, params, opt, t)  # SophiaG: bs changes every step too
            lrs.add(opt.param_groups[0]["lr"])
            sched.step()
    assert len(lrs) == 5
    assert counters["stats"]["unique_graphs"] == graphs


# ------------------------------------------------------------------------------ path choice


@pytest.mark.parametrize("cls", [SophiaG, SophiaH, Lion])
def test_automatic_choice_on_cpu_keeps_the_eager_paths(cls: type, monkeypatch) -> None:
    def no_compile(*args, **kwargs):
        raise AssertionError("fused=None compiled on CPU")

    monkeypatch.setattr(torch, "compile", no_compile)
    compiled = sophia.fused_cache_size()
    p = nn.Parameter(torch.ones(3))  # a structure no other test compiles
    opt = cls([p], lr=0.1)
    p.grad = torch.ones(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning either: the fused path was not tried
        opt.step()
    assert not torch.equal(p, torch.ones(3))
    assert sophia.fused_cache_size() == compiled
    assert opt.param_groups[0]["fused"] is None
    assert not fused_mod.default_fused([p])
    assert fused_mod.choose_path(opt.param_groups[0], [p]) == (False, False)


def test_choose_path_rules(monkeypatch) -> None:
    p = [torch.zeros(2)]
    monkeypatch.setattr(fused_mod, "default_fused", lambda params: True)  # as on CUDA
    choose = fused_mod.choose_path
    assert choose({"fused": None, "foreach": None}, p) == (False, True)
    assert choose({"fused": None, "foreach": True}, p) == (True, False)  # explicit foreach wins
    assert choose({"fused": None, "foreach": None}, p, allow_fused=False) == (False, False)
    assert choose({"fused": False, "foreach": None}, p) == (False, False)
    assert choose({"fused": True, "foreach": None}, p) == (False, True)
    assert choose({"fused": True, "foreach": False}, p) == (False, True)


def test_default_fused_wants_cuda_or_a_big_cpu_group() -> None:
    big = fused_mod.CPU_FUSED_MIN_NUMEL
    assert not fused_mod.default_fused([])
    assert not fused_mod.default_fused([torch.zeros(2)])  # small CPU group: not worth compiling
    assert fused_mod.default_fused([torch.zeros(1).expand(big - 5), torch.zeros(5)])
    assert not fused_mod.default_fused([torch.zeros(1, dtype=torch.complex64).expand(big)])
    assert not fused_mod.default_fused([torch.zeros(1).expand(big), torch.zeros(2, device="meta")])
    assert not fused_mod.default_fused([torch.zeros(big, device="meta")])


@pytest.mark.parametrize("cls", [SophiaG, SophiaH, Lion])
def test_fused_and_foreach_together_is_an_error(cls: type) -> None:
    p = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=r"fused=True and foreach=True.*Pass only one"):
        cls([p], fused=True, foreach=True)
    with pytest.raises(ValueError, match=r"fused=True and foreach=True.*param group 0"):
        cls([{"params": [p], "foreach": True}], fused=True)
    cls([p], fused=False, foreach=True)  # fine


def test_functional_api_rejects_fused_with_foreach() -> None:
    p = torch.zeros(2)
    settings = SophiaSettings(lr=0.1, beta1=0.9, weight_decay=0.0, maximize=False,
                              denominator=Denominator(0.1, shift=1e-15))
    with pytest.raises(ValueError, match="fused=True and foreach=True"):
        sophia_update([p], [p], [p], [p], [torch.tensor(0.0)], settings, foreach=True, fused=True)
    with pytest.raises(ValueError, match="fused=True and foreach=True"):
        lion([p], [p], [p], beta1=0.9, beta2=0.99, lr=0.1, weight_decay=0.0, maximize=False,
             foreach=True, fused=True)


@pytest.mark.parametrize("cls", [SophiaG, SophiaH, Lion])
def test_fused_rejects_unsupported_dtypes_and_devices(cls: type) -> None:
    with pytest.raises(ValueError, match=r"parameter 1 is complex64.*fused=False"):
        cls([nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2, dtype=torch.complex64))],
            fused=True)
    with pytest.raises(ValueError, match=r"parameter 0 is on 'meta'.*fused=False"):
        cls([nn.Parameter(torch.zeros(2, device="meta"))], fused=True)
    # fused=None is not an error: those parameters take the other paths
    cls([nn.Parameter(torch.zeros(2, dtype=torch.complex64))])


def _compile_eagerly(monkeypatch, failing_from: int | None = None) -> list[int]:
    """torch.compile replaced by the kernel itself, run eagerly (no compile time); from the
    `failing_from`-th compiled structure on, it fails as a missing compiler would. Returns the
    list of chunk sizes the kernels were called with."""
    calls: list[int] = []
    compiled = [0]

    def fake_compile(fn, **kwargs):
        compiled[0] += 1
        fails = failing_from is not None and compiled[0] >= failing_from

        def run(*args):
            if fails:
                raise RuntimeError("CppCompileError: no working C++ compiler")
            calls.append(len(args[0]))
            return fn(*args)
        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    sophia.clear_fused_cache()  # or the kernels earlier tests compiled would be reused
    return calls


def _broken_compiler(monkeypatch) -> None:
    """torch.compile as it behaves without a C++ compiler: the error comes at the first call."""
    _compile_eagerly(monkeypatch, failing_from=1)
    assert sophia.fused_cache_size() == 0


def test_compile_failure_with_fused_true_raises_and_changes_nothing(monkeypatch) -> None:
    _broken_compiler(monkeypatch)
    p = nn.Parameter(torch.ones(3))
    opt = SophiaG([p], lr=0.1, fused=True)
    p.grad = torch.ones(3)
    match = r"could not build the fused step.*C\+\+ compiler.*fused=False"
    with pytest.raises(RuntimeError, match=match):
        opt.step()
    assert torch.equal(p, torch.ones(3))
    assert opt.state[p]["step"].item() == 0 and torch.equal(opt.state[p]["exp_avg"], torch.zeros(3))
    assert sophia.fused_cache_size() == 0  # the failed kernel is not kept: a retry compiles again


@pytest.mark.parametrize("cls", [SophiaG, SophiaH, Lion])
def test_compile_failure_with_fused_none_falls_back(cls: type, monkeypatch) -> None:
    _broken_compiler(monkeypatch)
    monkeypatch.setattr(fused_mod, "default_fused", lambda params: True)  # as on CUDA
    params, opt = _make(cls, fused=None)
    ref_params, ref = _make(cls, fused=False)
    with pytest.warns(RuntimeWarning, match="Falling back to the non-fused path"):
        _step(cls, params, opt, 0)
    _step(cls, ref_params, ref, 0)
    for t in range(1, 3):  # no second warning, and the same numbers as the reference
        _step(cls, params, opt, t)
        _step(cls, ref_params, ref, t)
    for p, q in zip(params, ref_params):
        _close(p, q)
    for k, v in ref.telemetry().items():
        torch.testing.assert_close(opt.telemetry()[k], v)
    assert sophia.fused_cache_size() == 0


@pytest.mark.parametrize("cls", [SophiaG, SophiaH, Lion])
def test_fused_step_is_cut_into_chunks_that_give_the_reference_result(cls, monkeypatch) -> None:
    calls = _compile_eagerly(monkeypatch)
    monkeypatch.setattr(fused_mod, "MAX_TENSORS_PER_KERNEL", 2)
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 2), (3, 2), (4,), (3, 2), (3, 2)]
    params = [nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    ref_params = [nn.Parameter(p.detach().clone()) for p in params]
    opt = cls(params, lr=1e-2, weight_decay=0.1, fused=True)
    ref = cls(ref_params, lr=1e-2, weight_decay=0.1, fused=False)
    for t in range(3):
        _step(cls, params, opt, t)
        _step(cls, ref_params, ref, t)
    assert calls == [2, 2, 1] * 3  # chunks of at most 2 tensors, each stepped once per step
    # (3,2)+(3,2) twice is one structure, (4,)+(3,2) and (3,2) are two more
    assert sophia.fused_cache_size() == 3
    for p, q in zip(params, ref_params):
        _close(p, q)
    for k, v in ref.telemetry().items():
        torch.testing.assert_close(opt.telemetry()[k], v)


@pytest.mark.parametrize("fused", [True, None])
def test_compile_failure_after_a_stepped_chunk_is_not_retried(fused, monkeypatch) -> None:
    # A retry on another path would step the first chunk's tensors twice.
    _compile_eagerly(monkeypatch, failing_from=2)
    monkeypatch.setattr(fused_mod, "MAX_TENSORS_PER_KERNEL", 2)
    monkeypatch.setattr(fused_mod, "default_fused", lambda params: True)  # as on CUDA
    params = [nn.Parameter(torch.ones(2)) for _ in range(3)]
    opt = SophiaG(params, lr=0.1, fused=fused)
    for p in params:
        p.grad = torch.ones(2)
    with pytest.raises(RuntimeError, match=r"first 2 of this group's 3 tensors were already "
                       r"stepped.*fused=False") as err:
        opt.step()
    assert not isinstance(err.value, fused_mod.FusedCompileError)
    assert not torch.equal(params[0], torch.ones(2)) and torch.equal(params[2], torch.ones(2))


def _vector_traffic(code: str, n: int) -> tuple[int, int]:
    """(vector loads, vector stores) in the generated CPU loops that run over n elements."""
    loop = r"for\(int64_t x0=static_cast<int64_t>\(0L\); x0<static_cast<int64_t>\((\d+)L\)"
    parts = re.split(loop, code)
    loads = stores = 0
    for bound, body in zip(parts[1::2], parts[2::2]):
        if int(bound) == n:
            body = body.split("#pragma omp")[0]
            loads, stores = loads + body.count("loadu("), stores + body.count(".store(")
    return loads, stores


# (module of the kernel, its hyperparameters, flags, tensor lists it reads, lists it writes back)
_ONE_PASS_CASES = {
    "SophiaG": ("sophia", (1.0, 0.99, 0.9, 0.1, 20.0, 1e-15, float("-inf"), -1e-3), (True, False),
                4, 2),
    "SophiaH": ("sophia", (1.0, 0.99, 0.9, 0.1, 0.05, 0.0, 1e-12, -1e-3), (False, True), 4, 2),
    "Lion": ("lion", (1.0, 0.99, 0.9, 0.1, 0.99, 0.01, -1e-3), (), 3, 2),
}


def _one_pass_case(name: str, shapes: list[tuple[int, ...]], device: str = "cpu"):
    """(kernel, tensor lists it reads with one tensor per shape, scalars, flags, reads, writes)
    of _ONE_PASS_CASES[name]."""
    module, values, flags, reads, writes = _ONE_PASS_CASES[name]
    kernel = getattr(sophia, module).__dict__[f"_fused_{module}_kernel"]
    lists = [[torch.rand(s, device=device) for s in shapes] for _ in range(reads)]
    hyper = fused_mod.scalars(torch.device(device), torch.float32, *values)
    return kernel, lists, hyper, flags, reads, writes


@pytest.mark.slow
@pytest.mark.parametrize("name", list(_ONE_PASS_CASES))
def test_each_chunk_reads_and_writes_every_tensor_once(name: str) -> None:
    # The fused step is worth having only as one pass over memory per tensor, telemetry sums
    # included. Inductor can silently lose that: over many tensors it stored every
    # coordinate's clip ratio to a temporary and read it back (the reason for the chunks), and exact rewrites of the maths made it store m from a second loop that
    # reads g and m again. Checked on the generated code, by counting its vector loads and stores.
    from torch._inductor.utils import run_and_get_code

    # a size no other test compiles, a multiple of every vector width (no tail loops), over the
    # 4096 at which inductor's CPU sums change
    n = 4112
    count = 2 * fused_mod.MAX_TENSORS_PER_KERNEL + 8
    kernel, lists, hyper, flags, reads, writes = _one_pass_case(name, [(n,)] * count)
    with torch.no_grad():
        _, codes = run_and_get_code(fused_mod.run_fused, kernel, lists, hyper, flags)
    assert len(codes) == 2  # the two full chunks share one compiled step, the rest is another
    if "loadu(" not in codes[0]:
        pytest.skip("inductor generated scalar (not vectorised) code on this CPU")
    full, rest = _vector_traffic(codes[0], n), _vector_traffic(codes[1], n)
    chunk = fused_mod.MAX_TENSORS_PER_KERNEL
    assert full == (reads * chunk, writes * chunk), f"{name}: {full} for {chunk} tensors"
    assert rest == (reads * 8, writes * 8), f"{name}: {rest} for 8 tensors"
    assert all(f"empty_strided_cpu(({n}, )" not in code for code in codes)

    if name == "Lion":
        # What the fusion heuristics of sophia._fused prevent: with inductor's defaults, the
        # same chunk of Lion stores m from a second loop (read g and m again); the counts see it.
        from torch._inductor.choices import InductorChoices
        from torch._inductor.virtualized import V

        chunk_lists = [tensors[:chunk] for tensors in lists]
        plain = torch.compile(fused_mod._with_own_code(kernel), dynamic=False, fullgraph=True,
                              options={"size_asserts": False})
        with torch.no_grad(), V.set_choices_handler(InductorChoices()):
            _, (default,) = run_and_get_code(plain, *chunk_lists, *hyper, *flags)
        if _vector_traffic(default, n) == full:
            pytest.skip(f"inductor's default heuristics in torch {torch.__version__} fuse a "
                        "chunk of Lion in one pass too")
        assert _vector_traffic(default, n)[0] > reads * chunk


@pytest.mark.slow
def test_the_fusion_heuristics_stay_inside_the_fused_step() -> None:
    # The lifted distance limit is for the optimizer's in-place updates only: a model compiled
    # afterwards in the same thread gets inductor's own heuristics back.
    from torch._inductor.virtualized import V

    params, opt = _make(Lion, fused=True)
    before = V.choices
    _step(Lion, params, opt, 0)
    assert V.choices is before and not isinstance(V.choices, fused_mod._OnePassFusion)


def test_compile_options_follow_what_inductor_offers(monkeypatch) -> None:
    # The handler must reach inductor's cache key, or the cache must be skipped; and a torch
    # without the heuristics hook compiles as before (chunks only). Inductor's config module is
    # replaced by a stand-in: the real one refuses to be given a key it lacks (torch 2.11 has
    # no _cache_config_factory_keys), so each torch could only check its own branch.
    import torch._inductor

    def options_with(hook, **config):
        fused_mod._compile_options.cache_clear()
        monkeypatch.setattr(fused_mod, "_fusion_hook", lambda: hook)
        monkeypatch.setattr(torch._inductor, "config", SimpleNamespace(**config))
        return fused_mod._compile_options()

    try:
        keyed = options_with(object(), _cache_config_factory_keys=["inductor_choices_class"])
        assert keyed["inductor_choices_class"] is fused_mod._OnePassFusion
        assert "fx_graph_cache" not in keyed
        assert options_with(object(), _cache_config_factory_keys=[])["fx_graph_cache"] is False
        assert options_with(object())["fx_graph_cache"] is False
        assert options_with(None, _cache_config_factory_keys=["inductor_choices_class"]) == {
            "size_asserts": False}
    finally:
        monkeypatch.undo()
        fused_mod._compile_options.cache_clear()
    # what this torch gets are options its inductor has (torch.compile refuses unknown ones)
    from torch._inductor import config

    assert set(fused_mod._compile_options()) <= set(config.get_config_copy())
    # the key names the rule and its threshold, so a change of either never reuses old code
    assert str(fused_mod._MIN_SHARED_BYTES_TO_FUSE_FAR) in fused_mod._OnePassFusion().uuid()


def test_state_dict_keeps_and_defaults_fused() -> None:
    params, opt = _make(SophiaG, fused=False)
    _step(SophiaG, params, opt, 0)
    sd = opt.state_dict()
    assert all(g["fused"] is False for g in sd["param_groups"])
    for g in sd["param_groups"]:
        del g["fused"]  # as saved by the official code or before the fused path existed
    opt.load_state_dict(sd)
    assert all(g["fused"] is None for g in opt.param_groups)


# ------------------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("cls", [SophiaG, SophiaH, Lion])
def test_fused_matches_reference_on_cuda(cls: type) -> None:
    def to_cuda(params):
        return [nn.Parameter(p.detach().cuda()) for p in params]

    ref_params, fus_params = to_cuda(_params()), to_cuda(_params())
    ref = cls(_groups(ref_params, cls), lr=1e-2, weight_decay=0.1, fused=False, foreach=False)
    fus = cls(_groups(fus_params, cls), lr=1e-2, weight_decay=0.1)  # fused=None: picks fused
    assert fused_mod.choose_path(fus.param_groups[0], fus_params) == (False, True)
    for t in range(12):
        for params, opt in ((ref_params, ref), (fus_params, fus)):
            g = torch.Generator().manual_seed(1000 + t)
            for p in params:
                p.grad = torch.randn(p.shape, generator=g).cuda()
            opt.step(**({"bs": 16 + t} if cls is SophiaG else {}))
            if t % 3 == 2 and cls is SophiaG:
                opt.update_hessian()
            elif t % 3 == 2 and cls is SophiaH:
                opt.update_hessian([p.grad * 0.5 for p in params])
    for p, q in zip(fus_params, ref_params):
        _close(p, q)
    for k, v in ref.telemetry().items():
        torch.testing.assert_close(fus.telemetry()[k], v, rtol=1e-5, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["SophiaG", "Lion"])  # SophiaH's kernel is SophiaG's
def test_each_chunk_is_one_pass_in_the_compiled_cuda_code(name: str) -> None:
    # The CUDA twin of the CPU test above, on the Triton code inductor compiles here: every
    # full-size load and store counted (benchmarks/cuda_kernels.py's reader) comes to one pass.
    # Shapes whose whole-tensor sums inductor would split across rows (tests/test_cuda_kernels.py).
    from torch._inductor.utils import run_and_get_code

    shapes = [(768, 3072), (3072,), (768, 2304)]
    kernel, lists, hyper, flags, reads, writes = _one_pass_case(name, shapes, "cuda")
    with torch.no_grad():
        _, codes = run_and_get_code(fused_mod.run_fused, kernel, lists, hyper, flags)
    cuda_kernels = importlib.import_module("benchmarks.cuda_kernels")
    moved = cuda_kernels.bytes_moved(cuda_kernels.kernel_launches(codes[0]))
    per_param = moved / sum(torch.Size(s).numel() for s in shapes)
    floor = 4 * (reads + writes)
    assert floor <= per_param < 1.01 * floor, f"{name}: {per_param:.2f} bytes per coordinate"


# ---------------------------------------------------------------------------- bench_optim.py


def _load_bench():
    return importlib.import_module("benchmarks.bench_optim")


@pytest.mark.slow
def test_bench_optim_main_writes_wellformed_rows(tmp_path, capsys) -> None:
    bench = _load_bench()
    out = tmp_path / "bench.json"
    shapes = ",".join("x".join(map(str, s)) for s in SHAPES)
    rc = bench.main(["--shapes", shapes, "--device", "cpu", "--repeats", "3", "--warmup", "1",
                     "--copy-mb", "4", "--access-floor", "--noise-check", "--json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["device"] and result["torch"] == torch.__version__ and result["command"]
    [model] = result["models"]
    n = sum(torch.Size(s).numel() for s in SHAPES)
    assert model["params"] == n
    assert result["copy_gbps"] > 0
    got = {(r["optimizer"], r["path"]) for r in model["rows"]}
    assert got >= {("adamw", "foreach"), ("adamw", "fused"), ("lion", "reference"),
                   ("lion", "foreach"), ("lion", "fused"), ("sophia", "reference"),
                   ("sophia", "foreach"), ("sophia", "fused"), ("adamw", "fused-twin")}
    floors = {r["path"]: r for r in model["rows"] if r["optimizer"] == "floor"}
    assert set(floors) == {"4R/3W", "4R/2W", "3R/2W"}  # AdamW's, the Sophias', Lion's
    floor = {"adamw": 28, "lion": 20, "sophia": 24, "floor": None}
    pattern = {"adamw": "4R/3W", "lion": "3R/2W", "sophia": "4R/2W"}
    for r in model["rows"]:
        assert r["ms_per_step"] > 0 and r["gbps"] > 0 and r["copy_fraction"] > 0
        if r["optimizer"] == "floor":  # 4 bytes per tensor read or written
            reads, writes = int(r["path"][0]), int(r["path"][3])
            assert r["bytes_per_step"] == 4 * (reads + writes) * n and r["vs_floor"] == 1.0
            continue
        assert r["floor_ms"] == floors[pattern[r["optimizer"]]]["ms_per_step"]
        assert r["vs_floor"] == pytest.approx(r["ms_per_step"] / r["floor_ms"])
        assert r["bytes_per_step"] == floor[r["optimizer"]] * n
        assert r["gbps"] == pytest.approx(r["bytes_per_step"] / (r["ms_per_step"] * 1e-3) / 1e9)
        assert r["vs_adamw_foreach"] > 0 and r["vs_adamw_fused"] > 0
        # time until step() returned, per repeat never more than the synchronised time
        assert 0 < r["host_ms_per_step"] <= r["ms_per_step"]
    rows = {(r["optimizer"], r["path"]): r for r in model["rows"]}
    twin, first = rows[("adamw", "fused-twin")], rows[("adamw", "fused")]
    assert twin["vs_adamw_fused"] == pytest.approx(twin["ms_per_step"] / first["ms_per_step"])
    table = capsys.readouterr().out
    assert "sophia" in table and "ms/step" in table and "vs floor" in table
    assert "fused-twin" in table
    assert result["inductor_config"] == {}


def test_bench_optim_table_shows_host_time_on_cuda_only(capsys) -> None:
    bench = _load_bench()
    row = {"optimizer": "sophia", "path": "fused", "ms_per_step": 2.0, "host_ms_per_step": 1.5,
           "gbps": 1.0, "copy_fraction": 0.5, "vs_adamw_foreach": None, "vs_adamw_fused": 0.9,
           "vs_floor": None, "first_step_s": 3.0}
    result = {"device": "x", "threads": 1, "torch": "t", "copy_gbps": 2.0,
              "models": [{"name": "m", "params": 10, "tensors": 1, "rows": [row]}]}
    bench.print_table({**result, "device_type": "cpu"})
    assert "host ms" not in capsys.readouterr().out
    bench.print_table({**result, "device_type": "cuda"})
    table = capsys.readouterr().out
    assert "host ms" in table.splitlines()[-2] and table.splitlines()[-1].endswith(" 1.50")


def test_bench_optim_noise_check_needs_fused_adamw() -> None:
    bench = _load_bench()
    assert bench.parse_args(["--noise-check"]).noise_check  # the defaults include both
    for argv in (["--optimizers", "sophia"], ["--paths", "foreach"]):
        with pytest.raises(SystemExit):
            bench.parse_args(["--noise-check", *argv])


def test_bench_optim_sets_inductor_options_for_its_run_only(monkeypatch) -> None:
    from torch._inductor import config

    bench = _load_bench()
    args = bench.parse_args(["--inductor-config", "combo_kernels=True",
                             "--inductor-config", "cpp.threads=2"])
    assert args.inductor_config == {"combo_kernels": True, "cpp.threads": 2}
    for bad in ("no_such_option=1", "combo_kernels"):
        with pytest.raises(SystemExit):
            bench.parse_args(["--inductor-config", bad])

    seen = []

    def bench_model(*args, **kwargs):
        seen.append(config.combo_kernels)
        raise KeyboardInterrupt  # enough: the options are in force while models are measured

    monkeypatch.setattr(bench, "bench_model", bench_model)
    monkeypatch.setattr(bench, "copy_bandwidth", lambda *args: 1.0)
    assert config.combo_kernels is False
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--shapes", "4", "--device", "cpu", "--inductor-config", "combo_kernels=True"])
    assert seen == [True] and config.combo_kernels is False


@pytest.mark.slow
def test_fused_cache_is_shared_and_clearable() -> None:
    # last in the file: it empties the cache the tests above fill
    params, opt = _make(SophiaG, fused=True)
    _step(SophiaG, params, opt, 0)
    params, opt = _make(SophiaH, fused=True)
    _step(SophiaH, params, opt, 0)
    compiled = sophia.fused_cache_size()
    assert compiled >= 2  # SophiaG's denominator has a shift, SophiaH's a floor: two kernels
    for cls in (SophiaG, SophiaH):  # a second optimizer over the same structure reuses the step
        params, opt = _make(cls, fused=True, seed=1)
        _step(cls, params, opt, 0)
        assert sophia.fused_cache_size() == compiled
    sophia.clear_fused_cache()
    assert sophia.fused_cache_size() == 0
    _step(SophiaH, params, opt, 1)  # compiles afresh
    assert sophia.fused_cache_size() == 1
