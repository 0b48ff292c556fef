"""The fidelity data set, text encoder, model helpers and sampler (CPU, small sizes)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")

import adaspa_compile  # noqa: E402
from adaspa_compile.fidelity import (  # noqa: E402
    FIDELITY_CONFIG, MAX_TOKENS, TEXT_DIM, TRAIN_SHAPES, VOCAB, WEIGHTS_DIR, Scene, SceneObject,
    TextEncoder, build_model, conditioning, forward_flops, load_model, make_batch,
    null_conditioning, random_captions, render, sample, save_model, tokenize)
from adaspa_compile.fidelity.data import _trajectory  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

TINY = dict(num_layers=1, num_single_layers=1)


# ----------------------------------------------------------------------------- data set
def test_same_seed_same_batch_and_other_seed_differs():
    a = make_batch(3, 4, 32, 32, seed=11)
    b = make_batch(3, 4, 32, 32, seed=11)
    c = make_batch(3, 4, 32, 32, seed=12)
    assert torch.equal(a.pixels, b.pixels) and a.captions == b.captions
    assert torch.equal(a.text, b.text) and torch.equal(a.attention_mask, b.attention_mask)
    assert not torch.equal(a.pixels, c.pixels) and a.captions != c.captions


def test_a_clip_depends_only_on_seed_and_index():
    big = make_batch(4, 4, 32, 32, seed=5)
    small = make_batch(2, 4, 32, 32, seed=5)
    assert torch.equal(big.pixels[:2], small.pixels)
    assert big.captions[:2] == small.captions == random_captions(2, seed=5)


@pytest.mark.parametrize("frames, height, width", [(16, 64, 64), (5, 24, 40)])
def test_shapes_dtypes_and_range(frames, height, width):
    batch = make_batch(3, frames, height, width, seed=0)
    assert batch.pixels.shape == (3, 3, frames, height, width)
    assert batch.pixels.dtype == torch.float32
    assert batch.pixels.min() >= -1 and batch.pixels.max() <= 1
    assert batch.pixels.std() > 0.1  # not a blank clip
    assert batch.text.shape == (3, MAX_TOKENS, TEXT_DIM) and batch.text.dtype == torch.float32
    assert batch.attention_mask.shape == (3, MAX_TOKENS)
    assert batch.attention_mask.dtype == torch.bool
    assert batch.cond.pooled_projections.shape == (3, TEXT_DIM)


def test_padding_mask_matches_the_caption_words():
    batch = make_batch(16, 2, 16, 16, seed=3)
    lengths = batch.attention_mask.sum(1)
    words = torch.tensor([len(c.replace(",", " ").split()) for c in batch.captions])
    assert torch.equal(lengths, words)
    assert len(set(lengths.tolist())) > 2  # caption lengths vary: key padding is exercised
    for row, n in zip(batch.attention_mask, lengths):
        assert row[:n].all() and not row[n:].any()  # valid tokens first, then padding
    padded = ~batch.attention_mask
    assert (batch.text[padded] == 0).all() and (batch.text[~padded].abs().sum(-1) > 0).all()
    mean = (batch.text * batch.attention_mask[..., None]).sum(1) / lengths[:, None]
    torch.testing.assert_close(batch.cond.pooled_projections, mean)


def test_captions_describe_the_scene():
    batch = make_batch(8, 2, 16, 16, seed=9)
    for scene, caption in zip(batch.scenes, batch.captions):
        for o in scene.objects:
            assert f"{o.colour} {o.kind} {o.motion}" in caption
        assert caption.endswith(f"camera {scene.camera}")
        assert ("behind bar" in caption) == (scene.bar is not None)


def _still(kind="circle", colour="red", rgb=(0.92, 0.12, 0.10), at=(0.5, 0.5), size=0.15):
    return SceneObject(kind=kind, colour=colour, motion="pulsing", rgb=rgb, size=size, start=at,
                       velocity=(0.0, 0.0), angle=0.0, spin=0.0, orbit=(0.1, 0.0, 0.0),
                       hop=(0.3, 0.5), pulse=(0.0, 0.0))


def _scene(objects, camera="static", rate=0.0, bar=None):
    return Scene(objects=tuple(objects), aspect=1.0, camera=camera, camera_rate=rate, bar=bar,
                 background=((0.1, 0.1, 0.1), (0.2, 0.2, 0.2), 0.1))


def _red_share(clip):
    rgb = (clip + 1) / 2  # [3, F, H, W]
    return (rgb[0] > 0.7) & (rgb[1] < 0.3)


def test_render_draws_the_shape_where_it_is_and_occludes_back_to_front():
    red = _still()
    blue = _still(colour="blue", rgb=(0.15, 0.3, 0.95), at=(0.5, 0.5), size=0.08)
    clip = render([_scene([red])], 2, 32, 32)[0]
    centre = (clip[:, 0, 16, 16] + 1) / 2
    torch.testing.assert_close(centre, torch.tensor([0.92, 0.12, 0.10]), atol=0.01, rtol=0)
    assert not _red_share(clip)[:, 0, 0].any()  # the corner is background
    front = render([_scene([red, blue])], 1, 32, 32)[0]  # blue drawn last: in front
    assert ((front[:, 0, 16, 16] + 1) / 2)[2] > 0.9
    barred = render([_scene([red], bar=(0.5, 0.05, 0.6))], 1, 32, 32)[0]
    torch.testing.assert_close((barred[:, 0, 16, 16] + 1) / 2, torch.full((3,), 0.6), atol=0.01,
                               rtol=0)


def test_camera_pan_moves_the_scene_the_other_way():
    clip = render([_scene([_still(at=(0.5, 0.5))], camera="pans left", rate=0.3)], 8, 32, 32)[0]
    red = _red_share(clip)  # [F, H, W]
    xs = torch.arange(32.0)
    centroid = [(red[f].float().sum(0) * xs).sum() / red[f].sum() for f in (0, 7)]
    assert centroid[1] - centroid[0] > 2.0  # a camera panning left sees the shape move right


def test_zoom_in_grows_the_shape():
    clip = render([_scene([_still()], camera="zooms in", rate=0.4)], 12, 32, 32)[0]
    area = _red_share(clip).sum((1, 2))
    assert area[-1] > area[0] * 1.3


def test_bouncing_stays_in_the_frame():
    batch = make_batch(64, 1, 8, 8, seed=1)
    t = np.arange(600) / 15.0
    bouncers = [o for s in batch.scenes for o in s.objects if o.motion == "bouncing"]
    assert bouncers
    for o in bouncers:
        x, y, _, _ = _trajectory(o, t, 1.0)
        assert x.min() >= o.size - 1e-6 and x.max() <= 1 - o.size + 1e-6
        assert y.min() >= o.size - 1e-6 and y.max() <= 1 - o.size + 1e-6


# ----------------------------------------------------------------------------- text
def test_tokenize_known_unknown_empty_and_too_long():
    ids = tokenize("Red circle bouncing, camera static")
    assert [VOCAB[i] for i in ids] == ["red", "circle", "bouncing", "camera", "static"]
    assert [VOCAB[i] for i in tokenize("")] == ["<null>"]
    with pytest.raises(ValueError, match=r"outside the vocabulary: \['dog', 'purple'\]"):
        tokenize("purple dog bouncing")
    with pytest.raises(ValueError, match="at most 16 fit"):
        tokenize(" ".join(["red"] * 17))


def test_conditioning_from_seed_equals_the_data_caption():
    cond = conditioning([4, "blue ring orbiting, camera zooms in", 9])
    assert cond.captions[0] == make_batch(1, 1, 8, 8, seed=4).captions[0]
    assert cond.captions[2] == make_batch(1, 1, 8, 8, seed=9).captions[0]
    assert cond.encoder_attention_mask[1].sum() == 6
    null = null_conditioning(2)
    assert null.encoder_attention_mask.sum(1).tolist() == [1, 1]
    with pytest.raises(ValueError, match="caption string or an int seed"):
        conditioning([1.5])


def test_text_encoder_is_fixed_and_round_trips(tmp_path):
    a, b = TextEncoder(), TextEncoder()
    assert torch.equal(a.token_table, b.token_table)
    a.save(str(tmp_path))
    loaded = TextEncoder.load(str(tmp_path))
    assert loaded.vocab == VOCAB and torch.equal(loaded.position_table, a.position_table)
    caps = ["red circle bouncing, camera static"]
    torch.testing.assert_close(loaded(caps).encoder_hidden_states, a(caps).encoder_hidden_states)


# ----------------------------------------------------------------------------- model
def test_shipped_config_size_and_weights_budget(tmp_path):
    model = build_model()
    params = sum(p.numel() for p in model.transformer.parameters())
    assert 4e6 <= params <= 10e6
    cfg = FIDELITY_CONFIG
    assert cfg["num_attention_heads"] >= 4 and cfg["num_layers"] + cfg["num_single_layers"] >= 6
    assert forward_flops(frames=TRAIN_SHAPES[0][0], height=TRAIN_SHAPES[0][1],
                         width=TRAIN_SHAPES[0][2])["tokens"] >= 4096
    assert save_model(model, tmp_path) <= 15_000_000


def test_save_and_load_round_trip(tmp_path):
    model = build_model(TINY, zero_init=False)
    model.transformer.eval()
    save_model(model, tmp_path, dtype=torch.float32)
    loaded = load_model(tmp_path)
    sd = model.transformer.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in loaded.transformer.state_dict().items())
    assert next(loaded.transformer.parameters()).dtype == torch.float32
    cond = conditioning(["green cross spinning, camera pans up"])
    a = sample(model.transformer, cond, steps=2, shape=(2, 16, 16), seed=3)
    b = sample(loaded.transformer, cond, steps=2, shape=(2, 16, 16), seed=3)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)  # same weights, other memory layout
    save_model(model, tmp_path / "bf16")
    assert next(load_model(tmp_path / "bf16").transformer.parameters()).dtype == torch.bfloat16


def test_missing_weights_and_bad_config_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_fidelity_model.py"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="unknown fidelity model config key"):
        build_model({"num_heads": 4})


# ----------------------------------------------------------------------------- sampler
def test_sampler_is_seeded_and_batch_independent():
    model = build_model(TINY, zero_init=False)
    model.transformer.eval()
    cond = conditioning([1, 2])
    pair = sample(model.transformer, cond, steps=3, shape=(2, 16, 16), seed=[7, 8])
    again = sample(model.transformer, cond, steps=3, shape=(2, 16, 16), seed=[7, 8])
    alone = sample(model.transformer, cond.select([1]), steps=3, shape=(2, 16, 16), seed=8)
    assert pair.shape == (2, 3, 2, 16, 16) and pair.dtype == torch.float32
    assert torch.equal(pair, again)
    torch.testing.assert_close(pair[1:], alone, atol=1e-5, rtol=1e-5)
    other = sample(model.transformer, cond, steps=3, shape=(2, 16, 16), seed=[9, 8])
    assert not torch.allclose(other[0], pair[0])
    with pytest.raises(ValueError, match="multiples of the patch size 4"):
        sample(model.transformer, cond, steps=1, shape=(2, 18, 16))


def test_sampler_timestep_is_fp32_every_step():
    """A dtype change at step 1 (the latents turn bf16 after the first scheduler step) would make
    a compiled model recompile; a bf16 timestep would round close steps of a long schedule to
    one value."""
    model = build_model(TINY, zero_init=False)
    transformer = model.transformer.eval().to(torch.bfloat16)
    seen = []
    transformer.register_forward_pre_hook(
        lambda _mod, _args, kwargs: seen.append(kwargs["timestep"].dtype), with_kwargs=True)
    sample(transformer, conditioning([1]), steps=3, shape=(2, 16, 16), seed=0)
    assert seen == [torch.float32] * 6  # 3 steps x (cond, uncond)


@pytest.mark.usefixtures("fresh_compile")
def test_bf16_adaspa_sampling_compiles_once_and_reports_each_layer_once():
    model = build_model(TINY, zero_init=False)
    transformer = model.transformer.eval().to(torch.bfloat16)
    compiled = torch.compile(transformer, backend="adaspa", fullgraph=True,
                             options={"min_seq_len": 128, "search_steps": (2, 4),
                                      "block_size": 16, "inner_backend": "eager"})
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        sample(compiled, conditioning([3]), steps=6, shape=(4, 32, 32), seed=0)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["recompiles"]
    report = adaspa_compile.report(compiled)
    names = [site.name for site in report.rewritten]
    assert sorted(names) == ["single_transformer_blocks.0.attn", "transformer_blocks.0.attn"]
    assert all(site.phases == {0: "DDFSCS", 1: "DDFSCS"} for site in report.rewritten)


@pytest.mark.usefixtures("fresh_compile")
def test_adaspa_sampling_runs_every_phase_per_cfg_branch():
    """Sparsity 0 keeps every block, so all phases must reproduce the dense sampler."""
    model = build_model(TINY, zero_init=False)
    model.transformer.eval()
    cond = conditioning([3, "white square hopping and red ring pulsing behind bar, camera static"])
    compiled = torch.compile(model.transformer, backend="adaspa", fullgraph=True,
                             options={"min_seq_len": 128, "search_steps": (2, 4), "sparsity": 0.0,
                                      "inner_backend": "eager"})
    ours = sample(compiled, cond, steps=6, shape=(4, 32, 32), seed=0)
    dense = sample(model.transformer, cond, steps=6, shape=(4, 32, 32), seed=0)
    torch.testing.assert_close(ours, dense, atol=1e-4, rtol=1e-4)
    report = adaspa_compile.report()
    assert len(report.rewritten) == 2, str(report)
    for site in report.rewritten:
        assert site.phases == {0: "DDFSCS", 1: "DDFSCS"}, str(report)
        assert site.text.startswith("last 16")
        assert site.shape == "[2,4,272,64]"


@pytest.mark.skipif(not (WEIGHTS_DIR / "config.json").is_file(),
                    reason="no trained weights in adaspa_compile/fidelity/weights yet")
def test_shipped_weights_are_the_trained_config():
    model = load_model(dtype=torch.float32)
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in FIDELITY_CONFIG.items()}
    assert {k: model.transformer.config[k] for k in config} == config
    assert model.text_encoder.vocab == VOCAB
    # Trained: it predicts the flow of held-out clips far better than predicting zero.
    batch = make_batch(2, 4, 64, 64, seed=10**12 + 7)  # training uses seeds below 10**10
    noise = torch.randn(batch.pixels.shape, generator=torch.Generator().manual_seed(0))
    x = 0.5 * batch.pixels + 0.5 * noise
    with torch.no_grad():
        pred = model.transformer(hidden_states=x, timestep=torch.full((2,), 500.0),
                                 **batch.cond.model_kwargs(), return_dict=False)[0]
    target = noise - batch.pixels
    assert F.mse_loss(pred, target) < 0.5 * target.pow(2).mean()
