import pytest

from adaspa_compile import AdaSpaConfig


def test_defaults_follow_the_paper():
    cfg = AdaSpaConfig()
    assert (cfg.sparsity, cfg.block_size, cfg.search_steps) == (0.8, 64, (9, 29))
    assert cfg.head_budget == "tiers" and cfg.text_sink and cfg.mode == "sparsity"
    assert cfg.cfg_mask == "per_branch" and cfg.precision == "bf16"


def test_options_build_a_config():
    cfg = AdaSpaConfig.from_options({"sparsity": 0.9, "search_steps": [3, 7],
                                     "text_tokens": ["last", 256]})
    assert cfg.sparsity == 0.9 and cfg.search_steps == (3, 7) and cfg.text_tokens == ("last", 256)
    assert AdaSpaConfig.from_options(None) == AdaSpaConfig()


@pytest.mark.parametrize("options, key", [
    ({"sparsity": 1.0}, "sparsity"),
    ({"sparsity": -0.1}, "sparsity"),
    ({"sparsity": True}, "sparsity"),
    ({"block_size": 48}, "block_size"),
    ({"block_size": 512}, "block_size"),
    ({"search_steps": ()}, "search_steps"),
    ({"search_steps": (5, 3)}, "search_steps"),
    ({"search_steps": (2, 2)}, "search_steps"),
    ({"search_steps": (-1,)}, "search_steps"),
    ({"mode": "topk"}, "mode"),
    ({"recall": 0.0}, "recall"),
    ({"recall": 1.5}, "recall"),
    ({"min_seq_len": 0}, "min_seq_len"),
    ({"inner_backend": "tensorrt"}, "inner_backend"),
    ({"text_tokens": ("middle", 4)}, "text_tokens"),
    ({"text_tokens": 12}, "text_tokens"),
    ({"head_adaptive": 1}, "head_adaptive"),
    ({"share_cfg_mask": "cond"}, "share_cfg_mask"),
    ({"head_budget": "heads"}, "head_budget"),
    ({"head_budget": True}, "head_budget"),
    ({"cfg_mask": "uncond"}, "cfg_mask"),
    ({"cfg_mask": False}, "cfg_mask"),
    ({"precision": "fp16"}, "precision.*bf16 \\| fp8"),
    ({"precision": None}, "precision"),
    ({"preset": "fast"}, "preset.*paper"),
    ({"preset": ["paper"]}, "preset"),
])
def test_bad_values_name_the_key(options, key):
    with pytest.raises(ValueError, match=key):
        AdaSpaConfig.from_options(options)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ValueError, match="unknown adaspa option.*sparsty.*valid keys.*sparsity"):
        AdaSpaConfig.from_options({"sparsty": 0.9})


def test_options_must_be_a_mapping():
    with pytest.raises(ValueError, match="dict"):
        AdaSpaConfig.from_options([("sparsity", 0.9)])


def test_search_steps_given_as_one_int_names_the_key():
    with pytest.raises(ValueError, match=r"'search_steps' got 9.*\(9,\) for one search step"):
        AdaSpaConfig.from_options({"search_steps": 9})


def test_older_names_set_their_replacements():
    def built(**options):
        return AdaSpaConfig.from_options(options)

    assert built(head_adaptive=False).head_budget == "uniform"
    assert built(head_adaptive=True).head_budget == "tiers"
    assert built(share_cfg_mask=True).cfg_mask == "cond"
    assert built(share_cfg_mask=False).cfg_mask == "per_branch"
    with pytest.raises(ValueError, match="'share_cfg_mask' and 'cfg_mask' are both given"):
        built(share_cfg_mask=True, cfg_mask="sum")


def test_the_paper_preset_and_keys_beside_it():
    paper = AdaSpaConfig.from_options({"preset": "paper"})
    assert (paper.sparsity, paper.block_size, paper.search_steps) == (0.8, 64, (9, 29))
    assert (paper.head_budget, paper.cfg_mask, paper.selector, paper.mode) == (
        "tiers", "per_branch", "adaspa", "sparsity")
    assert paper.text_sink and paper.lse_cache
    mine = AdaSpaConfig.from_options({"preset": "paper", "sparsity": 0.9, "share_cfg_mask": True,
                                      "min_seq_len": 64})
    assert mine == paper.replace(sparsity=0.9, cfg_mask="cond", min_seq_len=64)
    with pytest.raises(ValueError, match="'preset' got 'fast'; valid values: paper"):
        AdaSpaConfig.from_options({"preset": "fast"})
