"""Tiny random diffusers video transformers for CPU tests (fp32, seeded).

Every ``tiny_*()`` factory returns ``(model, kwargs)``:

* ``model``  -- the diffusers transformer, fp32, CPU, ``eval()`` mode, random weights
  (seeded through ``torch.manual_seed`` inside ``torch.random.fork_rng`` so the caller's
  global RNG state is left untouched);
* ``kwargs`` -- forward keyword inputs built with a seeded ``torch.Generator``.  The
  timestep is a 1-D tensor of length ``batch_size`` like the pipelines pass it
  (``t.expand(batch)``), with the dtype the real pipeline's scheduler produces.

Sizes are chosen so that every model has at least 256 video tokens (four 64-token
blocks) and a text length that differs from the video token count; a forward pass
takes well under a second on two CPU cores.

Default batch sizes follow the pipelines: HunyuanVideo and Wan call the transformer
once per prompt (B=1; Wan does CFG as two separate calls), CogVideoX / LTX / Mochi
batch the CFG pair into one call (B=2, negative first).

All six compile with ``torch.compile(model, backend=..., fullgraph=True)`` and match eager
exactly (backend="eager").  Mochi caveat (see docs/diffusers_models.md):
``MochiAttnProcessor2_0`` calls ``torch.nonzero`` on the text mask
(diffusers/models/attention_processor.py:1068).  With ``fullgraph=True`` torch 2.13 captures it
anyway (unbacked SymInt sequence length; torch/_dynamo/output_graph.py:735-737 turns on
dynamic-output-shape capture for one-graph mode); with ``fullgraph=False`` it graph-breaks there
unless ``torch._dynamo.config.capture_dynamic_output_shape_ops`` is True -- use
``with mochi_compile_config(): ...``.

Quick self-check: ``python tests/tiny_models.py``.
"""

from __future__ import annotations

import torch

__all__ = [
    "tiny_hunyuan_video",
    "tiny_wan",
    "tiny_cogvideox",
    "tiny_cogvideox15",
    "tiny_ltx",
    "tiny_mochi",
    "tiny_wan_pipeline",
    "wan_prompt_embeds",
    "mochi_compile_config",
    "ALL_TINY_MODELS",
]


