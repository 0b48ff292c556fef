#!/usr/bin/env bash
# One device call: the gpu tests of the FP8 kernels and of the bf16 block-sparse kernel (which
# shares its loop), then the FP8 launch configs at the HunyuanVideo shape.
export PYTHONPATH=$PWD ADASPA_KERNEL_GPU_EXAMPLES=10
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 150 python -m pytest -m gpu -q tests/kernels/test_fp8.py \
  "tests/kernels/test_kernels.py::test_block_sparse_gpu" 2>&1 | tail -4
timeout 120 python research/fp8_tune.py --rep 100 --shapes hunyuan --densities 0.2 \
  --configs 64:4x3,128:8x2 2>&1 | grep -v Warn | tail -8
