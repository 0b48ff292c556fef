"""benchmarks/kernel_speed.py's peers on the CPU: the probe, the error rows, the STA mask.

The peers (vsa, st-attn, sageattention, cache-dit) are not installed here, and the script's
timing needs CUDA; these tests check what runs before and around it: a peer that does not import
or fails at its call becomes a row with the reason, never the end of the run.
"""

from __future__ import annotations

import sys

import pytest
import torch

from tests.scripts import ROOT, load_script

SCRIPT = ROOT / "benchmarks" / "kernel_speed.py"


@pytest.fixture
def ks(monkeypatch):
    return load_script(SCRIPT, monkeypatch)


def test_absent_peers_become_error_rows(ks, monkeypatch):
    for module in ks.PEERS.values():
        monkeypatch.setitem(sys.modules, module, None)  # import of it raises ImportError
    modules, rows = ks.probe_peers(list(ks.PEERS))
    assert modules == {}
    by_what = {r["what"]: r for r in rows}
    for name in ("vsa", "st-attn", "sageattention"):
        row = by_what[f"{name} import ({ks.PEERS[name]})"]
        assert row["error"].startswith("ModuleNotFoundError") and ks.PEERS[name] in row["error"]
        assert "ms" not in row
    assert by_what["cache-dit"]["not_applicable"].startswith("a step cache")
    assert "e2e.py" in by_what["cache-dit"]["not_applicable"]


def test_probe_reports_any_exception_at_import_and_keeps_those_that_import(ks):
    fake_sage = object()

    def import_module(name):
        if name == "sageattention":
            return fake_sage
        if name == "vsa":  # vsa asks the CUDA device's capability at import
            raise RuntimeError("Found no NVIDIA driver on your system.")
        raise ModuleNotFoundError(f"No module named {name!r}")  # st_attn: absent

    modules, rows = ks.probe_peers(["vsa", "st-attn", "sageattention"], import_module)
    assert modules == {"sageattention": fake_sage}
    assert [r["what"] for r in rows] == ["vsa import (vsa)", "st-attn import (st_attn)"]
    assert rows[0]["error"] == "RuntimeError: Found no NVIDIA driver on your system."
    assert rows[1]["error"].startswith("ModuleNotFoundError: No module named 'st_attn'")


def test_probe_imports_the_extension_a_peer_hides(ks):
    # st_attn imports st_attn_cuda inside try/except: the package imports, the kernel is None
    def import_module(name):
        if name == "st_attn_cuda":
            raise ImportError("libcudart.so.12: cannot open shared object file")
        return object()

    modules, rows = ks.probe_peers(["st-attn"], import_module)
    assert modules == {}
    assert rows == [{"shape": "-", "what": "st-attn import (st_attn)",
                     "error": "ImportError: libcudart.so.12: cannot open shared object file"}]


def test_a_failing_peer_call_becomes_an_error_row(ks):
    def call():
        raise AssertionError("Input tensors must be on cuda.")

    timed = []
    row = ks.timed_row("wan", "sageattention sageattn", call, torch.zeros(2), 100,
                       timer=lambda fn, rep: timed.append(fn) or 1.0)
    assert row == {"shape": "wan", "what": "sageattention sageattn",
                   "error": "AssertionError: Input tensors must be on cuda."}
    assert not timed  # a failed first call is not timed


def test_a_failing_timing_becomes_an_error_row(ks):
    def timer(fn, rep):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    row = ks.timed_row("hunyuan", "vsa", lambda: torch.ones(3), torch.ones(3), 100,
                       extra={"density": 0.2}, timer=timer)
    assert row["error"].startswith("RuntimeError: CUDA error")
    assert row["density"] == 0.2 and "ms" not in row and "rel_err" not in row


def test_a_peer_that_runs_gets_time_and_relative_error(ks):
    ref = torch.tensor([3.0, 4.0])
    row = ks.timed_row("wan", "peer", lambda: ref + torch.tensor([0.03, 0.04]), ref, 100,
                       flops=2e9, timer=lambda fn, rep: 2.0)
    assert row["ms"] == 2.0 and row["tflops"] == pytest.approx(1.0)  # 2 GFLOP in 2 ms
    assert row["rel_err"] == pytest.approx(0.01)


def test_peers_flag(ks):
    def error(msg):
        raise SystemExit(msg)

    assert ks.parse_peers("all", error) == list(ks.PEERS)
    assert ks.parse_peers("none", error) == []
    assert ks.parse_peers("vsa, sageattention", error) == ["vsa", "sageattention"]
    with pytest.raises(SystemExit, match="unknown peer 'flash'"):
        ks.parse_peers("vsa,flash", error)


def test_show_prints_errors_and_not_applicable(ks, capsys):
    ks.show({"shape": "-", "what": "vsa import (vsa)", "error": "ImportError: x"})
    ks.show({"shape": "cogvideox", "what": "st-attn", "not_applicable": "canvas"})
    out = capsys.readouterr().out
    assert "error: ImportError: x" in out and "n/a: canvas" in out


@pytest.mark.parametrize("grid,density,window", [
    ((5, 6, 10), 0.2, (3, 3, 7)), ((5, 6, 10), 0.1, (3, 3, 3)),
    ((3, 6, 10), 0.2, (1, 5, 7)), ((3, 6, 10), 0.1, (1, 3, 5))])
def test_sta_window_nearest_density(ks, grid, density, window):
    assert ks.sta_window(grid, density) == window
    assert all(w % 2 == 1 and w <= g for w, g in zip(window, grid))