# ----------------------------------------------------------------------------- helpers
def _build(ctor, seed: int):
    """Construct a module with seeded weights without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ctor()
        # A few parameters are zero-initialised (e.g. Mochi's ``pos_frequencies``, which
        # would make RoPE the identity).  Give them small random values so that tests
        # are sensitive to every path.
        with torch.no_grad():
            for p in model.parameters():
                if p.numel() > 0 and bool((p == 0).all()):
                    p.normal_(0.0, 0.02)
    return model.eval()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def _randn(g: torch.Generator, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float32)


def _timestep(t, dtype, batch_size: int) -> torch.Tensor:
    """Like the pipelines: a 0-d scheduler timestep ``t.expand(batch)`` -> shape [B], stride (0,)."""
    return torch.tensor(t, dtype=dtype).expand(batch_size)


def timestep_like(t: torch.Tensor, value: float) -> torch.Tensor:
    """``t`` (a model's timestep input) filled with ``value``; int timesteps take it rounded
    down, as the schedulers that use them do."""
    return torch.full_like(t, value if t.dtype.is_floating_point else int(value))


def inputs_on_cuda(kwargs: dict) -> dict:
    """A model's keyword inputs on the GPU, floating ones in bf16 but the timestep."""
    return {k: v.to("cuda", torch.bfloat16 if v.is_floating_point() and k != "timestep" else None)
            if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}


def _padding_mask(batch_size: int, seq_len: int, valid_lens, dtype) -> torch.Tensor:
    """Right-padded key mask [B, L]: the first ``valid_lens[b]`` tokens are 1/True."""
    valid = torch.tensor([valid_lens[b % len(valid_lens)] for b in range(batch_size)])
    mask = torch.arange(seq_len)[None, :] < valid[:, None]
    return mask.to(dtype)


# ----------------------------------------------------------------------------- HunyuanVideo
def tiny_hunyuan_video(batch_size: int = 1, seed: int = 0, text_len: int = 24, valid_lens=(17, 11)):
    """HunyuanVideoTransformer3DModel: 1 dual-stream + 1 single-stream block + 1 refiner block.

    Video: latent (B, 4, 4, 16, 16), patch (1, 2, 2) -> 4*8*8 = 256 tokens.
    Text: ``text_len`` tokens, right-padded; ``encoder_attention_mask`` is float32 1/0
    (the pipeline casts the tokenizer mask to the transformer dtype), valid lengths
    ``valid_lens`` (cycled over the batch).
    """
    from diffusers import HunyuanVideoTransformer3DModel

    model = _build(
        lambda: HunyuanVideoTransformer3DModel(
            in_channels=4,
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=16,
            num_layers=1,
            num_single_layers=1,
            num_refiner_layers=1,
            mlp_ratio=2.0,
            patch_size=2,
            patch_size_t=1,
            qk_norm="rms_norm",
            guidance_embeds=True,
            text_embed_dim=32,
            pooled_projection_dim=16,
            rope_theta=256.0,
            rope_axes_dim=(4, 6, 6),  # sums to attention_head_dim
        ),
        seed,
    )
    g = _gen(seed + 1)
    kwargs = dict(
        hidden_states=_randn(g, batch_size, 4, 4, 16, 16),
        # pipeline: timestep = t.expand(B).to(latents.dtype)  (FlowMatchEuler t is float32)
        timestep=_timestep(937.5, torch.float32, batch_size),
        encoder_hidden_states=_randn(g, batch_size, text_len, 32),
        encoder_attention_mask=_padding_mask(batch_size, text_len, valid_lens, torch.float32),
        pooled_projections=_randn(g, batch_size, 16),
        # pipeline: guidance = tensor([guidance_scale] * B) * 1000.0
        guidance=torch.full((batch_size,), 6.0 * 1000.0, dtype=torch.float32),
        return_dict=False,
    )
    return model, kwargs


# ----------------------------------------------------------------------------- Wan 2.1
def _tiny_wan_transformer(seed: int = 0, in_channels: int = 4):
    from diffusers import WanTransformer3DModel

    return _build(
        lambda: WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=12,  # rope split t/h/w = 4/4/4
            in_channels=in_channels,
            out_channels=in_channels,
            text_dim=32,
            freq_dim=32,
            ffn_dim=48,
            num_layers=2,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            eps=1e-6,
            rope_max_seq_len=32,
        ),
        seed,
    )


def tiny_wan(batch_size: int = 1, seed: int = 0, text_len: int = 24):
    """WanTransformer3DModel (Wan 2.1 T2V style), 2 blocks.

    Video: latent (B, 4, 4, 16, 16), patch (1, 2, 2) -> 256 tokens; text: ``text_len``
    tokens (no mask: Wan zero-pads the T5 embeddings instead of masking).
    """
    model = _tiny_wan_transformer(seed)
    g = _gen(seed + 1)
    kwargs = dict(
        hidden_states=_randn(g, batch_size, 4, 4, 16, 16),
        # pipeline: timestep = t.expand(B); UniPC (flow sigmas) timesteps are int64
        timestep=_timestep(999, torch.int64, batch_size),
        encoder_hidden_states=_randn(g, batch_size, text_len, 32),
        return_dict=False,
    )
    return model, kwargs


