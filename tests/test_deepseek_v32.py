"""DeepSeek-V3.2 checkpoints (``deepseek_v32``: DeepseekV3 with DeepSeek Sparse Attention, a lightning
indexer per MLA layer, its MTP layer's included, keeping each query's ``index_topk`` best keys): flyer's
training-path logits and every layer's selected keys equal transformers' DeepseekV32ForCausalLM; import ->
export -> transformers gives the same tensors and logits (FP8 too); ``train --init`` from a V3.2 directory
runs with the indexer frozen; decoding up to ``index_topk`` positions is dense MLA, transformers' greedy
tokens (past it: ``test_deepseek_v32_decode``); what flyer cannot run is one line naming the field.
Tiny random models (index_topk 8 on 24 to 64 tokens), FP32, CPU."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, DeepseekV32Config, DeepseekV32ForCausalLM

from flyer.cli import main
from flyer.config import ModelConfig, preset
from flyer.errors import ConfigError
from flyer.infer.generate import GenerationConfig, generate
from flyer.interop.export import export
from flyer.interop.export_config import hf_model_type
from flyer.interop.hf import load_hf
from flyer.interop.hf_names import permute_rope
from flyer.model.transformer import Transformer
from tests.hf_models import VOCAB, add_mtp_layer, build, reference_mtp_logits
from tests.test_config import DSV3_HF, _arch
from tests.test_interop_export import tensors
from tests.test_qwen3 import check_round_trip, rel, train_init_then_export
from tests.test_rope_scaling import logit_tolerance


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A tiny random V3.2 directory (index_topk 8, 8 indexer heads of 32 channels, 8 of them rotating;
    random k_norm weight and bias) and transformers' model of it (SDPA on the CPU: the selection is
    folded into its attention mask). On the tokens below no two keys tie at a query's 8th place, and the
    closest 8th and 9th scores differ by 1.6e-4 of the row's largest (FP32 rounding moves them ~1e-6), so
    the two implementations' top-k choose the same keys; a tie (all 8 heads' ReLUs 0 for two keys) would
    leave the choice to each top-k's order."""
    path = tmp_path_factory.mktemp("v32")
    build("v32", path)
    ref = AutoModelForCausalLM.from_pretrained(path).eval()
    assert isinstance(ref, DeepseekV32ForCausalLM) and ref.config._attn_implementation in ("eager", "sdpa")
    return path, ref


def _tokens(T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, T), generator=torch.Generator().manual_seed(seed))


def selections(model, ref, tokens):
    """Per layer with an indexer (all of V3.2's; GLM-5's full ones), the keys each query attends to, (B, T, T)
    bool, as flyer selects them and as transformers' indexer does (its top-k indices; those past the query are
    causally masked anyway); and the logits of both."""
    T = tokens.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    theirs, mine = [], []
    hooks = [layer.self_attn.indexer.register_forward_hook(lambda m, a, out: theirs.append(out.long()))
             for layer in ref.model.layers if getattr(layer.self_attn, "indexer", None) is not None]
    full = [layer for layer in model.layers if hasattr(layer.attn, "indexer")]
    for layer in full:
        def select(scores, visible, _orig=layer.attn.indexer.select):
            mine.append(_orig(scores, visible))
            return mine[-1]
        layer.attn.indexer.select = select
    try:
        with torch.no_grad():
            want, got = ref(tokens).logits, model(tokens)
    finally:
        for h in hooks:
            h.remove()
        for layer in full:
            del layer.attn.indexer.select
    theirs = [torch.zeros(*idx.shape[:2], T, dtype=torch.bool).scatter_(-1, idx, True) & causal for idx in theirs]
    return got, want, mine, theirs