def _sta_token_reference(canvas, window, text, tile=(6, 8, 8)):
    """STA's pattern token by token, from its definition (tile-major tokens, window centre
    clamped inside the tile grid, video -> all text, text -> all)."""
    grid = [c // t for c, t in zip(canvas, tile)]
    per_tile = tile[0] * tile[1] * tile[2]
    nv = canvas[0] * canvas[1] * canvas[2]
    tok = torch.arange(nv) // per_tile
    t, h, w = tok // (grid[1] * grid[2]), tok // grid[2] % grid[1], tok % grid[2]
    near = torch.ones(nv, nv, dtype=torch.bool)
    for d, c in enumerate((t, h, w)):
        centre = c.clamp(window[d] // 2, grid[d] - 1 - window[d] // 2)
        near &= (centre[:, None] - c[None, :]).abs() <= window[d] // 2
    mask = torch.ones(nv + text, nv + text, dtype=torch.bool)
    mask[:nv, :nv] = near
    return mask


@pytest.mark.parametrize("window,text", [((1, 1, 1), 0), ((1, 3, 3), 128), ((3, 1, 3), 64)])
def test_sta_block_mask_matches_the_token_pattern(ks, window, text):
    canvas = (18, 16, 24)  # a 3 x 2 x 3 tile grid, small enough for a token-level mask
    blocks = ks.sta_block_mask(canvas, window, text, bs=64)
    tokens = _sta_token_reference(canvas, window, text)
    nb = blocks.shape[0]
    assert nb * 64 == tokens.shape[0]
    pooled = tokens.view(nb, 64, nb, 64)
    assert torch.equal(pooled.all(-1).all(1), blocks)  # every block all in or all out
    assert torch.equal(pooled.any(-1).any(1), blocks)


def test_sta_block_mask_density_at_the_hunyuan_canvas(ks):
    canvas, text = ks.STA_CANVAS["hunyuan"]
    window = ks.sta_window([5, 6, 10], 0.1)
    mask = ks.sta_block_mask(canvas, window, text)
    nv = 30 * 48 * 80 // 64
    assert mask.shape == (nv + 4, nv + 4)
    # the clamped window keeps the same number of tiles for every query tile
    assert mask[:nv, :nv].sum(-1).unique().tolist() == [27 * 6]
    with pytest.raises(ValueError, match="does not divide"):
        ks.sta_block_mask(canvas, window, text, bs=256)


def _bhsd(H, L, D):
    """q, k, v as the script has them: BSHD memory viewed as BHSD."""
    torch.manual_seed(0)
    return [torch.randn(1, L, H, D).transpose(1, 2) for _ in range(3)]


def _masked_attention(q, k, v, token_mask):
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return scores.masked_fill(~token_mask, float("-inf")).softmax(-1) @ v


def test_vsa_call_pads_to_64_token_blocks(ks):
    H, L, D = 2, 150, 16  # 3 blocks, the last one 22 tokens
    q, k, v = _bhsd(H, L, D)
    block_map = torch.rand(1, H, 3, 3) < 0.6
    block_map |= torch.eye(3, dtype=torch.bool)

    class FakeVSA:  # block_sparse_attn as documented: padded inputs, valid tokens per block
        @staticmethod
        def block_sparse_attn(qp, kp, vp, bmap, sizes):
            assert qp.shape[2] == 192 and qp.is_contiguous() and bmap.dtype == torch.bool
            assert sizes.tolist() == [64, 64, 22]
            valid = torch.arange(192) % 64 < sizes.repeat_interleave(64)
            tokens = bmap.repeat_interleave(64, 2).repeat_interleave(64, 3) & valid
            return _masked_attention(qp, kp, vp, tokens), None

    out = ks.vsa_call(FakeVSA, q, k, v, block_map, L)()
    tokens = block_map.repeat_interleave(64, 2).repeat_interleave(64, 3)[..., :L, :L]
    assert out.shape == q.shape
    assert torch.allclose(out, _masked_attention(q, k, v, tokens), atol=1e-5)


def test_sta_call_passes_a_window_per_head_and_the_canvas(ks):
    q, k, v = _bhsd(3, 64, 8)
    seen = {}

    class FakeSTA:
        @staticmethod
        def sliding_tile_attention(qa, ka, va, windows, text, has_text, canvas):
            seen.update(contiguous=qa.is_contiguous(), windows=windows, text=text,
                        has_text=has_text, canvas=canvas)
            return qa

    ks.sta_call(FakeSTA, q, k, v, (3, 3, 7), 256, (30, 48, 80))()
    assert seen == {"contiguous": True, "windows": [(3, 3, 7)] * 3, "text": 256,
                    "has_text": True, "canvas": "30x48x80"}
    ks.sta_call(FakeSTA, q, k, v, (1, 5, 7), 0, (18, 48, 80))()
    assert seen["has_text"] is False and seen["canvas"] == "18x48x80"


def test_sage_call_gives_sageattn_copies_in_nhd(ks):
    q, k, v = _bhsd(2, 32, 64)
    k_before = k.clone()

    class FakeSage:  # smooth_k subtracts k's mean in place, as sageattn does
        @staticmethod
        def sageattn(qs, ks_, vs, tensor_layout, is_causal, sm_scale):
            assert tensor_layout == "NHD" and qs.shape == (1, 32, 2, 64) and not is_causal
            ks_ -= ks_.mean(dim=1, keepdim=True)
            scores = torch.einsum("bqhd,bkhd->bhqk", qs, ks_) * sm_scale
            return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), vs)

    out = ks.sage_call(FakeSage, q, k, v, 64 ** -0.5)()
    assert torch.equal(k, k_before)  # our k is untouched
    assert torch.allclose(out, _masked_attention(q, k, v, torch.ones(32, 32, dtype=torch.bool)),
                          atol=1e-5)