# ----------------------------------------------------------------------------- CogVideoX
def _cogvideox_rope(model, latent_frames: int, latent_h: int, latent_w: int):
    """Same as CogVideoX{,ImageToVideo}Pipeline._prepare_rotary_positional_embeddings (latent units)."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    cfg = model.config
    p, p_t = cfg.patch_size, cfg.patch_size_t
    grid_h, grid_w = latent_h // p, latent_w // p
    base_w, base_h = cfg.sample_width // p, cfg.sample_height // p
    if p_t is None:
        crops = get_resize_crop_region_for_grid((grid_h, grid_w), base_w, base_h)
        return get_3d_rotary_pos_embed(
            embed_dim=cfg.attention_head_dim,
            crops_coords=crops,
            grid_size=(grid_h, grid_w),
            temporal_size=latent_frames,
            device=torch.device("cpu"),
        )
    return get_3d_rotary_pos_embed(
        embed_dim=cfg.attention_head_dim,
        crops_coords=None,
        grid_size=(grid_h, grid_w),
        temporal_size=(latent_frames + p_t - 1) // p_t,
        grid_type="slice",
        max_size=(base_h, base_w),
        device=torch.device("cpu"),
    )


def tiny_cogvideox(batch_size: int = 2, seed: int = 0, text_len: int = 24, use_rotary: bool = False):
    """CogVideoXTransformer3DModel, CogVideoX 1.0 style (patch_size_t=None), 2 blocks.

    ``use_rotary=False`` is the 2B layout (3-D sin-cos absolute position embedding added
    in the patch embed), ``use_rotary=True`` the 5B layout (RoPE passed as
    ``image_rotary_emb``).  Video: latent (B, F=4, C=4, 16, 16) -> 4*8*8 = 256 tokens.
    Text: ``text_len`` tokens == ``max_text_seq_length`` (no mask; the pipeline always
    pads to 226 and the sin-cos table is built for exactly that many text slots).
    """
    from diffusers import CogVideoXTransformer3DModel

    model = _build(
        lambda: CogVideoXTransformer3DModel(
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=4,
            out_channels=4,
            time_embed_dim=16,
            text_embed_dim=32,
            num_layers=2,
            sample_width=16,
            sample_height=16,
            sample_frames=13,  # (4 - 1) * 4 + 1 -> the precomputed pos-embedding buffer is used
            patch_size=2,
            patch_size_t=None,
            temporal_compression_ratio=4,
            max_text_seq_length=text_len,
            use_rotary_positional_embeddings=use_rotary,
            use_learned_positional_embeddings=False,
        ),
        seed,
    )
    g = _gen(seed + 1)
    kwargs = dict(
        hidden_states=_randn(g, batch_size, 4, 4, 16, 16),
        encoder_hidden_states=_randn(g, batch_size, text_len, 32),
        # pipeline: timestep = t.expand(B); CogVideoXDDIM/DPM timesteps are int64
        timestep=_timestep(999, torch.int64, batch_size),
        return_dict=False,
    )
    if use_rotary:
        kwargs["image_rotary_emb"] = _cogvideox_rope(model, 4, 16, 16)
    return model, kwargs


def tiny_cogvideox15(batch_size: int = 2, seed: int = 0, text_len: int = 24):
    """CogVideoXTransformer3DModel, CogVideoX 1.5 (I2V) style, 2 blocks.

    ``patch_size_t=2``, ``patch_bias=False``, RoPE (grid_type="slice"), ``ofs_embed_dim``
    set (the pipeline passes ``ofs = latents.new_full((1,), 2.0)``), in_channels = 2 * out
    (noisy latents concatenated with image latents).  Video: latent (B, F=8, C=8, 16, 16)
    -> (8/2)*8*8 = 256 tokens.  Text: ``text_len`` tokens, no mask.
    """
    from diffusers import CogVideoXTransformer3DModel

    model = _build(
        lambda: CogVideoXTransformer3DModel(
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=8,
            out_channels=4,
            time_embed_dim=16,
            ofs_embed_dim=16,
            text_embed_dim=32,
            num_layers=2,
            sample_width=32,
            sample_height=32,
            sample_frames=29,
            patch_size=2,
            patch_size_t=2,
            temporal_compression_ratio=4,
            max_text_seq_length=text_len,
            patch_bias=False,
            use_rotary_positional_embeddings=True,
            use_learned_positional_embeddings=False,
        ),
        seed,
    )
    g = _gen(seed + 1)
    kwargs = dict(
        hidden_states=_randn(g, batch_size, 8, 8, 16, 16),
        encoder_hidden_states=_randn(g, batch_size, text_len, 32),
        timestep=_timestep(999, torch.int64, batch_size),
        ofs=torch.full((1,), 2.0, dtype=torch.float32),
        image_rotary_emb=_cogvideox_rope(model, 8, 16, 16),
        return_dict=False,
    )
    return model, kwargs


# ----------------------------------------------------------------------------- LTX-Video
def tiny_ltx(batch_size: int = 2, seed: int = 0, text_len: int = 24, valid_lens=(1, 17)):
    """LTXVideoTransformer3DModel, 2 blocks.

    Input is already patchified: hidden_states (B, F*H*W = 4*8*8 = 256, 8).
    ``encoder_attention_mask`` is a bool [B, L] tokenizer mask (right padded; the model
    turns it into an additive -10000 bias).  Batch 2 = [negative "" (1 valid token), prompt].
    """
    from diffusers import LTXVideoTransformer3DModel

    model = _build(
        lambda: LTXVideoTransformer3DModel(
            in_channels=8,
            out_channels=8,
            patch_size=1,
            patch_size_t=1,
            num_attention_heads=2,
            attention_head_dim=16,
            cross_attention_dim=32,
            num_layers=2,
            caption_channels=32,
        ),
        seed,
    )
    g = _gen(seed + 1)
    kwargs = dict(
        hidden_states=_randn(g, batch_size, 4 * 8 * 8, 8),
        encoder_hidden_states=_randn(g, batch_size, text_len, 32),
        # pipeline: timestep = t.expand(B); FlowMatchEuler t is float32
        timestep=_timestep(995.0, torch.float32, batch_size),
        encoder_attention_mask=_padding_mask(batch_size, text_len, valid_lens, torch.bool),
        num_frames=4,
        height=8,
        width=8,
        # pipeline: (vae_temporal_compression / frame_rate, vae_spatial, vae_spatial)
        rope_interpolation_scale=(8 / 25, 32, 32),
        return_dict=False,
    )
    return model, kwargs


# ----------------------------------------------------------------------------- Mochi
def tiny_mochi(batch_size: int = 2, seed: int = 0, text_len: int = 24, valid_lens=(5, 17)):
    """MochiTransformer3DModel, 2 blocks (the last one is ``context_pre_only``).

    Video: latent (B, 4, 4, 16, 16), patch 2 -> 256 tokens.  Text: ``text_len`` tokens with
    a bool [B, L] ``encoder_attention_mask`` (right padded).

    NOTE: ``MochiAttnProcessor2_0`` runs a Python loop over the batch and gathers the valid
    text tokens with ``torch.nonzero`` -> per-sample SDPA calls with an unbacked SymInt
    length (256 + u0).  Fine with ``fullgraph=True``; with ``fullgraph=False`` wrap the call in
    ``mochi_compile_config()`` to avoid graph breaks.
    """
    from diffusers import MochiTransformer3DModel

    model = _build(
        lambda: MochiTransformer3DModel(
            patch_size=2,
            num_attention_heads=2,
            attention_head_dim=16,
            num_layers=2,
            pooled_projection_dim=16,
            in_channels=4,
            out_channels=None,
            qk_norm="rms_norm",
            text_embed_dim=32,  # divisible by the 8 heads of the caption attention-pool
            time_embed_dim=16,
            activation_fn="swiglu",
            max_sequence_length=text_len,
        ),
        seed,
    )
    g = _gen(seed + 1)
    kwargs = dict(
        hidden_states=_randn(g, batch_size, 4, 4, 16, 16),
        encoder_hidden_states=_randn(g, batch_size, text_len, 32),
        # pipeline: timestep = t.expand(B).to(latents.dtype)  (float32, reversed: 1000 - sigma*1000)
        timestep=_timestep(25.0, torch.float32, batch_size),
        encoder_attention_mask=_padding_mask(batch_size, text_len, valid_lens, torch.bool),
        return_dict=False,
    )
    return model, kwargs


def mochi_compile_config():
    """Dynamo config that lets Mochi compile as one graph with ``fullgraph=False``
    (``torch.nonzero``).  Not needed with ``fullgraph=True``."""
    return torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True)


ALL_TINY_MODELS = {
    "hunyuan_video": tiny_hunyuan_video,
    "wan": tiny_wan,
    "cogvideox": tiny_cogvideox,
    "cogvideox15": tiny_cogvideox15,
    "ltx": tiny_ltx,
    "mochi": tiny_mochi,
}


# ----------------------------------------------------------------------------- Wan pipeline
def tiny_wan_pipeline(seed: int = 0, scheduler: str = "unipc"):
    """A ``diffusers.WanPipeline`` with tiny random transformer + VAE, no text encoder.

    ``scheduler``: "unipc" (what the Wan2.1 checkpoints ship: UniPCMultistepScheduler,
    flow_prediction, use_flow_sigmas, flow_shift=3.0) or "euler"
    (FlowMatchEulerDiscreteScheduler(shift=3.0), the type annotated in WanPipeline).

    Use with ``wan_prompt_embeds()`` and e.g.::

        pipe(prompt_embeds=pe, negative_prompt_embeds=npe, guidance_scale=5.0,
             num_inference_steps=12, height=128, width=128, num_frames=13,
             output_type="latent")

    128x128x13 frames -> latent (1, 16, 4, 16, 16) -> 256 video tokens.  CFG runs as two
    transformer calls per step (cond, then uncond), each with batch 1.
    """
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        UniPCMultistepScheduler,
        WanPipeline,
    )

    transformer = _tiny_wan_transformer(seed, in_channels=16)
    vae = _build(
        lambda: AutoencoderKLWan(
            base_dim=3,
            z_dim=16,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
        ),
        seed + 2,
    )
    if scheduler == "unipc":
        sched = UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0
        )
    elif scheduler == "euler":
        sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    else:
        raise ValueError(scheduler)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=sched, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def wan_prompt_embeds(pipe=None, batch_size: int = 1, text_len: int = 24, seed: int = 0):
    """(prompt_embeds, negative_prompt_embeds), each (B, text_len, text_dim) float32."""
    text_dim = pipe.transformer.config.text_dim if pipe is not None else 32
    g = _gen(seed + 3)
    return _randn(g, batch_size, text_len, text_dim), _randn(g, batch_size, text_len, text_dim)


# ----------------------------------------------------------------------------- self-check
def _self_check():  # pragma: no cover - manual helper
    import time

    torch.set_num_threads(2)
    for name, factory in ALL_TINY_MODELS.items():
        torch._dynamo.reset()
        model, kwargs = factory()
        with torch.no_grad():
            t0 = time.perf_counter()
            ref = model(**kwargs)[0]
            dt = time.perf_counter() - t0
            out = torch.compile(model, backend="eager", fullgraph=True)(**kwargs)[0]
        print(f"{name:14s} out={tuple(ref.shape)} eager={dt * 1e3:.1f}ms compiled==eager: {torch.equal(out, ref)}")

    pipe = tiny_wan_pipeline()
    pe, npe = wan_prompt_embeds(pipe)
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: calls.append(kw["timestep"].tolist()), with_kwargs=True
    )
    latents = pipe(
        prompt_embeds=pe, negative_prompt_embeds=npe, guidance_scale=5.0, num_inference_steps=12,
        height=128, width=128, num_frames=13, output_type="latent",
    ).frames
    handle.remove()
    print(f"WanPipeline: latents={tuple(latents.shape)}, transformer calls={len(calls)}, timesteps={calls[::2]}")


if __name__ == "__main__":
    _self_check()
