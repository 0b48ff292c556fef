"""The two selection kernels against their PyTorch paths (``selection.sorted_candidate_rows`` and
``selection.keep_best``): exact equality of the sorted rows, bits and counts.

Without CUDA the kernels run under Triton's CPU interpreter; the ``gpu``-marked tests run them
compiled, up to the HunyuanVideo 720p row length. Mass maps draw ties on purpose (values from a
few levels), so the tie order of the stable sort is checked; text spans, padded key blocks and
budgets from 0 to the whole row are drawn too. Outputs are poisoned first where the launcher takes
them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adaspa_compile import kernels, selection
from adaspa_compile.config import AdaSpaConfig
from adaspa_compile.selection import BlockLayout

pytest.importorskip("triton")

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
interpreter_only = pytest.mark.skipif(
    HAS_CUDA, reason="interpreter tests run where CUDA is absent; CUDA runs the gpu-marked ones")
# Each interpreted row sorts in Python: keep these runs short in CI.
INTERPRETER_EXAMPLES = min(20, settings.get_profile("kernels-ci").max_examples)


@dataclass(frozen=True)
class SelectCase:
    batch: int
    heads: int
    n_blocks: int
    text: Optional[Tuple[int, int]]  # block range holding text
    padded_tail: int  # key blocks at the end that hold only padding (batch item 0)
    levels: int  # 0: continuous masses; else masses from this many values (ties)
    seed: int


@st.composite
def select_cases(draw, max_blocks: int) -> SelectCase:
    nb = draw(st.sampled_from([1, 2, 8, 9]) | st.integers(1, max_blocks))
    text = None
    if draw(st.booleans()):
        start = draw(st.integers(0, nb - 1))
        text = (start, draw(st.integers(start + 1, nb)))
    return SelectCase(batch=draw(st.integers(1, 2)), heads=draw(st.integers(1, 3)), n_blocks=nb,
                      text=text, padded_tail=draw(st.sampled_from([0, 0, 1, 3])),
                      levels=draw(st.sampled_from([0, 2, 5])), seed=draw(st.integers(0, 2**31 - 1)))


def make_inputs(case: SelectCase, device: str):
    """``(mass, text, valid)`` of a case."""
    gen = torch.Generator().manual_seed(case.seed)
    B, H, nb = case.batch, case.heads, case.n_blocks
    mass = torch.rand(B, H, nb, nb, generator=gen)
    if case.levels:
        mass = torch.floor(mass * case.levels) / case.levels
    text = torch.zeros(nb, dtype=torch.bool)
    if case.text is not None:
        text[case.text[0]:case.text[1]] = True
    valid = torch.ones(B, nb, dtype=torch.bool)
    if case.padded_tail:
        valid[0, max(0, nb - case.padded_tail):] = False
    return mass.to(device), text.to(device), valid.to(device)


def check_sorted_rows(mass, text, valid) -> None:
    want = selection.sorted_candidate_rows(mass, text, valid)
    out = torch.full_like(mass, float("nan"))
    got = kernels.sorted_candidate_mass(mass, text, valid, out=out)
    assert got[0] is out
    assert torch.equal(got[0].cpu(), want[0].cpu()), "sorted rows differ"
    for g, w, what in zip(got[1:], want[1:], ("forced", "total")):
        assert torch.allclose(g.cpu(), w.cpu(), rtol=1e-5, atol=1e-6), f"row {what} mass differs"


def check_keep(mass, text, valid, keep) -> None:
    sorted_mass = selection.sorted_candidate_rows(mass, text, valid)[0]
    want = selection.keep_best(mass, text, valid, keep, sorted_mass)
    got = kernels.kept_block_bits(mass, text, valid, keep, sorted_mass)
    for g, w, what in zip(got, want, ("bits", "counts")):
        assert g.dtype == w.dtype and torch.equal(g.cpu(), w.cpu()), f"{what} differ"


def random_keep(case: SelectCase, device: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(case.seed + 1)
    return torch.randint(0, case.n_blocks + 1, (case.batch, case.heads), generator=gen).to(device)


# ----------------------------------------------------------------------------- interpreter
@interpreter_only
@settings(settings.get_profile("kernels-ci"), max_examples=INTERPRETER_EXAMPLES)
@given(case=select_cases(max_blocks=24))
def test_sorted_candidate_mass_interpreter(case):
    check_sorted_rows(*make_inputs(case, "cpu"))


@interpreter_only
@settings(settings.get_profile("kernels-ci"), max_examples=INTERPRETER_EXAMPLES)
@given(case=select_cases(max_blocks=24))
def test_keep_blocks_interpreter(case):
    check_keep(*make_inputs(case, "cpu"), random_keep(case, "cpu"))


@interpreter_only
@pytest.mark.parametrize("cfg", [AdaSpaConfig(sparsity=0.8), AdaSpaConfig(sparsity=0.5),
                                 AdaSpaConfig(mode="recall", recall=0.9)], ids=str)
def test_select_blocks_kernel_path_equals_pytorch_path(monkeypatch, cfg):
    """``select_blocks`` with the kernels gives the PyTorch path's mask, density and recall."""
    nb, bs = 13, 16
    gen = torch.Generator().manual_seed(3)
    mass = torch.rand(2, 3, nb, nb, generator=gen) ** 4
    key_valid = torch.ones(2, nb * bs - 5, dtype=torch.bool)
    key_valid[1, -40:] = False
    layout = BlockLayout(seq_len=nb * bs - 5, block_size=bs, text_span=(nb * bs - 37, nb * bs - 5),
                         key_valid=key_valid)
    want = selection.select_blocks(mass, layout, cfg)
    calls = []

    def kernels_for(m):
        calls.append(m.shape)
        return kernels

    monkeypatch.setattr(selection, "_selection_kernels", kernels_for)
    got = selection.select_blocks(mass, layout, cfg)
    assert calls
    assert torch.equal(got.mask.bits, want.mask.bits)
    assert (got.mask.max_kept, got.mask.kept_blocks) == (want.mask.max_kept,
                                                         want.mask.kept_blocks)
    assert torch.equal(got.target_sparsity, want.target_sparsity)
    assert torch.allclose(got.density, want.density)
    assert torch.allclose(got.recall, want.recall, rtol=1e-5)


