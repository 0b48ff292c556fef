"""Every attention call of a compiled model checked against an oracle written here in plain dense
PyTorch, sharing no code with the runtime or the kernels' reference: dense steps equal SDPA; a
fused search returns dense attention and picks the mask that selection gives on the exact block
mass; a cached search picks the mask of the block mass under the LSE of that branch's fused
search; a sparse step equals attention restricted to the mask of that branch's latest search."""

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import pytest
import torch

from adaspa_compile import ops
from adaspa_compile.runtime import Site, _as_4d
from adaspa_compile.selection import BlockLayout, select_blocks
from tests.dit import TinyDiT, tiny_dit_inputs
from tests.tiny_models import inputs_on_cuda, timestep_like, tiny_hunyuan_video, tiny_wan

pytestmark = pytest.mark.usefixtures("fresh_compile")

OPTIONS = {"min_seq_len": 128, "search_steps": (2, 4), "sparsity": 0.5, "block_size": 16,
           "inner_backend": "aot_eager"}
STEPS = 7
ATOL = 2e-5


@dataclass
class Call:
    site: Site
    branch: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    key_valid: Optional[torch.Tensor]
    scale: float
    phase: str
    out: torch.Tensor
    mask: Optional[torch.Tensor]  # the branch's mask after the call


def record_calls(monkeypatch) -> List[Call]:
    """Every ``Site.forward`` call of the run, with its inputs, phase and output."""
    calls: List[Call] = []
    forward = Site.forward

    def recording(self, q, k, v, attn_mask, scale, step, branch):
        out = forward(self, q, k, v, attn_mask, scale, step, branch)
        key_valid = ops.key_valid_from_mask(_as_4d(attn_mask), q.shape[0], q.shape[2])
        s = float(scale) if scale is not None else q.shape[-1] ** -0.5
        cache = self.caches.get(branch)
        mask = None if cache is None or cache.mask is None else cache.mask.to_dense()
        calls.append(Call(self, branch, q.clone(), k.clone(), v.clone(), key_valid, s,
                          self.phases[branch][-1].letter, out.clone(), mask))
        return out

    monkeypatch.setattr(Site, "forward", recording)
    return calls


# ----------------------------------------------------------------------------- the oracle
def dense_scores(call: Call) -> torch.Tensor:
    """``scale * q k^T`` in float64, ``-inf`` on padded keys."""
    s = call.scale * call.q.double() @ call.k.double().transpose(-1, -2)
    if call.key_valid is not None:
        s = s.masked_fill(~call.key_valid[:, None, None, :].to(s.device), float("-inf"))
    return s


def dense_lse(call: Call) -> torch.Tensor:
    return torch.logsumexp(dense_scores(call), dim=-1)


