"""Demo: a denoising loop on a small diffusers Wan transformer, dense and adaspa side by side.

    python examples/demo.py            # CPU, about a minute
    python examples/demo.py --steps 50 --frames 8 --size 48

Prints the wall-time ratio, the PSNR of the final latents against dense, and the adaspa report.
The weights are random, so attention has little structure and the PSNR says little about
quality on a trained model; it shows the whole path running: warmup, search, re-search, sparse.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

import adaspa_compile


def build_transformer(seed: int):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=8,
        out_channels=8, text_dim=64, freq_dim=64, ffn_dim=256, num_layers=4,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=256,
    ).eval()


def denoise(model, latents: torch.Tensor, text: torch.Tensor, steps: int, label: str) -> tuple:
    """Flow-matching Euler sampling with diffusers' scheduler; returns (latents, seconds)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from tqdm.auto import tqdm

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(steps)
    x = latents.clone()
    start = time.perf_counter()
    with torch.no_grad():
        for t in tqdm(scheduler.timesteps, desc=label, leave=False):
            v = model(hidden_states=x, timestep=t.expand(x.shape[0]), encoder_hidden_states=text,
                      return_dict=False)[0]
            x = scheduler.step(v, t, x, return_dict=False)[0]
    return x, time.perf_counter() - start


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    mse = torch.mean((x.double() - ref.double()) ** 2).item()
    peak = (ref.max() - ref.min()).item()
    return float("inf") if mse == 0 else 10 * math.log10(peak ** 2 / mse)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--frames", type=int, default=8, help="latent frames")
    parser.add_argument("--size", type=int, default=32, help="latent height and width")
    parser.add_argument("--sparsity", type=float, default=0.8)
    parser.add_argument("--search-steps", type=int, nargs="+", default=[5, 17])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = build_transformer(args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    latents = torch.randn(1, 8, args.frames, args.size, args.size, generator=g)
    text = torch.randn(1, 32, 64, generator=g)
    tokens = args.frames * (args.size // 2) ** 2
    print(f"Wan transformer, 4 layers x 4 heads x 32 dims, {tokens} video tokens, {args.steps} steps")

    dense = torch.compile(model, backend="inductor")
    sparse = torch.compile(model, backend="adaspa", options={
        "sparsity": args.sparsity, "search_steps": tuple(args.search_steps), "min_seq_len": 256})
    for compiled, label in ((dense, "warmup dense"), (sparse, "warmup adaspa")):
        denoise(compiled, latents, text, 2, label)  # compile outside the timed runs
    adaspa_compile.reset()

    ref, t_dense = denoise(dense, latents, text, args.steps, "dense (inductor)")
    out, t_sparse = denoise(sparse, latents, text, args.steps, "adaspa")
    print(f"dense (inductor): {t_dense:.2f} s   adaspa: {t_sparse:.2f} s   "
          f"speed ratio dense/adaspa: {t_dense / t_sparse:.2f}x")
    print(f"PSNR of the final latents, adaspa vs dense: {psnr(out, ref):.2f} dB")
    print(adaspa_compile.report())


if __name__ == "__main__":
    main()