def test_logits_and_selected_keys_equal_transformers(src):
    """At 64 tokens (each query past the 8th keeps 8 of its keys) every layer selects transformers' keys
    for every query, and the logits are within ``logit_tolerance`` (the rounding of dense MLA's sums: the
    selection is the same discrete choice on both sides); at 8 tokens (every causal key selected) flyer
    skips the indexer, and the logits are transformers' there too."""
    path, ref = src
    model, cfg, _ = load_hf(path)
    assert (cfg.index_topk, cfg.index_n_heads, cfg.index_head_dim, cfg.qk_rope_head_dim) == (8, 8, 32, 8)
    assert (cfg.n_dense_layers, cfg.score_func, cfg.router_bias, cfg.n_expert_groups) == (1, "sigmoid", True, 4)
    T = 64
    got, want, mine, theirs = selections(model, ref, _tokens(T))
    assert len(mine) == len(theirs) == cfg.n_layers
    for layer, (a, b) in enumerate(zip(mine, theirs)):
        assert torch.equal(a.squeeze(1), b), f"layer {layer}: flyer selects other keys than transformers"
        assert (a.sum(-1) == torch.arange(T).clamp(max=7) + 1).all()  # min(index_topk, t + 1) keys per query
    err, tol = rel(got, want), logit_tolerance(cfg, T)
    assert err <= tol, f"{err:.3g} > {tol:.3g}"
    short = _tokens(8, 1)
    got, want, mine, _ = selections(model, ref, short)
    assert mine == []  # T <= index_topk: dense MLA, the indexer not run
    assert rel(got, want) <= logit_tolerance(cfg, 8)


def _raw_indexer(model, ref, names: tuple[str, ...]):
    """``model`` with the indexer tensors ``names`` as the file stores them (rotate-half rows, not permuted)."""
    out = Transformer(model.cfg).eval()
    out.load_state_dict(model.state_dict())
    with torch.no_grad():
        for mine, theirs in zip(out.layers, ref.model.layers):
            for name in names:
                mine.attn.indexer.get_parameter(name).copy_(theirs.self_attn.indexer.get_parameter(name))
    return out


def test_transformers_4_spelling_reads_alike(src, tmp_path):
    """The hub's spelling (rope_theta + rope_scaling, topk_method / scoring_func) is the same config, and
    transformers computes it as flyer does."""
    build("v32", tmp_path, spelling=4)
    model, cfg, _ = load_hf(tmp_path)
    assert cfg == load_hf(src[0])[1]
    ref = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert rel(model(_tokens(32)), ref(_tokens(32)).logits) <= logit_tolerance(cfg, 32)


def test_mutations_of_the_indexer_are_far_outside_the_tolerance(src):
    """The same weights computed as an indexer rotating interleaved pairs (its rows left in the file's
    rotate-half order), with only k_norm's channels left unpermuted, or with no selection (dense MLA)
    are far from transformers' logits at 64 tokens."""
    path, ref = src
    model, cfg, _ = load_hf(path)
    T = 64
    tokens = _tokens(T)
    tol = logit_tolerance(cfg, T)
    interleaved = _raw_indexer(model, ref, ("wq_b.weight", "wk.weight", "k_norm.weight", "k_norm.bias"))
    unpermuted_norm = _raw_indexer(model, ref, ("k_norm.weight", "k_norm.bias"))
    dense = Transformer(cfg.replace(index_topk=0)).eval()
    dense.load_state_dict({k: v for k, v in model.state_dict().items() if ".indexer." not in k})
    with torch.no_grad():
        want = ref(tokens).logits
        for name, wrong in (("interleaved", interleaved), ("k_norm unpermuted", unpermuted_norm), ("dense", dense)):
            err = rel(wrong(tokens), want)
            assert err > 100 * tol, f"{name}: {err:.3g} is within 100x the tolerance {tol:.3g}"


def test_mtp_layer_has_an_indexer_and_equals_reference(tmp_path):
    """DeepSeek's MTP layer (decoder layer L) is a V3.2 layer: its indexer loads (rope rows permuted) and
    selects as transformers' layer does on 20 tokens."""
    ref = build("v32", tmp_path)
    w, layer = add_mtp_layer(ref, tmp_path)
    assert f"model.layers.{ref.config.num_hidden_layers}.self_attn.indexer.k_norm.bias" in w
    model, cfg, _ = load_hf(tmp_path)
    assert cfg.mtp_depth == 1 and hasattr(model.mtp[0].block.attn, "indexer")
    tokens = _tokens(20, 1)
    want = reference_mtp_logits(ref, w, layer, tokens)
    with torch.no_grad():
        got = model.head(model.mtp[0].norm(model.mtp_hidden(model.hidden(tokens), tokens)[0]))
    assert rel(got, want) <= logit_tolerance(cfg, 20)