def mass_of(call: Call, lse: torch.Tensor, block: int) -> torch.Tensor:
    """Exact block mass ``[B, H, nb, nb]`` under ``lse`` (rows of no valid key count 0)."""
    p = torch.exp(dense_scores(call) - lse[..., None]).nan_to_num(0.0)
    L = p.shape[-1]
    nb = -(-L // block)
    p = torch.nn.functional.pad(p, (0, nb * block - L, 0, nb * block - L))
    B, H = p.shape[:2]
    return p.view(B, H, nb, block, nb, block).sum(dim=(3, 5)).float()


def masked_attention(call: Call, block_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Attention over the kept blocks (all with ``None``); 0 for a row that keeps no key."""
    s = dense_scores(call)
    if block_mask is not None:
        block = -(-s.shape[-1] // block_mask.shape[-1])
        keep = block_mask.repeat_interleave(block, -2).repeat_interleave(block, -1)
        s = s.masked_fill(~keep[..., :s.shape[-2], :s.shape[-1]], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return (p @ call.v.double()).to(call.out.dtype)


def selected_mask(call: Call, mass: torch.Tensor) -> torch.Tensor:
    cfg = call.site.cfg
    layout = BlockLayout(seq_len=call.q.shape[2], block_size=cfg.block_size,
                         text_span=call.site.info.text.tokens(call.q.shape[2]),
                         key_valid=call.key_valid)
    return select_blocks(mass, layout, cfg).mask.to_dense()


def check_calls(calls: List[Call], atol: float = ATOL, rtol: float = 1e-4,
                tie: float = 1e-5) -> Dict[str, str]:
    """Walk the calls in order, keeping per (site, branch) the LSE and the mask the oracle
    expects; returns the phase letters per site and branch."""
    lse: Dict[Tuple[str, int], torch.Tensor] = {}
    mask: Dict[Tuple[str, int], torch.Tensor] = {}
    letters: Dict[str, str] = {}
    for i, call in enumerate(calls):
        key = (call.site.name, call.branch)
        letters[f"{key[0]}/b{key[1]}"] = letters.get(f"{key[0]}/b{key[1]}", "") + call.phase
        where = f"call {i}: {key} phase {call.phase}"
        block = call.site.cfg.block_size
        if call.phase == "D":
            expected = masked_attention(call, None)
        elif call.phase == "F":
            expected = masked_attention(call, None)
            lse[key] = dense_lse(call)
            mask[key] = chosen_mask(call, lse[key], block, where, tie)
        elif call.phase == "C":
            mask[key] = chosen_mask(call, lse[key], block, where, tie)
            expected = masked_attention(call, mask[key])
        else:  # sparse: this branch's latest mask, or branch 0's where the branches share it
            shared = call.site.cfg.cfg_mask == "cond" and call.branch > 0
            expected = masked_attention(call, mask[(key[0], 0) if shared else key])
        torch.testing.assert_close(call.out, expected, atol=atol, rtol=rtol,
                                   msg=lambda detail: f"{where}: {detail}")
    return letters


def chosen_mask(call: Call, lse: torch.Tensor, block: int, where: str, tie: float
                ) -> torch.Tensor:
    """The mask the site chose at a search, once checked against the oracle's selection up to
    ties; later steps follow the site's choice among tied blocks."""
    mass = mass_of(call, lse, block)
    assert_same_up_to_ties(call.mask, selected_mask(call, mass), mass, where, tie)
    return call.mask


def assert_same_up_to_ties(chosen: torch.Tensor, expected: torch.Tensor, mass: torch.Tensor,
                           where: str, tol: float = 1e-5) -> None:
    """The masks agree, except where a row swaps blocks of equal mass (float32 against float64
    arithmetic may order exact ties either way)."""
    only_chosen, only_expected = chosen & ~expected, expected & ~chosen
    assert torch.equal(only_chosen.sum(-1), only_expected.sum(-1)), f"{where}: other budgets"
    differ = only_chosen | only_expected
    if differ.any():
        values = mass.masked_fill(~differ, float("nan"))
        spread = values.nan_to_num(float("-inf")).amax(-1) + values.nan_to_num(
            float("inf")).amin(-1).neg()
        worst = float(spread[differ.any(-1)].max())
        assert worst <= tol, f"{where}: the site chose other blocks (mass spread {worst:.2e})"


# ----------------------------------------------------------------------------- models
def run(compiled, kwargs_per_branch, t0=900.0):
    with torch.no_grad():
        for i in range(STEPS):
            for kwargs in kwargs_per_branch:
                compiled(**dict(kwargs, timestep=timestep_like(kwargs["timestep"], t0 - 100 * i)))


def tiny_dit_case():
    torch.manual_seed(0)
    model = TinyDiT().eval()
    cond, uncond = tiny_dit_inputs(seed=0, tokens=256), tiny_dit_inputs(seed=1, tokens=256)
    return model, [cond, uncond]


def wan_case():
    model, kwargs = tiny_wan()
    other = dict(kwargs, encoder_hidden_states=torch.randn_like(kwargs["encoder_hidden_states"]))
    return model, [kwargs, other]


def hunyuan_case():
    model, kwargs = tiny_hunyuan_video(batch_size=1, valid_lens=(17,))
    return model, [kwargs]


CASES = {"tinydit": tiny_dit_case, "wan": wan_case, "hunyuan_video": hunyuan_case}


def on_cuda(model, branches):
    """The model in bf16 on the GPU, its inputs too (the timestep keeps its dtype)."""
    return model.to("cuda", torch.bfloat16), [inputs_on_cuda(b) for b in branches]


MATRIX = [("tinydit", {}), ("tinydit", {"cfg_mask": "cond"}), ("wan", {}),
          ("wan", {"cfg_mask": "cond"}), ("hunyuan_video", {}), ("tinydit", {"head_budget": "layer"})]
GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=GPU)])
@pytest.mark.parametrize("name, extra", MATRIX)
def test_every_step_matches_the_oracle(name, extra, device, monkeypatch):
    """On the CPU the reference path, in fp32; on CUDA the Triton kernels, in bf16 (bf16
    tolerances: the oracle computes in float64 from the same bf16 inputs)."""
    model, branches = CASES[name]()
    options = dict(OPTIONS, **extra)
    tolerances = {}
    if device == "cuda":
        model, branches = on_cuda(model, branches)
        options = dict(options, block_size=64, inner_backend="inductor")
        tolerances = {"atol": 2e-2, "rtol": 2e-2, "tie": 1e-3}
    calls = record_calls(monkeypatch)
    compiled = torch.compile(model, backend="adaspa", options=options)
    run(compiled, branches)
    letters = check_calls(calls, **tolerances)
    assert letters, "no attention call was rewritten"
    own = "DDFSCSS"
    for key, phases in letters.items():
        shared = extra.get("cfg_mask") == "cond" and key.endswith("/b1")
        assert phases == ("DDSSSSS" if shared else own), (key, phases)
