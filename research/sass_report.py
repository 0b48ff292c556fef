"""Static look at a kernel's sm_90 machine code, on a machine without a GPU.

Compiles one of our Triton kernels for Hopper (``GPUTarget("cuda", 90, 128)``), specialised the
way the JIT specialises a real launch (unit strides constant, pointers and strides divisible by
16, K/V through tensor descriptors where the launcher would use them), disassembles it with the
``cuobjdump`` that ships with Triton, and prints registers, shared memory, counts of the
instructions that matter for attention kernels, and the order of wgmma issues (HGMMA), wgmma
waits (WARPGROUP.DEPBAR), exponentials (MUFU.EX2) and block barriers (BAR.SYNC) as runs.

It times nothing: it shows structure (e.g. whether a wgmma is waited on at once or overlaps the
exponentials, how many barriers an iteration has), which is what to check before spending device
time. Example (the cached search as the backend launches it at head dim 128):

    python research/sass_report.py --kernel cached --head-dim 128
    python research/sass_report.py --kernel shared --head-dim 128
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # kernel_speed, e2e, fidelity

from adaspa_compile.kernels import _common  # noqa: E402

COUNTED = ("HGMMA", "WARPGROUP", "MUFU", "BAR", "FFMA", "FADD", "FMUL", "F2FP", "SHFL", "LDG",
           "LDGSTS", "UTMALDG", "SYNCS", "STS", "LDS")
SEQUENCE = re.compile(r"^(HGMMA|WARPGROUP\.DEPBAR|MUFU\.EX2|BAR\.SYNC|BRA)")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernel", choices=("cached", "sparse", "shared", "hopper"), default="cached",
                   help="sparse: 64-row block-sparse programs; shared: pair programs; hopper: "
                        "the Gluon 64-row kernel (block_sparse_hopper)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=64, choices=(64, 128))
    p.add_argument("--no-tma", action="store_true", help="pointer loads instead of descriptors")
    p.add_argument("--chunk", type=int, default=None,
                   help="cached search: key blocks per cross-warp reduction (default: CHUNK)")
    p.add_argument("--rotate", action="store_true", help="block-sparse: the rotated list walk")
    p.add_argument("--split", action="store_true",
                   help="shared_pairs' split mode: --kernel shared: the shared-blocks launch "
                        "(SHARED_ONLY); --kernel sparse: the launch resuming its state (RESUME)")
    p.add_argument("--mask-mode", type=int, default=0, choices=(0, 1, 2, 3),
                   help="key masking: 0 none, 1 ragged last block, 2 key padding, 3 key padding "
                        "in a block range (block-sparse only; see kernels/_tiles.py)")
    p.add_argument("--warps", type=int, default=None, help="default: the launcher's config")
    p.add_argument("--stages", type=int, default=None,
                   help="default: the launcher's config (hopper: K buffers)")
    p.add_argument("--v-stages", type=int, default=None, help="hopper: V buffers")
    p.add_argument("--maxnreg", type=int, default=None,
                   help="per-thread register cap (hopper default: the launcher's)")
    return p.parse_args()


def kernel_spec(args):
    """``(jit function, argument types, constexprs, divisible-by-16 names, config key)``."""
    d, d_pad, bs = args.head_dim, _common.padded_head_dim(args.head_dim), args.block_size
    desc = f"tensordesc<bf16[1,1,{bs},{d_pad}]>"
    tma = not args.no_tma
    if args.kernel == "hopper":
        return hopper_spec(args, d, bs)
    if args.kernel == "cached":
        module = importlib.import_module("adaspa_compile.kernels.cached_search")
        fn = module._cached_search_kernel
        types = {"Q": "*bf16", "K": desc if tma else "*bf16", "LSE": "*fp32", "Bias": "*fp32",
                 "Mass": "*fp32", "qk_scale": "fp32"}
        const = dict(HEAD_DIM=d, HEAD_DIM_PAD=d_pad, BLOCK_SIZE=bs, SPLIT=2 if bs == 64 else 1,
                     MASK_MODE=0, DOT_PREC="tf32", USE_TMA=tma, CHUNK=args.chunk or module.CHUNK,
                     stride_qd=1, stride_kd=1, stride_lm=1)
        key = "cached"
    else:
        shared = args.kernel == "shared"
        if shared:
            fn = importlib.import_module("adaspa_compile.kernels.shared_pairs")._shared_pair_kernel
        else:
            fn = importlib.import_module("adaspa_compile.kernels.block_sparse")._block_sparse_kernel
        types = {"Q": "*bf16", "K": desc if tma else "*bf16", "V": desc if tma else "*bf16",
                 "Out": "*bf16", "Counts": "*i32", "Indices": "*i32", "Order": "*i32",
                 "Bias": "*fp32", "BiasRange": "*i32", "State": "*fp32", "M": "*fp32",
                 "Lsum": "*fp32", "qk_scale": "fp32"}
        const = dict(HEAD_DIM=d, HEAD_DIM_PAD=d_pad, MASK_MODE=args.mask_mode, USE_TMA=tma,
                     DOT_PREC="tf32",
                     ROTATE=args.rotate,
                     stride_qd=1, stride_kd=1, stride_vd=1, stride_od=1, stride_ik=1)
        if shared:
            const["SHARED_ONLY"] = args.split
        else:
            const.update(BLOCK_SIZE=bs, RESUME=args.split)
        key = "sparse_shared" if shared else "sparse"
    div16 = {n for n in fn.arg_names if n.startswith("stride_") and n not in const}
    return fn, types, const, div16, key


def hopper_spec(args, d, bs):
    """``kernel_spec`` for the Gluon kernel: descriptors typed with their shared layouts."""
    module = importlib.import_module("adaspa_compile.kernels.block_sparse_hopper")
    gl = module.gl
    layout = gl.NVMMASharedLayout.get_default_for([1, 1, bs, d], gl.bfloat16)
    desc = f"tensordesc<bf16[1,1,{bs},{d}],{layout!r}>"
    types = {"q_desc": desc, "k_desc": desc, "v_desc": desc, "o_desc": desc, "Counts": "*i32",
             "Indices": "*i32", "Order": "*i32", "Bias": "*fp32", "BiasRange": "*i32",
             "qk_scale": "fp32"}
    const = dict(HEAD_DIM=d, BLOCK_SIZE=bs, HAS_BIAS=args.mask_mode != 0, ROTATE=args.rotate,
                 K_STAGES=args.stages or module.K_STAGES, V_STAGES=args.v_stages or module.V_STAGES,
                 num_warps=args.warps or 4, stride_ik=1)
    div16 = {n for n in module._hopper_kernel.arg_names if n.startswith("stride_")
             and n not in const}
    return module._hopper_kernel, types, const, div16, "hopper"


def compile_sm90(fn, types, const, div16, num_warps, num_stages, maxnreg=None):
    signature = {n: "constexpr" if n in const else types.get(n, "i32") for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if n not in const and (signature[n].startswith("*") or n in div16)}
    gluon = getattr(fn, "is_gluon", lambda: False)()
    if gluon:
        from triton.experimental.gluon._runtime import GluonASTSource
    source = (GluonASTSource if gluon else ASTSource)(fn=fn, signature=signature,
                                                       constexprs=const, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 128),
                          options={"num_warps": num_warps, "num_stages": num_stages,
                                   **({} if maxnreg is None else {"maxnreg": maxnreg})})


def cuobjdump(flag: str, cubin: bytes) -> str:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        return subprocess.run([str(tool), flag, f.name], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.unlink(f.name)


def opcodes(sass: str):
    """The opcode of every instruction line (predicates dropped)."""
    for line in sass.splitlines():
        m = re.search(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", line)
        if m:
            yield m.group(1)


def runs(ops):
    """Run-length pairs ``(count, op)`` of consecutive equal sequence opcodes."""
    out = []
    for op in ops:
        name = SEQUENCE.match(op).group(1)
        if out and out[-1][1] == name:
            out[-1][0] += 1
        else:
            out.append([1, name])
    return out


def main():
    args = parse_args()
    fn, types, const, div16, key = kernel_spec(args)
    warps, stages = _common.launch_config(key, const.get("HEAD_DIM_PAD", args.head_dim),
                                          args.block_size)
    warps, stages = args.warps or warps, args.stages or stages
    maxnreg = args.maxnreg
    if maxnreg is None and args.kernel == "hopper":  # the launcher's cap
        hopper = importlib.import_module("adaspa_compile.kernels.block_sparse_hopper")
        maxnreg = hopper.MAX_REGISTERS
    compiled = compile_sm90(fn, types, const, div16, warps, stages, maxnreg)
    sass = cuobjdump("-sass", compiled.asm["cubin"])
    usage = " ".join(line.strip() for line in cuobjdump("-res-usage", compiled.asm["cubin"])
                     .splitlines() if "REG" in line)
    ops = list(opcodes(sass))
    counts = {name: sum(op.split(".")[0] == name for op in ops) for name in COUNTED}
    print(f"{args.kernel} D={args.head_dim} block={args.block_size} tma={not args.no_tma} "
          f"rotate={args.rotate} warps={warps} stages={stages}")
    print(f"resources: {usage}")
    print("instructions (whole kernel): " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    sequence = runs(op for op in ops if SEQUENCE.match(op))
    print("order: " + "  ".join(f"{n}x {name}" for n, name in sequence))


if __name__ == "__main__":
    main()