def test_import_export_round_trip_loads_in_transformers(src, tmp_path, capsys):
    """The export writes the source's tensors bit for bit (the indexer's rope rows and k_norm channels
    permuted back to rotate-half, MLA's left interleaved) as deepseek_v32, without rope_interleave."""
    a = tensors(src[0])
    assert "model.layers.0.self_attn.indexer.k_norm.bias" in a
    check_round_trip(src, tmp_path, capsys, "deepseek_v32", DeepseekV32ForCausalLM,
                     {"architectures": ["DeepseekV32ForCausalLM"], "index_topk": 8, "index_n_heads": 8,
                      "index_head_dim": 32, "first_k_dense_replace": 1})
    assert "rope_interleave" not in json.loads((tmp_path / "out" / "config.json").read_text())


def test_fp8_export_keeps_the_indexer_weights_as_transformers_reads_them(src, tmp_path):
    """FP8: the indexer's wq_b and wk as E4M3 codes with block scales (as DeepSeek's V3.2 FP8 checkpoints
    store them), weights_proj and k_norm in high precision (transformers computes weights_proj in FP32);
    transformers reads the export as flyer dequantizes it (``test_export_fp8_transformers``), and flyer
    imports it with its rope rows permuted as in BF16."""
    path, _ = src
    export(path, tmp_path / "fp8", "fp8")
    t = tensors(tmp_path / "fp8")
    pre = "model.layers.1.self_attn.indexer."
    assert t[pre + "wq_b.weight"].dtype == t[pre + "wk.weight"].dtype == torch.float8_e4m3fn
    assert pre + "wq_b.weight_scale_inv" in t and pre + "wk.weight_scale_inv" in t
    for name in ("weights_proj.weight", "k_norm.weight", "k_norm.bias"):
        assert t[pre + name].dtype == torch.bfloat16 and pre + name + "_scale_inv" not in t
    export(tmp_path / "fp8", tmp_path / "bf16", "bf16")
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "fp8", dtype=torch.bfloat16).state_dict()
    want = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16).state_dict()
    assert all(torch.equal(got[k], w) for k, w in want.items())
    # flyer's import of it: each E4M3 code (3 mantissa bits) times its scale is within 2^-4 of the weight
    fp8, exact = load_hf(tmp_path / "fp8", dtype=torch.float32)[0], load_hf(path)[0]
    for name in ("wq_b.weight", "wk.weight"):
        assert rel(fp8.layers[1].attn.indexer.get_parameter(name), exact.layers[1].attn.indexer.get_parameter(name)) \
            <= 2.0**-4


def test_train_init_from_v32_then_export(src, tmp_path, capsys):
    """A step of ``flyer train --init`` on 16-token sequences (the indexer selecting): the indexer is
    frozen (not trained: no gradient, no weight decay), everything else learns, and the run's logits are
    the export's in transformers."""
    model, cfg, back = train_init_then_export(src, tmp_path, capsys, "deepseek_v32")
    start = load_hf(src[0])[0]
    for name, p in model.named_parameters():
        before = start.get_parameter(name)
        if ".indexer." in name:
            assert not p.requires_grad and torch.equal(p, before), name
    assert not torch.equal(model.layers[1].attn.wq_b.weight, start.layers[1].attn.wq_b.weight)
    x = _tokens(24, 2)
    with torch.no_grad():
        assert rel(model(x), back(x).logits) <= logit_tolerance(cfg, 24)


def test_greedy_up_to_index_topk_is_dense_mla_and_flyer_generate_decodes_past_it(src, capsys, monkeypatch):
    """Up to index_topk positions DSA is dense MLA (the indexer would select every key: the decoder does
    not score them) and the greedy tokens are transformers'; ``flyer generate`` decodes past index_topk
    with the indexer keys cached (``tests/test_deepseek_v32_decode.py`` holds it to the training path)."""
    path, ref = src
    model, cfg, _ = load_hf(path)
    prompt = _tokens(3, 3)[0]
    out = ref.generate(prompt[None], do_sample=False, max_new_tokens=5, eos_token_id=None, pad_token_id=0)
    gen = GenerationConfig(max_new_tokens=5, cache_dtype=torch.float32, eos_id=None)

    def unused(*args):
        raise AssertionError("the indexer scored the keys of queries that see at most index_topk of them")
    for layer in model.layers:
        monkeypatch.setattr(layer.attn.indexer, "scores", unused)
    assert generate(model, [prompt.tolist()], gen).tokens[0] == out[0, 3:].tolist()
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(path), "--prompt", "hello world", "--max-new-tokens", "16",
                 "--device", "cpu"]) == 0