@interpreter_only
def test_selection_kernels_reject_bad_input():
    mass, text, valid = make_inputs(SelectCase(1, 2, 5, None, 0, 0, 0), "cpu")
    with pytest.raises(ValueError, match="fp32"):
        kernels.sorted_candidate_mass(mass.double(), text, valid)
    with pytest.raises(ValueError, match="nb, nb"):
        kernels.sorted_candidate_mass(mass[..., :4], text, valid)
    with pytest.raises(ValueError, match="text_blocks"):
        kernels.sorted_candidate_mass(mass, text[:4], valid)
    one = torch.ones(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="valid_blocks"):
        kernels.kept_block_bits(mass, text, valid.float(), one, mass)
    with pytest.raises(ValueError, match="keep"):
        kernels.kept_block_bits(mass, text, valid, one.T, mass)
    with pytest.raises(ValueError, match="sorted_mass"):
        kernels.kept_block_bits(mass, text, valid, one, mass[..., :1])
    with pytest.raises(ValueError, match="contiguous"):
        kernels.sorted_candidate_mass(mass, text, valid, out=torch.empty(5, 5, 2, 1).permute(
            3, 2, 0, 1))


def test_selection_falls_back_to_pytorch_off_cuda():
    assert selection._selection_kernels(torch.zeros(1, 1, 2, 2)) is None


def test_selection_kernels_refuse_rows_longer_than_they_sort(monkeypatch):
    monkeypatch.setattr(kernels, "SELECTION_MAX_BLOCKS", 4)
    mass = torch.zeros(1, 1, 5, 5, device=DEVICE)
    if HAS_CUDA:
        assert selection._selection_kernels(mass) is None
    with pytest.raises(ValueError, match="at most"):
        monkeypatch.setattr(kernels.candidate_sort, "MAX_BLOCKS", 4)
        kernels.sorted_candidate_mass(mass, torch.zeros(5, dtype=torch.bool, device=DEVICE),
                                      torch.ones(1, 5, dtype=torch.bool, device=DEVICE))


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@settings(settings.get_profile("kernels-gpu"))
@given(case=select_cases(max_blocks=300))
def test_selection_kernels_gpu(case):
    mass, text, valid = make_inputs(case, "cuda")
    check_sorted_rows(mass, text, valid)
    check_keep(mass, text, valid, random_keep(case, "cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("n_blocks,heads,text", [(705, 4, (0, 4)), (1861, 2, (1857, 1861))])
def test_selection_kernels_gpu_full_rows(n_blocks, heads, text):
    """The CogVideoX and HunyuanVideo 720p row lengths (block 64), a text span at either end."""
    case = SelectCase(1, heads, n_blocks, text, 2, 0, 11)
    mass, text_flags, valid = make_inputs(case, "cuda")
    check_sorted_rows(mass, text_flags, valid)
    keep = torch.tensor([[1, n_blocks // 5, n_blocks // 3, n_blocks][:heads]], device="cuda")
    check_keep(mass, text_flags, valid, keep)
