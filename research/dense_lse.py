"""Dense attention + LSE executors side by side (the fused search's dense pass): cuDNN, ours
(Triton, head dim 64 only) and FlashAttention-4 when it is installed, plus ``ops.fused_search``
as the backend runs it. CogVideoX and HunyuanVideo shapes, B=1, bf16, BSHD memory viewed as
BHSD; FA4's output and LSE are checked against cuDNN's in the same run.

    python research/dense_lse.py          # on a GPU; FA4 rows need flash-attn-4

Writes ``$OUT/dense_lse.json`` (or ``./dense_lse.json``).
"""
import importlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # kernel_speed, e2e, fidelity

from kernel_speed import bench, random_qkv, rel_err  # noqa: E402

from adaspa_compile import ops  # noqa: E402

fa4 = importlib.import_module("adaspa_compile.kernels.fa4_attention")
cud = importlib.import_module("adaspa_compile.kernels.cudnn_attention")
fs = importlib.import_module("adaspa_compile.kernels.fused_search")


def main():
    rows = []
    for name, H, D, L in (("cogvideox", 48, 64, 45106), ("hunyuan", 24, 128, 119056)):
        q, k, v = random_qkv(H, L, D)
        s = D ** -0.5
        print(name, "FA4:", repr(fa4.fa4_unsupported_reason(q, None)) or "runs", flush=True)
        o_c, l_c = cud.cudnn_attention_with_lse(q, k, v, s, None)
        got = fa4.fa4_attention_with_lse(q, k, v, s, None)
        r = {"shape": name}
        if got is not None:
            r["fa4_out_vs_cudnn"] = rel_err(got[0], o_c)
            r["fa4_lse_vs_cudnn"] = rel_err(got[1], l_c)
            r["fa4_ms"] = bench(lambda: fa4.fa4_attention_with_lse(q, k, v, s, None), 300)
        r["cudnn_ms"] = bench(lambda: cud.cudnn_attention_with_lse(q, k, v, s, None), 300)
        if D == 64:
            r["ours_ms"] = bench(lambda: fs.fused_search(q, k, v, s, 64, None, with_mass=False),
                                 300)
        r["ops_fused_ms"] = bench(lambda: ops.fused_search(q, k, v, s, 64, None), 300)
        print(r, flush=True)
        rows.append(r)
        del q, k, v, o_c, l_c, got
    Path(os.environ.get("OUT", "."), "dense_lse.json").write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
