"""The examples run end to end on the CPU: the pipeline examples on tiny random pipelines, the demo
on the trained fidelity model it ships with, at its smallest size.

Each pipeline is the real diffusers class, built from tiny random components of the classes the
checkpoints use: the transformer, the VAE, the scheduler and the text encoders (Llama + CLIP for
HunyuanVideo, UMT5 for Wan, T5 for CogVideoX). The tokenizers are word-level tokenizers built in
memory (``tokenizers.models.WordLevel``), so no download is needed and the prompt goes through
the pipeline's own text encoding, as it does for a user. The example's ``main(argv, pipe=...)``
then compiles the transformer with ``backend="adaspa"``, generates, writes a GIF and returns the
report.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from tests.scripts import load_script

pytestmark = pytest.mark.usefixtures("fresh_compile")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PROMPT = "a cat walks on the grass"
STEPS = 6
PHASES = "DFSCSS"  # search steps (1, 3) over 6 steps: dense, fused, sparse, cached, sparse x2
# 128x128 pixels -> 16x16 latents -> 8x8 patches per latent frame.
COMMON_ARGS = ["--prompt", PROMPT, "--steps", str(STEPS), "--search-steps", "1", "3",
               "--height", "128", "--width", "128", "--min-seq-len", "128", "--sparsity", "0.5",
               "--fps", "8", "--device", "cpu"]


def load_example(name: str, monkeypatch):
    """Import ``examples/<name>.py`` with its sibling ``_common``, as its script does."""
    return load_script(EXAMPLES / f"{name}.py", monkeypatch, siblings=("_common",))


# ----------------------------------------------------------------------------- tiny components
def word_tokenizer():
    """A word-level fast tokenizer built in memory; unknown words map to ``<unk>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "<s>", "</s>"] + sorted(set(PROMPT.split()))
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>",
                                   unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def seeded(seed: int, build):
    """``build()`` under a fixed seed, without touching the caller's RNG; eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval()


def tiny_hunyuan_video_pipeline():
    """HunyuanVideoPipeline: 1 dual + 1 single block; Llama (2 layers) + CLIP text encoders.

    9 frames at 128x128 -> 3 latent frames of 8x8 patches = 192 video tokens, plus 256 text
    tokens (the pipeline pads the Llama text to 256 and passes the padding mask). The video
    length must differ from the text length: see ``test_text_span_when_video_and_text_lengths_
    are_equal``.
    """
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    tokenizer, tokenizer_2 = word_tokenizer(), word_tokenizer()
    llama = seeded(0, lambda: LlamaModel(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=0)))
    clip = seeded(1, lambda: CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer_2), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=77, pad_token_id=0, bos_token_id=2,
        eos_token_id=3)))
    transformer = seeded(2, lambda: HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
        num_layers=1, num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2,
        patch_size_t=1, qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=32,
        pooled_projection_dim=16, rope_theta=256.0, rope_axes_dim=(4, 6, 6)))
    vae = seeded(3, lambda: AutoencoderKLHunyuanVideo(
        latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        norm_num_groups=4, mid_block_add_attention=False))
    pipe = HunyuanVideoPipeline(text_encoder=llama, tokenizer=tokenizer, transformer=transformer,
                                vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
                                text_encoder_2=clip, tokenizer_2=tokenizer_2)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_wan_pipeline():
    """WanPipeline: 2 blocks, UMT5 text encoder, UniPC scheduler (as the Wan 2.1 checkpoints).

    13 frames at 128x128 -> 256 video tokens; the 512 text tokens go through cross-attention.
    """
    from diffusers import (
        AutoencoderKLWan,
        UniPCMultistepScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = word_tokenizer()
    text_encoder = seeded(0, lambda: UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, pad_token_id=0, decoder_start_token_id=0)))
    transformer = seeded(2, lambda: WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
        out_channels=16, text_dim=32, freq_dim=32, ffn_dim=48, num_layers=2,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32))
    vae = seeded(3, lambda: AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1],
                                             num_res_blocks=1,
                                             temperal_downsample=[False, True, True]))
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=3.0)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                       scheduler=scheduler, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_cogvideox_pipeline():
    """CogVideoXPipeline in the CogVideoX 1.5 layout (patch_size_t=2, RoPE), T5 text encoder,
    DPM scheduler as the 5B checkpoints ship.

    29 frames at 128x128 -> 8 latent frames -> 4 x 8x8 patches = 256 video tokens, after the
    226 text tokens; the CFG pair is one call with batch 2.
    """
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDPMScheduler,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )
    from transformers import T5Config, T5EncoderModel

    tokenizer = word_tokenizer()
    text_encoder = seeded(0, lambda: T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, pad_token_id=0, decoder_start_token_id=0)))
    transformer = seeded(2, lambda: CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        time_embed_dim=16, text_embed_dim=32, num_layers=2, sample_width=16, sample_height=16,
        sample_frames=29, patch_size=2, patch_size_t=2, temporal_compression_ratio=4,
        max_text_seq_length=226, patch_bias=False, use_rotary_positional_embeddings=True))
    vae = seeded(3, lambda: AutoencoderKLCogVideoX(
        block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1,
        norm_num_groups=2, sample_height=128, sample_width=128))
    scheduler = CogVideoXDPMScheduler(timestep_spacing="trailing", prediction_type="v_prediction",
                                      rescale_betas_zero_snr=True, snr_shift_scale=1.0,
                                      clip_sample=False)
    pipe = CogVideoXPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                             transformer=transformer, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------- checks
def check_gif(path: Path, frames: int) -> None:
    """A GIF of at most ``frames`` frames and more than one (PIL merges identical neighbours)."""
    from PIL import Image

    assert path.is_file() and path.stat().st_size > 0, path
    with Image.open(path) as im:
        assert im.format == "GIF"
        assert 1 < im.n_frames <= frames


def check_sites(report, *, text: str, branches, min_sites: int):
    """Every rewritten site ran the schedule on every branch and searched a sparse mask."""
    assert report.clock == "timestep", str(report)
    assert report.step == STEPS - 1 and report.generation == 0, str(report)
    assert len(report.rewritten) >= min_sites, str(report)
    for site in report.rewritten:
        assert site.phases == {b: PHASES for b in branches}, str(report)
        assert site.text.split(" ")[0] == text, str(report)
        assert site.reason == "", str(report)
        assert len(site.search_ms) == 2 * len(branches)  # fused + cached, per branch
        assert site.mean_density() is not None and site.mean_density() < 1.0, str(report)
        assert site.cache_bytes > 0


# ----------------------------------------------------------------------------- examples
def test_hunyuan_video_example(tmp_path, monkeypatch, capsys):
    example = load_example("hunyuan_video", monkeypatch)
    out = tmp_path / "hunyuan.gif"
    result = example.main(COMMON_ARGS + ["--frames", "9", "--output", str(out)],
                          pipe=tiny_hunyuan_video_pipeline())
    assert result.output == out and result.frames == 9
    check_gif(out, 9)
    report = result.report
    check_sites(report, text="last", branches=[0], min_sites=2)
    names = " ".join(s.name for s in report.rewritten)
    assert "transformer_blocks" in names and "single_transformer_blocks" in names, str(report)
    refiner = [s for s in report.skipped if "refiner" in s.name]
    assert refiner, str(report)  # the text-only token refiner stays dense
    printed = capsys.readouterr().out
    assert "adaspa report: " in printed and str(out) in printed


def test_hunyuan_video_example_from_a_local_folder_with_true_cfg(tmp_path, monkeypatch):
    """The user path: ``--model PATH`` -> from_pretrained on the CPU (fp32); true CFG makes two
    calls per step, so two branches."""
    tiny_hunyuan_video_pipeline().save_pretrained(tmp_path / "model")
    example = load_example("hunyuan_video", monkeypatch)
    out = tmp_path / "hunyuan_cfg.gif"
    result = example.main(COMMON_ARGS + ["--frames", "5", "--output", str(out),
                                         "--model", str(tmp_path / "model"),
                                         "--negative-prompt", "grass", "--true-cfg-scale", "4"])
    assert result.frames == 5
    check_gif(out, 5)
    check_sites(result.report, text="last", branches=[0, 1], min_sites=2)


def test_text_span_when_video_and_text_lengths_are_equal(tmp_path, monkeypatch):
    example = load_example("hunyuan_video", monkeypatch)
    out = tmp_path / "hunyuan_256.gif"
    result = example.main(COMMON_ARGS + ["--frames", "13", "--output", str(out)],
                          pipe=tiny_hunyuan_video_pipeline())  # 4 x 8 x 8 = 256 video tokens
    assert all(s.text.startswith("last") for s in result.report.rewritten), str(result.report)


def test_wan_example_two_cfg_branches_per_step(tmp_path, monkeypatch):
    example = load_example("wan", monkeypatch)
    out = tmp_path / "wan.gif"
    result = example.main(COMMON_ARGS + ["--frames", "13", "--output", str(out)],
                          pipe=tiny_wan_pipeline())
    assert result.frames == 13
    check_gif(out, 13)
    report = result.report
    check_sites(report, text="none", branches=[0, 1], min_sites=2)
    assert report.skipped and all("cross-attention" in s.reason for s in report.skipped)


def test_wan_example_regional_compile_runs_the_same_schedule(tmp_path, monkeypatch):
    example = load_example("wan", monkeypatch)
    out = tmp_path / "wan_regional.gif"
    pipe = tiny_wan_pipeline()
    result = example.main(COMMON_ARGS + ["--frames", "13", "--output", str(out), "--regional"],
                          pipe=pipe)
    check_gif(out, 13)
    check_sites(result.report, text="none", branches=[0, 1], min_sites=2)
    assert not hasattr(pipe.transformer, "_orig_mod")  # the blocks were compiled, not the model
    assert [s.name for s in result.report.rewritten] == ["blocks.0.attn1", "blocks.1.attn1"]


def test_wan22_example_compiles_both_experts(tmp_path, monkeypatch):
    """Wan 2.2 A14B's layout: each expert is compiled and searches its own masks; the low-noise
    expert, first called after the first search step, starts with its own fused search."""
    from diffusers import WanPipeline

    example = load_example("wan", monkeypatch)
    base = tiny_wan_pipeline()
    low = seeded(7, lambda: type(base.transformer)(**base.transformer.config))
    pipe = WanPipeline(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae,
                       scheduler=base.scheduler, transformer=base.transformer,
                       transformer_2=low, boundary_ratio=0.5)
    pipe.set_progress_bar_config(disable=True)
    out = tmp_path / "wan22.gif"
    result = example.main(COMMON_ARGS + ["--frames", "13", "--output", str(out)], pipe=pipe)
    check_gif(out, 13)
    report = result.report
    assert [m.label for m in report.models] == ["WanTransformer3DModel#0",
                                                "WanTransformer3DModel#1"], str(report)
    high = [s for s in report.rewritten if s.model.endswith("#0")]
    low_sites = [s for s in report.rewritten if s.model.endswith("#1")]
    assert len(high) == len(low_sites) == 2, str(report)
    switch = len(high[0].phases[0])
    assert 1 < switch < STEPS, str(report)
    for site in high:
        assert site.phases == {b: PHASES[:switch] for b in (0, 1)}, str(report)
    for site in low_sites:
        assert all(p[0] == "F" for p in site.phases.values()), str(report)
        assert all(len(p) == STEPS - switch for p in site.phases.values()), str(report)


def test_wan_example_flow_shift_follows_resolution(tmp_path, monkeypatch):
    example = load_example("wan", monkeypatch)
    pipe = tiny_wan_pipeline()
    args = example._common.parse_args(example.build_parser(), ["--height", "720", "--output",
                                                               "x.gif"], have_pipeline=True)
    example.set_flow_shift(pipe, args)
    assert pipe.scheduler.config.flow_shift == 5.0
    args.height, args.flow_shift = 480, None
    example.set_flow_shift(pipe, args)
    assert pipe.scheduler.config.flow_shift == 3.0


def test_cogvideox_example_batched_cfg(tmp_path, monkeypatch):
    example = load_example("cogvideox", monkeypatch)
    out = tmp_path / "cogvideox.gif"
    result = example.main(COMMON_ARGS + ["--frames", "29", "--output", str(out)],
                          pipe=tiny_cogvideox_pipeline())
    assert result.frames >= 29  # CogVideoX 1.5 pads the latent frames to its temporal patch
    check_gif(out, result.frames)
    report = result.report
    check_sites(report, text="first", branches=[0], min_sites=2)
    for site in report.rewritten:  # one call holds both CFG halves: a mask per batch element
        assert len(site.density) == 2 and len(site.recall) == 2


def test_recall_mode_reaches_its_target(tmp_path, monkeypatch):
    example = load_example("wan", monkeypatch)
    out = tmp_path / "wan_recall.gif"
    result = example.main(COMMON_ARGS + ["--frames", "13", "--output", str(out),
                                         "--mode", "recall", "--recall", "0.6"],
                          pipe=tiny_wan_pipeline())
    check_gif(out, 13)
    check_sites(result.report, text="none", branches=[0, 1], min_sites=2)
    for site in result.report.rewritten:  # every head of every branch reaches the target
        assert min(min(row) for row in site.recall) >= 0.6 - 1e-4, str(result.report)


def test_eager_backend_writes_a_dense_reference_without_report(tmp_path, monkeypatch):
    import adaspa_compile

    example = load_example("wan", monkeypatch)
    out = tmp_path / "wan_eager.gif"
    result = example.main(COMMON_ARGS + ["--frames", "5", "--output", str(out),
                                         "--backend", "eager"], pipe=tiny_wan_pipeline())
    check_gif(out, 5)
    assert result.report is None
    assert not adaspa_compile.report().sites


def test_loading_wan_without_accelerate_says_what_to_install(monkeypatch, capsys):
    """WanTransformer3DModel.from_pretrained fails without accelerate (fp32-kept modules)."""
    example = load_example("wan", monkeypatch)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "accelerate" else find_spec(name, *a))
    with pytest.raises(SystemExit):
        example.main(["--model", "m", "--output", "x.gif"])
    assert "loading Wan needs accelerate: pip install accelerate" in capsys.readouterr().err


# ----------------------------------------------------------------------------- demo
DEMO_PROMPTS = ["yellow diamond bouncing, camera static", "red square bouncing, camera static"]


@pytest.fixture
def one_thread():
    """One intra-op thread: these shapes gain nothing from more, and on a busy 2-core machine two
    OpenMP threads made the demo test 14x slower (85 s instead of 6 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
def test_demo_samples_the_trained_model_dense_and_sparse(tmp_path, monkeypatch, capsys):
    """``examples/demo.py`` at its smallest: 4 frames of 32x32 pixels (4 x 8 x 8 = 256 video
    tokens + 16 caption tokens, so the demo lowers ``min_seq_len`` to 272 and the block size to
    16), 4 steps with search steps 1 and 2, true CFG (two branches), two captions, eager inner
    backend to skip inductor's compile."""
    from PIL import Image

    demo = load_example("demo", monkeypatch)
    out = tmp_path / "demo.png"
    argv = ["--device", "cpu", "--size", "4x32x32", "--steps", "4", "--inner-backend", "eager",
            "--out", str(out)]
    result = demo.main(argv + [a for p in DEMO_PROMPTS for a in ("--prompt", p)])
    report = result.report
    assert report.clock == "timestep" and report.step == 3, str(report)
    assert len(report.rewritten) == 6 and not report.skipped, str(report)  # 2 dual + 4 single
    for site in report.rewritten:
        assert site.shape == "[2,4,272,64]" and site.text.startswith("last 16"), str(report)
        assert site.phases == {0: "DFCS", 1: "DFCS"}, str(report)
        assert site.mean_density() < 0.5, str(report)
    # The sparse steps changed the clips (identical clips give 100 dB), but not into noise.
    assert len(result.psnr) == 2 and all(15 < v < 60 for v in result.psnr), result.psnr
    assert all(math.isfinite(t) and t > 0 for t in result.seconds.values()), result.seconds
    with Image.open(out) as im:  # a dense and an adaspa row per caption
        assert im.format == "PNG" and im.size[1] > 4 * 32 and im.size[0] > 8 * 32
    printed = capsys.readouterr().out
    assert "PSNR adaspa vs dense" in printed and "adaspa report: 1 model(s), 6 site(s)" in printed
    assert str(out) in printed


@pytest.mark.usefixtures("one_thread")
def test_demo_writes_a_gif(tmp_path, monkeypatch):
    demo = load_example("demo", monkeypatch)
    out = tmp_path / "demo.gif"
    demo.main(["--device", "cpu", "--size", "2x16x16", "--steps", "2", "--inner-backend", "eager",
               "--out", str(out)])
    check_gif(out, 2)


@pytest.mark.parametrize("argv, message", [
    (["--prompt", "purple circle bouncing"], "unknown word(s) purple"),
    (["--prompt", "a cat walks on the grass"], "Valid words: colours red green"),
    (["--prompt", "red circle"] * 3, "give one or two --prompt"),
    (["--size", "8x30x30"], "multiples of the 4-pixel patch"),
    (["--size", "64x64"], "FRAMESxHEIGHTxWIDTH"),
    (["--out", "x.mp4"], "use a .png (frame strip) or a .gif"),
    (["--block-size", "48"], "'block_size' got 48"),
    (["--steps", "8", "--search-steps", "3", "8"], "must come before --steps 8"),
])
def test_demo_bad_command_lines_fail_before_loading(argv, message, monkeypatch, capsys):
    demo = load_example("demo", monkeypatch)
    monkeypatch.setattr("adaspa_compile.fidelity.load_model", None)  # never reached
    with pytest.raises(SystemExit) as exc:
        demo.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------- command line
@pytest.mark.parametrize("argv, message", [
    ([], "--model PATH is required"),
    (["--model", "m", "--output", "x.avi"], "use a .mp4 or .gif"),
    (["--model", "m", "--output", "x.gif", "--sparsity", "1.5"], "'sparsity' got 1.5"),
    (["--model", "m", "--output", "x.gif", "--steps", "8"], "must come before --steps 8"),
    (["--model", "m", "--output", "x.gif", "--search-steps", "5", "2"], "'search_steps'"),
])
def test_bad_command_lines_fail_before_loading(argv, message, monkeypatch, capsys):
    example = load_example("cogvideox", monkeypatch)
    with pytest.raises(SystemExit) as exc:
        example.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_precision_reaches_the_backend_options(monkeypatch):
    example = load_example("wan", monkeypatch)
    parser = example._common.build_parser("x", example.DEFAULTS)
    args = parser.parse_args(["--model", "m", "--precision", "fp8"])
    assert example._common.adaspa_options(args)["precision"] == "fp8"
    assert example._common.adaspa_options(parser.parse_args(["--model", "m"]))["precision"] == \
        "bf16"


def test_mp4_without_a_writer_fails_before_loading(monkeypatch, capsys):
    example = load_example("hunyuan_video", monkeypatch)
    monkeypatch.setattr(example._common, "video_writer_available", lambda: False)
    with pytest.raises(SystemExit):
        example.main(["--model", "m", "--output", "x.mp4"])
    assert "imageio-ffmpeg" in capsys.readouterr().err

