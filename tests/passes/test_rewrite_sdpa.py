"""The SDPA pass on small graphs: what it rewrites, what it leaves alone, and why."""

import pytest
import torch
import torch.nn.functional as F

import adaspa_compile
from adaspa_compile import AdaSpaConfig
from adaspa_compile.passes import GraphInputs, run_passes
from adaspa_compile.state import CompiledGraph

pytestmark = pytest.mark.usefixtures("fresh_compile")


def capture(fn, *args, cfg=None, **kwargs):
    """Dynamo-trace ``fn``, run the passes on its graph; return the graph's call targets."""
    cfg = cfg or AdaSpaConfig(min_seq_len=64)
    seen = {}

    def backend(gm, example_inputs):
        inputs = GraphInputs.from_graph(gm)
        gm, sites = run_passes(gm, cfg, inputs)
        seen["targets"] = [n.target for n in gm.graph.nodes if n.op == "call_function"]
        return CompiledGraph(gm.forward, inputs, cfg, sites, [], frame=None)

    with torch.no_grad():
        torch.compile(fn, backend=backend, fullgraph=True)(*args, **kwargs)
    return seen["targets"]


def rewritten(targets):
    return sum(t is torch.ops.adaspa.attention.default for t in targets)


def q(L=128, H=2, B=1, D=8):
    return torch.randn(B, H, L, D)


def skipped_reasons():
    return [s.reason for s in adaspa_compile.report().skipped]


def test_positional_and_keyword_calls_are_both_rewritten():
    def f(x):
        a = F.scaled_dot_product_attention(x, x, x, None, 0.0, False)
        b = F.scaled_dot_product_attention(query=x, key=x, value=x, attn_mask=None, scale=0.5)
        return a + b

    assert rewritten(capture(f, q())) == 2


@pytest.mark.parametrize("make, reason", [
    (lambda x: F.scaled_dot_product_attention(x, x, x, dropout_p=0.1), "dropout_p"),
    (lambda x: F.scaled_dot_product_attention(x, x, x, is_causal=True), "is_causal"),
    (lambda x: F.scaled_dot_product_attention(x, x[:, :, :16], x[:, :, :16]), "cross-attention"),
    (lambda x: F.scaled_dot_product_attention(x[:, :, :32], x[:, :, :32], x[:, :, :32]), "min_seq_len"),
    (lambda x: F.scaled_dot_product_attention(x, x[:, :1], x[:, :1], enable_gqa=True), "grouped-query"),
    (lambda x: F.scaled_dot_product_attention(x, x, x, attn_mask=torch.ones(128, 128, dtype=torch.bool)), "not a key-padding mask"),
    (lambda x: F.scaled_dot_product_attention(x, x, x[..., :4]), "value head dim"),
])
def test_ineligible_calls_stay_and_say_why(make, reason):
    targets = capture(make, q())
    assert rewritten(targets) == 0
    assert any(t is torch._C._nn.scaled_dot_product_attention for t in targets)
    assert any(reason in r for r in skipped_reasons()), skipped_reasons()


@pytest.mark.parametrize("mask", [
    torch.ones(1, 1, 1, 128, dtype=torch.bool),
    torch.zeros(1, 1, 1, 128),
    torch.ones(1, 128, dtype=torch.bool),
    torch.zeros(2, 1, 1, 128),
])
def test_key_padding_masks_are_eligible(mask):
    x = q(B=2)
    assert rewritten(capture(lambda x, m: F.scaled_dot_product_attention(x, x, x, attn_mask=m), x, mask)) == 1


def joint(hidden_states, encoder_hidden_states, text_first=False):
    parts = [encoder_hidden_states, hidden_states] if text_first else [hidden_states, encoder_hidden_states]
    x = torch.cat(parts, dim=1)
    x = x.view(x.shape[0], x.shape[1], 2, -1).transpose(1, 2)
    return F.scaled_dot_product_attention(x, x, x)


@pytest.mark.parametrize("text_first, expected", [(False, "last 20 (graph)"), (True, "first 20 (graph)")])
def test_text_side_is_read_from_the_concat(text_first, expected):
    capture(joint, torch.randn(1, 100, 16), torch.randn(1, 20, 16), text_first=text_first)
    assert adaspa_compile.report().rewritten[0].text == expected


def test_text_override_wins():
    cfg = AdaSpaConfig(min_seq_len=64, text_tokens=("first", 7))
    capture(joint, torch.randn(1, 100, 16), torch.randn(1, 20, 16), cfg=cfg)
    assert adaspa_compile.report().rewritten[0].text == "first 7 (override)"


def test_text_only_attention_stays_dense():
    def refiner(hidden_states, encoder_hidden_states):
        x = encoder_hidden_states.view(1, -1, 2, 8).transpose(1, 2)
        return F.scaled_dot_product_attention(x, x, x), hidden_states

    capture(refiner, torch.randn(1, 100, 16), torch.randn(1, 80, 16))
    assert any("text tokens only" in r for r in skipped_reasons())


def test_rewritten_node_keeps_metadata_and_strides():
    def f(x):
        qv = x.view(1, 128, 2, 8).transpose(1, 2)  # BSHD memory viewed as BHSD
        return F.scaled_dot_product_attention(qv, qv, qv)

    cfg = AdaSpaConfig(min_seq_len=64)
    metas = []

    def backend(gm, example_inputs):
        inputs = GraphInputs.from_graph(gm)
        gm, sites = run_passes(gm, cfg, inputs)
        metas.extend(n.meta for n in gm.graph.nodes if n.target is torch.ops.adaspa.attention.default)
        return CompiledGraph(gm.forward, inputs, cfg, sites, [], frame=None)

    with torch.no_grad():
        torch.compile(f, backend=backend, fullgraph=True)(torch.randn(1, 128, 16))
    val = metas[0]["example_value"]
    assert tuple(val.shape) == (1, 2, 128, 8) and val.stride() == (2048, 8, 16, 1)


@pytest.mark.parametrize("text_first, expected", [(False, "last 64 (graph, by data flow)"),
                                                  (True, "first 64 (graph, by data flow)")])
def test_text_side_follows_the_data_when_lengths_are_equal(text_first, expected):
    def joint_projected(hidden_states, encoder_hidden_states, weight):
        video, text = hidden_states @ weight, encoder_hidden_states @ weight
        return joint(video, text, text_first=text_first)

    capture(joint_projected, torch.randn(1, 64, 16), torch.randn(1, 64, 16), torch.randn(16, 16))
    assert adaspa_compile.report().rewritten[0].text == expected


def test_video_self_attention_as_long_as_the_text_is_not_text_only():
    def video_only(hidden_states, encoder_hidden_states):
        x = hidden_states.view(1, -1, 2, 8).transpose(1, 2)
        return F.scaled_dot_product_attention(x, x, x), encoder_hidden_states

    capture(video_only, torch.randn(1, 80, 16), torch.randn(1, 80, 16))
    assert len(adaspa_compile.report().rewritten) == 1