DSV32_HUB = {  # deepseek-ai/DeepSeek-V3.2-Exp config.json: V3's with the indexer's three fields
    **DSV3_HF, "architectures": ["DeepseekV32ForCausalLM"], "model_type": "deepseek_v32", "index_topk": 2048,
    "index_n_heads": 64, "index_head_dim": 128}


def test_hub_config_is_the_preset():
    fp8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    cfg = ModelConfig.from_dict({**DSV32_HUB, "quantization_config": fp8})
    assert _arch(cfg) == _arch(preset("dsv32")) and cfg.mtp_depth == 1
    assert _arch(preset("dsv32").replace(index_topk=0)) == _arch(preset("dsv3"))


@pytest.mark.parametrize("change", [
    {},
    {"first_k_dense_replace": 2},
    {"mlp_layer_types": ["dense", "dense", "sparse", "sparse"]},
    {"mlp_layer_types": ["dense", "sparse", "sparse", "sparse"], "first_k_dense_replace": 1},
])
def test_missing_fields_and_dense_layers_read_as_transformers_reads_them(change):
    """Fields a V3.2 config.json leaves out take DeepseekV32Config's defaults (first_k_dense_replace 3,
    index_topk 2048, 64 heads of 128, V3's routing); its dense layers are mlp_layer_types', else the first
    first_k_dense_replace."""
    d = {"model_type": "deepseek_v32", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 4,
         "num_attention_heads": 2, **change}
    cfg, theirs = ModelConfig.from_dict(d), DeepseekV32Config(**{k: v for k, v in d.items() if k != "model_type"})
    assert cfg.n_dense_layers == theirs.mlp_layer_types.count("dense")
    assert theirs.mlp_layer_types == ["dense"] * cfg.n_dense_layers + ["sparse"] * (4 - cfg.n_dense_layers)
    for mine, field in (("index_topk", "index_topk"), ("index_n_heads", "index_n_heads"),
                        ("index_head_dim", "index_head_dim"), ("q_lora_rank", "q_lora_rank"),
                        ("n_routed_experts", "n_routed_experts"), ("n_expert_groups", "n_group"),
                        ("n_limited_groups", "topk_group"), ("route_scale", "routed_scaling_factor"),
                        ("qk_rope_head_dim", "qk_rope_head_dim"), ("max_seq_len", "max_position_embeddings")):
        assert getattr(cfg, mine) == getattr(theirs, field), mine


@pytest.mark.parametrize("fields, field", [
    (dict(index_topk=-1), "index_topk"),
    (dict(index_topk=8, q_lora_rank=0), "q_lora_rank"),
    (dict(index_topk=8, index_n_heads=0), "index_n_heads"),
    (dict(index_topk=8, index_head_dim=8), "index_head_dim"),  # fewer than its 16 rope channels
    (dict(index_topk=8, index_head_dim=33), "index_head_dim"),
    (dict(index_topk=8, attn="gqa", n_kv_heads=2, head_dim=32, q_lora_rank=0, n_dense_layers=4), "index_topk"),
])
def test_impossible_indexer_configs_are_one_line(fields, field):
    with pytest.raises(ConfigError, match=f"^config field '{field}': ") as e:
        preset("tiny", **fields)
    assert "\n" not in str(e.value)


