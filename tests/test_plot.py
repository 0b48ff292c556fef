"""`plot_masks`: a PNG of the per-head block masks of one rewritten site."""

import gc
import struct
import sys

import pytest
import torch

import adaspa_compile
from tests.dit import TinyDiT, tiny_dit_inputs

pytestmark = pytest.mark.usefixtures("fresh_compile")

OPTIONS = {"min_seq_len": 128, "search_steps": (1,), "sparsity": 0.5, "inner_backend": "eager"}


def run(heads: int = 4, steps: int = 2, options=OPTIONS, branches: int = 1):
    torch.manual_seed(0)
    model = TinyDiT(heads=heads).eval()
    compiled = torch.compile(model, backend="adaspa", fullgraph=True, options=options)
    inputs = tiny_dit_inputs()
    with torch.no_grad():
        for i in range(steps):
            for _ in range(branches):
                compiled(**dict(inputs, timestep=torch.tensor([1000.0 - 100 * i])))
    return model  # the caller keeps it alive: its adaspa state goes with it


def png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


@pytest.mark.parametrize("heads, max_heads, size", [(4, 8, (1000, 310)), (4, 2, (500, 310)),
                                                    (8, 8, (1000, 560)), (8, 5, (1000, 560))])
def test_png_has_one_panel_per_head(tmp_path, heads, max_heads, size):
    pytest.importorskip("matplotlib")
    model = run(heads=heads)
    path = adaspa_compile.plot_masks(module=model, path=tmp_path / "masks.png",
                                     max_heads=max_heads)
    assert path == str(tmp_path / "masks.png")
    assert png_size(path) == size


def test_png_shows_the_mask(tmp_path):
    """Kept blocks are dark: a denser mask darkens the picture."""
    pytest.importorskip("matplotlib")
    from PIL import Image

    darkness = []
    for sparsity in (0.2, 0.8):
        torch._dynamo.reset()
        gc.collect()
        model = run(options=dict(OPTIONS, sparsity=sparsity, head_budget="uniform"))
        path = adaspa_compile.plot_masks(module=model, site=0,
                                         path=tmp_path / f"m{sparsity}.png")
        pixels = torch.tensor(list(Image.open(path).convert("L").getdata()))
        darkness.append(float((pixels < 64).float().mean()))
    assert darkness[0] > darkness[1] * 1.5 > 0


def test_second_branch_and_explicit_site(tmp_path):
    pytest.importorskip("matplotlib")
    model = run(branches=2)
    sites = [s.site_id for s in adaspa_compile.report().rewritten]
    path = adaspa_compile.plot_masks(module=model, site=sites[-1], branch=1,
                                     path=tmp_path / "b1.png")
    assert png_size(path) == (1000, 310)


def test_unknown_site_is_refused():
    model = run()
    with pytest.raises(ValueError, match=r"unknown adaspa site 99; rewritten sites are \[0, 1\]"):
        adaspa_compile.plot_masks(module=model, site=99)


def test_site_not_searched_yet_is_refused():
    model = run(options=dict(OPTIONS, search_steps=(5,)))
    with pytest.raises(ValueError,
                       match="site 0 .* has no mask for branch 0 yet.*search steps \\(5,\\)"):
        adaspa_compile.plot_masks(module=model, site=0)
    with pytest.raises(ValueError, match="no site has a mask for branch 0 yet"):
        adaspa_compile.plot_masks(module=model)


def test_missing_branch_and_bad_arguments_are_refused():
    model = run()
    with pytest.raises(ValueError, match="no mask for branch 3 yet.*branches with a mask: \\[0\\]"):
        adaspa_compile.plot_masks(module=model, site=0, branch=3)
    with pytest.raises(ValueError, match="max_heads"):
        adaspa_compile.plot_masks(module=model, max_heads=0)
    with pytest.raises(ValueError, match="batch 4 is out of range"):
        adaspa_compile.plot_masks(module=model, batch=4)


def test_nothing_compiled_is_refused():
    with pytest.raises(ValueError, match="no attention site has been rewritten"):
        adaspa_compile.plot_masks()


def test_without_matplotlib_the_error_names_the_extra(monkeypatch, tmp_path):
    model = run()
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"adaspa-compile\[plot\]"):
        adaspa_compile.plot_masks(module=model, path=tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
