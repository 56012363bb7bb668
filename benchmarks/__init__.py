"""Benchmarks and the GPU pack, run from the repository root as modules:
``python -m benchmarks.bench_optim``, ``benchmarks.bench_train``, ``benchmarks.bench_hessian``,
``benchmarks.bench_data``, ``benchmarks.cuda_kernels``; ``bash benchmarks/gpu_check.sh`` runs the
GPU pack. ``common`` holds what they share. What each measures: docs/benchmarks.md.
"""