def test_what_flyer_cannot_read_or_write_is_one_line(src, tmp_path, capsys):
    """A V3.2 config.json with no key to keep (index_topk 0), without query compression, with a
    first_k_dense_replace its mlp_layer_types contradict, a non-integer field, or an indexer whose RoPE rotates
    interleaved pairs (vLLM reads ``indexer_rope_interleave``; DeepSeek's fixed code and transformers rotate halves);
    an indexer on a softmax-routed MLA model, which no transformers architecture has, on export."""
    path, _ = src
    d = json.loads((path / "config.json").read_text())
    for change, field in ((dict(index_topk=0), "index_topk"), (dict(q_lora_rank=None), "q_lora_rank"),
                          (dict(first_k_dense_replace=2), "first_k_dense_replace"),
                          (dict(index_head_dim="32"), "index_head_dim"),
                          (dict(indexer_rope_interleave=True), "indexer_rope_interleave")):
        p = tmp_path / "config.json"
        p.write_text(json.dumps({**d, **change}))
        capsys.readouterr()
        assert main(["info", "--config", str(p)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("flyer: error: ") and f"'{field}'" in err and "\n" not in err, (field, err)
    softmax = preset("tiny", index_topk=8, score_func="softmax", router_bias=False, norm_topk_prob=False)
    with pytest.raises(ConfigError, match="config field 'index_topk'"):
        hf_model_type(softmax)
    assert hf_model_type(preset("tiny", index_topk=8)) == "deepseek_v32"
    assert hf_model_type(preset("tiny")) == "deepseek_v3"
    # without an indexer an MLA model is what it was: no indexer tensors
    assert not any(".indexer." in k for k in Transformer(preset("tiny")).state_dict())
    assert permute_rope(torch.arange(32.0), (32, 0, 8))[:8].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def test_selection_breaks_ties_at_the_cut_by_slot_whatever_the_shape():
    """Keys tied at the index_topk-th score (every indexer head's ReLU 0: exactly 0) go to the earliest
    slots, the same for a query scored alone or among others; no more than index_topk, only visible."""
    from flyer.config import preset
    from flyer.model.attention import Indexer

    idx = Indexer(preset("tiny", index_topk=3, index_n_heads=2, index_head_dim=32))
    row = torch.tensor([0.0, 2.0, 0.0, 0.0, 1.0, 0.0])
    visible = torch.ones(6, dtype=torch.bool)
    alone = idx.select(row.view(1, 1, 6), visible.view(1, 1, 6))[0, 0]
    assert alone.tolist() == [True, True, False, False, True, False]
    batch = torch.stack([row.flip(0), row, torch.zeros(6)]).view(3, 1, 6).expand(3, 5, 6).contiguous()
    many = idx.select(batch, visible.expand(3, 5, 6))
    assert torch.equal(many[1], alone.expand(5, 6)) and many[2, 0].tolist() == [True] * 3 + [False] * 3
    hidden = visible.clone()
    hidden[1] = False  # an invisible key is never selected, whatever its score
    assert idx.select(row.view(1, 1, 6), hidden.view(1, 1, 6))[0, 0].tolist() == [True, False, True, False, True,
                                                                                   False]
    few = torch.tensor([True, True, False, False, False, False])
    assert idx.select(row.view(1, 1, 6), few.view(1, 1, 6))[0, 0].tolist() == few.tolist()


def test_training_flops_count_the_selected_keys_and_the_indexer():
    """Per layer and token, attention costs 2 H (qk + v) per attended key: a query at position t attends
    to min(t, index_topk) keys (the mean over positions taken by the midpoint rule on a fine grid, the
    continuous form of the dense count seq_len / 2), and the indexer scores all t of a query that sees more than
    index_topk (2 H_idx (d + 1) each); one that sees fewer keeps them all and needs none, so up to index_topk tokens
    V3.2 is V3. Frozen (``flyer train``'s default), the indexer runs forward only: V3.2 costs less than V3 at 4K
    tokens; trained by its KL loss it costs more there, and far less at 128K either way (the selection)."""
    import numpy as np

    from flyer.config import preset
    from flyer.model.counts import attention_flops_per_token, training_flops_per_token

    v3, v32 = preset("dsv3"), preset("dsv32")
    per_key, per_index_key = 2 * v32.n_heads * (v32.qk_head_dim + v32.v_head_dim), 2 * 64 * (128 + 1)
    for S in (1024, 2048, 4096, 131072):
        t = (np.arange(1 << 20) + 0.5) / (1 << 20) * S
        want = per_key * np.minimum(t, 2048).mean() + per_index_key * (t * (t > 2048)).mean()
        assert attention_flops_per_token(v32, S) == pytest.approx(want, rel=1e-9)
        assert attention_flops_per_token(v32, S, causal=False) == pytest.approx(
            per_key * min(S, 2048) + per_index_key * S * (S > 2048), rel=1e-12)
    assert attention_flops_per_token(v32, 2048) == attention_flops_per_token(v3, 2048)
    assert training_flops_per_token(v32, 2048) == training_flops_per_token(v3, 2048)
    assert training_flops_per_token(v32, 4096) < training_flops_per_token(v3, 4096)
    assert training_flops_per_token(v32, 4096, indexer_train="sparse") > training_flops_per_token(v3, 4096)
    assert training_flops_per_token(v32, 131072, indexer_train="sparse") < 0.5 * training_flops_per_token(v3, 131072)
    assert training_flops_per_token(v32, 131072) < 0.5 * training_flops_per_token(v3, 131072)
