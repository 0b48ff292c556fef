#!/usr/bin/env bash
# One device call: the gpu tests of the FP8 kernels and of the bf16 block-sparse kernel (which
# shares its loop), then the kernel benchmark's FP8 rows at the HunyuanVideo shape.
export PYTHONPATH=$PWD ADASPA_KERNEL_GPU_EXAMPLES=6
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 110 python -m pytest -m gpu -q tests/kernels/test_fp8.py \
  "tests/kernels/test_kernels.py::test_block_sparse_gpu" 2>&1 | tail -4
timeout 110 python benchmarks/kernel_speed.py --shapes hunyuan --densities 1.0,0.2 --no-flex \
  --peers none --rep 50 2>&1 | grep -v Warn | grep -i "cudnn\|fp8\|block-sparse\|check\|err" | tail -24
