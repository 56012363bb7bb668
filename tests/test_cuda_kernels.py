"""benchmarks/cuda_kernels.py: reading inductor's CUDA code, and the fused steps' CUDA code itself.

The reader is checked on a hand-made wrapper everywhere. Where the `triton` package is installed
(the dev extra brings it; no GPU needed), the fused steps are lowered for a pretended H100 and
must move no more bytes than one pass; tests/test_fused.py makes the same check on a real GPU.
"""
from __future__ import annotations

import importlib

import pytest
import torch

from sophia import fused_cache_size

cuda_kernels = importlib.import_module("benchmarks.cuda_kernels")

# Two kernels in the form inductor writes them (trimmed): a looped reduction that updates a
# 768 x 3072 tensor in place and stores one sum per row, and the sum of those 768 row sums.
_WRAPPER = """
triton_red_fused_0 = async_compile.triton('triton_red_fused_0', '''
@triton_heuristics.reduction(
    size_hints={'x': 1024, 'r0_': 4096},
    inductor_meta={'kernel_name': 'triton_red_fused_0', 'num_load': 3, 'num_store': 2},
    triton_meta={'signature': {'in_ptr0': '*fp32', 'in_ptr1': '*bf16', 'in_ptr2': '*fp32', 'out_ptr0': '*fp32', 'out_ptr1': '*fp32', 'xnumel': 'i32', 'r0_numel': 'i32'}},
)
@triton.jit
def triton_red_fused_0(in_ptr0, in_ptr1, in_ptr2, out_ptr0, out_ptr1, xnumel, r0_numel, XBLOCK : tl.constexpr, R0_BLOCK : tl.constexpr):
    xnumel = 768
    r0_numel = 3072
    tmp1 = tl.load(in_ptr2 + (0))
    for r0_offset in tl.range(0, r0_numel, R0_BLOCK):
        tmp0 = tl.load(in_ptr0 + (r0_1 + 3072*x0), r0_mask & xmask, eviction_policy='evict_first', other=0.0)
        tmp2 = tl.load(in_ptr1 + (r0_1 + 3072*x0), r0_mask & xmask, other=0.0)
        tl.store(out_ptr0 + (r0_1 + 3072*x0), tmp3, r0_mask & xmask)
    tl.store(out_ptr1 + (x0), tmp4, xmask)
''', device_str='cuda')

triton_per_fused_sum_1 = async_compile.triton('triton_per_fused_sum_1', '''
@triton_heuristics.persistent_reduction(
    triton_meta={'signature': {'in_ptr0': '*fp32', 'out_ptr0': '*fp32', 'xnumel': 'constexpr', 'r0_numel': 'i32'}},
)
@triton.jit
def triton_per_fused_sum_1(in_ptr0, out_ptr0, xnumel, r0_numel, XBLOCK : tl.constexpr):
    xnumel = 1
    r0_numel = 768
    tmp0 = tl.load(in_ptr0 + (r0_0), r0_mask, eviction_policy='evict_first', other=0.0)
    tl.store(out_ptr0 + (tl.full([1, 1], 0, tl.int32).broadcast_to(XBLOCK, 1)), tmp1, None)
''', device_str='cuda')

def call(args):
    with torch.cuda._DeviceGuard(0):
        triton_red_fused_0.run(arg0_1, arg1_1, arg2_1, arg0_1, buf0, 768, 3072, stream=stream0)
        triton_red_fused_0.run(arg3_1, arg4_1, arg2_1, arg3_1, buf1, 768, 3072, stream=stream0)
        triton_per_fused_sum_1.run(buf0, buf2, 1, 768, stream=stream0)
"""


def test_the_reader_counts_full_size_accesses_and_launches() -> None:
    launches = cuda_kernels.kernel_launches(_WRAPPER)
    assert [launch.kernel for launch in launches] == [
        "triton_red_fused_0", "triton_red_fused_0", "triton_per_fused_sum_1"]
    n = 768 * 3072
    big = launches[0]
    assert big.numels == (768, 3072)
    # fp32 + bf16 tensors and one fp32 scalar read; one fp32 tensor and 768 row sums written
    assert (big.bytes_read, big.bytes_written) == (4 * n + 2 * n + 4, 4 * n + 4 * 768)
    small = launches[2]
    assert small.numels == (1, 768)
    assert (small.bytes_read, small.bytes_written) == (4 * 768, 4)


def test_the_reader_refuses_kernels_it_cannot_size_or_count() -> None:
    dynamic = _WRAPPER.replace("    xnumel = 768\n", "")
    with pytest.raises(ValueError, match="no static xnumel"):
        cuda_kernels.kernel_launches(dynamic)
    # a load written in a form the reader does not know: inductor's own count disagrees
    unknown = _WRAPPER.replace("tmp2 = tl.load(in_ptr1 + (", "tmp2 = tl.load(in_ptr1 +(")
    with pytest.raises(ValueError, match="2 loads read where inductor states 3"):
        cuda_kernels.kernel_launches(unknown)


# 2-D tensors whose whole-tensor sum inductor splits across rows on CUDA, and a 1-D one
_SHAPES = "768x3072,3072,768x2304"


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["sophia", "lion"])
def test_fused_steps_are_one_pass_in_the_cuda_code(optimizer: str) -> None:
    pytest.importorskip("triton", reason="generating CUDA code needs the triton package")
    floor = cuda_kernels.bench_optim.bytes_floor(optimizer)
    cached = fused_cache_size()
    result = cuda_kernels.inspect(optimizer, shapes=_SHAPES)
    assert fused_cache_size() == cached  # the process's compiled steps are left alone
    assert result["chunk_calls"] == 1
    # one pass: the floor, plus the row sums and the scalars (well under 1%)
    assert floor <= result["bytes_per_param"] < floor * 1.01, result
    # one kernel per tensor, and one launch per telemetry sum to add up the partial sums
    sums = {"sophia": 2, "lion": 1}[optimizer]
    assert result["launches"] <= 3 + sums, result

    # inductor's combo kernels (several kernels per launch, not enabled): one pass as well
    combo = cuda_kernels.inspect(optimizer, shapes=_SHAPES,
                                 inductor_config={"combo_kernels": True})
    assert floor <= combo["bytes_per_param"] < floor * 1.01, combo
    assert combo["launches"] < result["launches"], combo


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["sophia", "lion"])
def test_whole_tensor_sums_would_cost_a_second_pass(optimizer: str) -> None:
    # What the row-first sums prevent: with whole-tensor sums, the CUDA step stores a
    # parameter-sized temporary and reads it back (the test sees it). Older inductors (torch
    # 2.9) keep such sums in the one pass, and then there is nothing to prevent.
    pytest.importorskip("triton", reason="generating CUDA code needs the triton package")
    floor = cuda_kernels.bench_optim.bytes_floor(optimizer)
    before = cuda_kernels.inspect(optimizer, shapes=_SHAPES, rows_first=False)
    if before["bytes_per_param"] < floor * 1.01:
        pytest.skip(f"torch {torch.__version__}'s inductor keeps whole-tensor sums in one pass "
                    "on CUDA as well")
    assert before["bytes_per_param"] > floor * 1.3, before
