"""GLM-5 / GLM-5.1 checkpoints (``glm_moe_dsa``: DeepSeek-V3.2's MLA and DSA indexer, the indexer rotating
interleaved pairs, with cross-layer top-k sharing: ``indexer_types`` marks a layer "shared", which has no
indexer and attends to the keys the nearest full layer before it selected). flyer's training-path logits and
every full layer's selected keys equal transformers' GlmMoeDsaForCausalLM; the decoder (shared layers keep no
indexer keys) equals the training path, ``generate`` and the serving engine give transformers' greedy tokens;
the MTP layer loads with its own indexer; import -> export -> transformers gives the same tensors and logits
with nothing missing or unexpected; ``train --init`` runs; counts, caches and pipeline stages know shared
layers; what flyer cannot read is one line naming the field. Mutations (the indexer's rows permuted as
V3.2's, shared layers given fresh indexers, or another full layer's selection) land far outside the bound.
A tiny random model (6 layers full/shared/full/shared/shared/full, index_topk 8 on 24 to 64 tokens), FP32,
CPU."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, GlmMoeDsaConfig, GlmMoeDsaForCausalLM

from flyer.cli import main
from flyer.config import ModelConfig, preset
from flyer.errors import ConfigError, FieldError
from flyer.infer.cache import make_cache
from flyer.infer.decoder import Decoder
from flyer.infer.generate import GenerationConfig, generate
from flyer.interop.export import export_model
from flyer.interop.export_config import hf_config, hf_model_type
from flyer.interop.hf import load_hf
from flyer.interop.hf_names import permute_rope
from flyer.model.counts import attention_flops_per_token, kv_cache_bytes_per_token, param_counts
from flyer.model.info import meta_counts
from flyer.model.transformer import Transformer
from flyer.parallel.pipeline import Stage
from flyer.parallel.stages import split_layers, validate_pipeline
from flyer.serve.engine import Engine, EngineConfig, SamplingOptions
from tests.hf_models import _YARN, VOCAB, add_mtp_layer, make_tokenizer, reference_mtp_logits, trained_bias
from tests.test_deepseek_v32 import selections
from tests.test_deepseek_v32_decode import decode_tolerance, selection_margin
from tests.test_interop_export import tensors
from tests.test_qwen3 import check_round_trip, rel, train_init_then_export
from tests.test_rope_scaling import logit_tolerance

TYPES = ["full", "shared", "full", "shared", "shared", "full"]
FULL = [i for i, t in enumerate(TYPES) if t == "full"]
SOURCE = [max(j for j in FULL if j <= i) for i in range(len(TYPES))]  # the full layer whose selection i uses
TOPK = 8
# GLM-5's shape at tiny size: layer 0 dense (first_k_dense_replace), then top-2 of 8 sigmoid experts from 2 of 4
# groups with a correction bias and one shared expert; 8 indexer heads of 32 channels (8 rotating, interleaved)
# keeping 8 keys; YaRN (mscale) on MLA; one MTP layer named, as GLM-5's config does (loaded where weights hold it)
GLM = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=len(TYPES), num_attention_heads=4,
           max_position_embeddings=256, initializer_range=0.1, bos_token_id=1, eos_token_id=2, moe_intermediate_size=32,
           n_routed_experts=8, num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=16, qk_nope_head_dim=16,
           qk_rope_head_dim=8, v_head_dim=16, n_shared_experts=1, q_lora_rank=24, n_group=4, topk_group=2,
           routed_scaling_factor=2.5, norm_topk_prob=True, rms_norm_eps=1e-5, rope_parameters=_YARN,
           index_topk=TOPK, index_n_heads=8, index_head_dim=32, indexer_types=TYPES, num_nextn_predict_layers=1)


def build_glm(out, seed: int = 0) -> GlmMoeDsaForCausalLM:
    """Save a random tiny GLM-5 (FP32) with a tokenizer under ``out``: the routers' correction biases and the
    indexers' key LayerNorms random (per channel: a wrong channel order would pass otherwise)."""
    torch.manual_seed(seed)
    model = GlmMoeDsaForCausalLM(GlmMoeDsaConfig(**GLM)).eval()
    trained_bias(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("indexer.k_norm.weight"):
                p.uniform_(0.25, 2.0)
            if n.endswith("indexer.k_norm.bias"):
                p.uniform_(-0.5, 0.5)
    model.save_pretrained(out)
    make_tokenizer(out)
    return model


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    path = tmp_path_factory.mktemp("glm5")
    build_glm(path)
    ref = AutoModelForCausalLM.from_pretrained(path).eval()
    assert isinstance(ref, GlmMoeDsaForCausalLM) and ref.config._attn_implementation in ("eager", "sdpa")
    return path, ref


@pytest.fixture(scope="module")
def with_mtp(tmp_path_factory):
    """(flyer's model with the MTP layer, transformers' model of the main weights, the MTP weights and layer)."""
    path = tmp_path_factory.mktemp("glm5-mtp")
    ref = build_glm(path)
    w, layer = add_mtp_layer(ref, path)
    return load_hf(path)[0], ref, w, layer


def _tokens(T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, T), generator=torch.Generator().manual_seed(seed))


def test_config_and_tensors_read_as_transformers_builds_them(src):
    """The config reads GLM-5's fields (indexer_types listed); shared layers have no indexer, in the file
    (transformers builds none) and in flyer's model; the indexer's rows are the file's, not permuted."""
    path, ref = src
    model, cfg, _ = load_hf(path)
    assert cfg.indexer_types == tuple(TYPES) and (cfg.index_topk, cfg.index_n_heads, cfg.index_head_dim) == (8, 8, 32)
    assert (cfg.n_dense_layers, cfg.score_func, cfg.router_bias, cfg.n_expert_groups, cfg.norm_eps) == (
        1, "sigmoid", True, 4, 1e-5)
    names = tensors(path)
    for i, kind in enumerate(TYPES):
        assert (f"model.layers.{i}.self_attn.indexer.wk.weight" in names) == (kind == "full")
        assert hasattr(model.layers[i].attn, "indexer") == (kind == "full") != model.layers[i].attn.shares_selection
    got = model.layers[2].attn.indexer.wq_b.weight
    assert torch.equal(got, ref.model.layers[2].self_attn.indexer.wq_b.weight)


def test_logits_and_selected_keys_equal_transformers(src):
    """At 64 tokens every full layer selects transformers' keys for every query and the logits (shared
    layers attending to their source's selection) are within ``logit_tolerance``; at 8 tokens (every causal
    key selected) flyer skips the indexers, and the logits are transformers' there too."""
    path, ref = src
    model, cfg, _ = load_hf(path)
    T = 64
    got, want, mine, theirs = selections(model, ref, _tokens(T))
    assert len(mine) == len(theirs) == len(FULL)
    for layer, a, b in zip(FULL, mine, theirs):
        assert torch.equal(a.squeeze(1), b), f"layer {layer}: flyer selects other keys than transformers"
    err, tol = rel(got, want), logit_tolerance(cfg, T)
    assert err <= tol, f"{err:.3g} > {tol:.3g}"
    got, want, mine, _ = selections(model, ref, _tokens(8, 1))
    assert mine == [] and rel(got, want) <= logit_tolerance(cfg, 8)


def test_mutations_are_far_outside_the_tolerance(src):
    """The same weights with the indexer's rope rows permuted as V3.2's import does (its rotate-half), with the
    shared layers run as full ones with fresh indexers, or with layers 3 and 4 reusing layer 0's selection
    instead of layer 2's: each is far from transformers' logits at 64 tokens."""
    path, ref = src
    model, cfg, _ = load_hf(path)
    T = 64
    tokens = _tokens(T)
    tol = logit_tolerance(cfg, T)
    v32_rows = Transformer(cfg).eval()
    v32_rows.load_state_dict(model.state_dict())
    with torch.no_grad():
        for layer in v32_rows.layers:
            if hasattr(layer.attn, "indexer"):
                for name in ("wq_b.weight", "wk.weight", "k_norm.weight", "k_norm.bias"):
                    p = layer.attn.indexer.get_parameter(name)
                    p.copy_(permute_rope(p.clone(), (cfg.index_head_dim, 0, cfg.qk_rope_head_dim)))
    fresh = Transformer(cfg.replace(indexer_types=())).eval()  # every layer full: the shared ones' indexers random
    assert not fresh.load_state_dict(model.state_dict(), strict=False).unexpected_keys
    wrong_source = Transformer(cfg).eval()
    wrong_source.load_state_dict(model.state_dict())
    layer2 = wrong_source.layers[2].attn
    layer2.forward = lambda x, cos, sin, selection=None, _f=layer2.forward: _f(x, cos, sin)  # leaves layer 0's
    with torch.no_grad():
        want = ref(tokens).logits
        assert rel(model(tokens), want) <= tol
        for name, wrong in (("V3.2 rope rows", v32_rows), ("fresh indexers", fresh), ("layer 0's", wrong_source)):
            err = rel(wrong(tokens), want)
            assert err > 100 * tol, f"{name}: {err:.3g} is within 100x the tolerance {tol:.3g}"


def _decode(model, tokens, mode: str, chunks: list[int]) -> torch.Tensor:
    B = tokens.shape[0]
    dec = Decoder(model, B, tokens.shape[1], mode, torch.float32)
    spans = [(sum(chunks[:i]), c) for i, c in enumerate(chunks)]
    return torch.cat([dec.logits(dec.forward(tokens[:, s:s + c], torch.full((B,), s))) for s, c in spans], 1)


@pytest.mark.parametrize("mode", ["absorbed", "naive"])
def test_decoder_equals_the_training_path_with_no_index_keys_for_shared_layers(with_mtp, mode):
    """A 5-token prefill then one token at a time, and chunks straddling index_topk: logits within
    ``decode_tolerance`` of ``model(tokens)``; the cache holds index keys for the full layers only. Decoding
    with the shared layers handed layer 0's selection throughout is far outside the bound."""
    model = with_mtp[0]
    cfg = model.cfg
    T = 40
    tokens = _tokens(T)
    with torch.no_grad():
        want = model(tokens)
    tol = decode_tolerance(cfg, T)
    for chunks in ([5] + [1] * (T - 5), [6, 4, 3, 17, 10]):
        err = rel(_decode(model, tokens, mode, chunks), want)
        assert err <= tol, f"{chunks[:5]}: {err:.3g} > {tol:.3g}"
    cache = make_cache(cfg, cfg.n_layers, 1, 4, mode, torch.float32, "meta")
    assert cache.tensors["index_key"].shape == (len(FULL), 1, 4, cfg.index_head_dim)
    assert [layer.attn.index_row for layer in model.layers] == [0, 1, 1, 2, 2, 2]
    layer2 = model.layers[2].attn
    layer2.shares_selection = True  # takes (and so leaves) layer 0's selection: layers 3 and 4 get layer 0's
    try:
        assert rel(_decode(model, tokens, mode, [6, 4, 3, 17, 10]), want) > 100 * tol
    finally:
        layer2.shares_selection = False


def test_mtp_layer_has_an_indexer_and_equals_reference(with_mtp):
    """The MTP layer (decoder layer L, built as GLM-5's last, full, layer) loads with its own indexer, not
    permuted, and its logits are the reference's on 20 tokens; its decode cache keeps one row of index keys."""
    model, ref, w, layer = with_mtp
    L = ref.config.num_hidden_layers
    assert f"model.layers.{L}.self_attn.indexer.k_norm.bias" in w
    assert model.cfg.mtp_depth == 1 and hasattr(model.mtp[0].block.attn, "indexer")
    tokens = _tokens(20, 1)
    want = reference_mtp_logits(ref, w, layer, tokens)
    with torch.no_grad():
        got = model.head(model.mtp[0].norm(model.mtp_hidden(model.hidden(tokens), tokens)[0]))
    assert rel(got, want) <= logit_tolerance(model.cfg, 20)
    assert make_cache(model.cfg, 1, 1, 4, "absorbed", torch.float32, "meta").tensors["index_key"].shape[0] == 1


def test_greedy_generate_and_the_engine_equal_transformers(with_mtp, src, capsys):
    """Two prompts of 5 and 13 tokens batched, 24 new tokens each (past index_topk): transformers' greedy
    tokens from ``generate``, with MTP drafts too, and from the serving engine (paged cache, chunked
    prefill); ``flyer generate`` runs on the directory."""
    model, ref = with_mtp[:2]
    prompts = [_tokens(13, 5)[0, :5].tolist(), _tokens(13, 5)[1].tolist()]
    want = [ref.generate(torch.tensor([p]), do_sample=False, max_new_tokens=24, eos_token_id=None,
                         pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    assert min(selection_margin(model, p + w) for p, w in zip(prompts, want)) > 1e-4
    gen = dict(max_new_tokens=24, cache_dtype=torch.float32, eos_id=None)
    assert generate(model, prompts, GenerationConfig(**gen)).tokens == want
    res = generate(model, prompts, GenerationConfig(**gen, speculative="mtp", draft_tokens=2))
    assert res.tokens == want and res.drafted > 0
    bpt = make_cache(model.cfg, model.cfg.n_layers + 1, 1, 1, "absorbed", torch.float32, "meta").bytes_per_token()
    eng = Engine(model, EngineConfig(kv_cache_bytes=64 * 4 * bpt, block_size=4, cache_dtype=torch.float32,
                                     prefill_chunk=8))
    assert eng.cache.pool.tensors["index_key"].shape[0] == len(FULL)
    outs = [[] for _ in prompts]
    for i, p in enumerate(prompts):
        eng.submit(p, SamplingOptions(max_tokens=24), lambda e, i=i: outs[i].append(e.token))
    eng.run_until_idle()
    assert outs == want
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(src[0]), "--prompt", "hello world", "--max-new-tokens", "16",
                 "--device", "cpu"]) == 0


def test_import_export_round_trip_loads_in_transformers(src, tmp_path, capsys):
    """The export writes the source's tensors bit for bit (no indexer rows permuted, none for shared layers) as
    glm_moe_dsa with its indexer_types and rope layout said (vLLM reads it); transformers loads it with nothing
    missing or unexpected, the same logits."""
    check_round_trip(src, tmp_path, capsys, "glm_moe_dsa", GlmMoeDsaForCausalLM,
                     {"architectures": ["GlmMoeDsaForCausalLM"], "index_topk": 8, "index_n_heads": 8,
                      "index_head_dim": 32, "indexer_types": TYPES, "first_k_dense_replace": 1,
                      "mlp_layer_types": ["dense"] + ["sparse"] * 5, "rope_interleave": True,
                      "indexer_rope_interleave": True})
    _, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info


def test_flyer_models_with_shared_layers_export_as_glm_moe_dsa(tmp_path):
    """A flyer model with ``indexer_types`` exports as glm_moe_dsa, one without as deepseek_v32 (unchanged);
    transformers builds the export with the same logits (the indexer past its top-k on 24 tokens)."""
    cfg = preset("tiny", vocab_size=VOCAB, n_layers=4, index_topk=8, index_n_heads=16, index_head_dim=32,
                 indexer_types=("full", "shared", "full", "shared"), mtp_depth=0)
    assert hf_model_type(cfg) == "glm_moe_dsa" and hf_model_type(cfg.replace(indexer_types=())) == "deepseek_v32"
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    src = tmp_path / "src"
    build_glm(src)  # for its tokenizer
    tok = load_hf(src)[2]
    assert hf_config(cfg, tok, "fp32")["indexer_types"] == list(cfg.indexer_types)
    export_model(model, tok, tmp_path / "out", "fp32")
    back, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert isinstance(back, GlmMoeDsaForCausalLM) and not info["missing_keys"] and not info["unexpected_keys"]
    x = _tokens(24, 4)
    assert selection_margin(model, x[0].tolist()) > 1e-4 and selection_margin(model, x[1].tolist()) > 1e-4
    with torch.no_grad():
        assert rel(model(x), back.eval()(x).logits) <= logit_tolerance(cfg, 24)
    assert load_hf(tmp_path / "out")[1].indexer_types == cfg.indexer_types


def test_train_init_from_glm5_then_export(src, tmp_path, capsys):
    """A step of ``flyer train --init`` on 16-token sequences (the indexers selecting, shared layers reusing):
    the indexers stay frozen, the shared layers have none, and the run's logits are the export's in
    transformers."""
    model, cfg, back = train_init_then_export(src, tmp_path, capsys, "glm_moe_dsa")
    start = load_hf(src[0])[0]
    for name, p in model.named_parameters():
        if ".indexer." in name:
            assert not p.requires_grad and torch.equal(p, start.get_parameter(name)), name
    assert not any(f"layers.{i}.attn.indexer" in n for n, _ in model.named_parameters() for i in (1, 3, 4))
    x = _tokens(24, 2)
    with torch.no_grad():
        assert rel(model(x), back(x).logits) <= logit_tolerance(cfg, 24)


def test_counts_and_cache_bytes_leave_out_shared_layers_indexers():
    """Parameters (closed form = the meta model's), cache bytes per token (= the allocated caches') and
    attention FLOPs count the indexer in full layers only."""
    full = preset("tiny", index_topk=8, indexer_types=("full",) * 4)
    shared = full.replace(indexer_types=("full", "shared", "full", "shared"))
    assert meta_counts(shared) == param_counts(shared)
    idx = shared.q_lora_rank * 64 * 128 + shared.dim * 128 + 2 * 128 + shared.dim * 64  # wq_b, wk, k_norm, weights
    assert param_counts(full).total - param_counts(shared).total == 2 * idx
    assert param_counts(full).mtp == param_counts(shared).mtp  # the MTP block keeps its indexer
    for mode, absorbed in (("absorbed", True), ("naive", False)):
        cache = make_cache(shared, shared.n_layers, 1, 1, mode, torch.bfloat16, "meta")
        assert cache.bytes_per_token() == kv_cache_bytes_per_token(shared, 2, absorbed)
    assert kv_cache_bytes_per_token(full) - kv_cache_bytes_per_token(shared) == 2 * 128 * 2
    # at 1024 tokens the queries past 8 keys score every causal key: a mean (1024^2 - 8^2) / 2048 a token
    per_index = 2 * 64 * (128 + 1) * (1024 ** 2 - 8 ** 2) / 2048
    assert attention_flops_per_token(shared, 1024, True, 0) - attention_flops_per_token(shared, 1024, True, 1) \
        == pytest.approx(per_index, rel=1e-15)
    assert attention_flops_per_token(shared, 1024, True, shared.n_layers) == attention_flops_per_token(full, 1024)


def test_pipeline_stages_start_at_full_layers(src):
    """Stages begin at full layers, so a shared layer's source is on its stage; run one after another they
    compute the model's hidden states; more stages than full layers is one line naming pp."""
    model = load_hf(src[0])[0]
    cfg = model.cfg
    for n in (2, 3):
        split = split_layers(cfg, n, 64)
        assert all(TYPES[r.start] == "full" for r in split) and len(split) == n
    split = split_layers(cfg, 3, 64)
    stages = [Stage(model, s, r, 3, 1).eval() for s, r in enumerate(split)]
    x = _tokens(32, 3)
    with torch.no_grad():
        h = x
        for stage in stages:
            h = stage(h)
        assert torch.equal(h, model.hidden(x))
    for call in (lambda: split_layers(cfg, 4, 64), lambda: validate_pipeline(cfg, 4, "1f1b", 4)):
        with pytest.raises(FieldError, match="pp") as e:
            call()
        assert "\n" not in str(e.value) and "indexer" in str(e.value)


@pytest.mark.parametrize("change", [
    {},
    {"indexer_types": None, "index_topk_pattern": "FSFSSF"},
    {"indexer_types": None, "index_topk_pattern": ["full", "full", "shared", "full", "shared", "shared"]},
    {"indexer_types": None, "index_topk_freq": 2},
    {"indexer_types": None, "index_topk_freq": 3, "index_skip_topk_offset": 1},
    {"indexer_types": None},
    {"first_k_dense_replace": None, "mlp_layer_types": ["dense", "dense"] + ["sparse"] * 4},
])
def test_missing_fields_and_patterns_read_as_transformers_reads_them(change):
    """indexer_types from the file, else index_topk_pattern, else index_topk_freq / index_skip_topk_offset,
    as GlmMoeDsaConfig derives it; missing fields take its defaults (GLM-5's), dense layers mlp_layer_types'."""
    d = {"model_type": "glm_moe_dsa", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 6,
         "num_attention_heads": 2, "indexer_types": TYPES, **change}
    d = {k: v for k, v in d.items() if v is not None}
    cfg, theirs = ModelConfig.from_dict(d), GlmMoeDsaConfig(**{k: v for k, v in d.items() if k != "model_type"})
    assert cfg.indexer_types == tuple(theirs.indexer_types)
    assert theirs.mlp_layer_types == ["dense"] * cfg.n_dense_layers + ["sparse"] * (6 - cfg.n_dense_layers)
    for mine, field in (("index_topk", "index_topk"), ("index_n_heads", "index_n_heads"),
                        ("index_head_dim", "index_head_dim"), ("q_lora_rank", "q_lora_rank"),
                        ("kv_lora_rank", "kv_lora_rank"), ("qk_nope_head_dim", "qk_nope_head_dim"),
                        ("v_head_dim", "v_head_dim"), ("n_routed_experts", "n_routed_experts"),
                        ("n_expert_groups", "n_group"), ("n_limited_groups", "topk_group"),
                        ("route_scale", "routed_scaling_factor"), ("norm_eps", "rms_norm_eps"),
                        ("moe_inter_dim", "moe_intermediate_size"), ("max_seq_len", "max_position_embeddings")):
        assert getattr(cfg, mine) == getattr(theirs, field), mine
    assert cfg.rope_theta == theirs.rope_parameters["rope_theta"] and cfg.rope_factor == 1.0


@pytest.mark.parametrize("change, field", [
    ({"indexer_types": ["full", "sparse"] + ["full"] * 4}, "indexer_types"),
    ({"indexer_types": ["shared"] + ["full"] * 5}, "indexer_types"),
    ({"indexer_types": ["full"] * 5}, "indexer_types"),
    ({"indexer_types": None, "index_topk_pattern": "SFFFFF"}, "index_topk_pattern"),
    ({"indexer_types": None, "index_topk_pattern": "FXFFFF"}, "index_topk_pattern"),
    ({"indexer_types": None, "index_topk_freq": 2, "index_skip_topk_offset": 0}, "index_skip_topk_offset"),
    ({"indexer_rope_interleave": False}, "indexer_rope_interleave"),
    ({"rope_interleave": False}, "rope_interleave"),
])
def test_configs_flyer_cannot_run_are_one_line(src, tmp_path, capsys, change, field):
    """A bad indexer_types entry, a shared first layer (listed or derived), a wrong length, a rope layout other
    than interleaved (which transformers would ignore and vLLM follow): ``flyer info`` exits 2 with one line naming
    the field."""
    d = json.loads((src[0] / "config.json").read_text())
    d = {k: v for k, v in {**d, **change}.items() if v is not None}
    p = tmp_path / "config.json"
    p.write_text(json.dumps(d))
    capsys.readouterr()
    assert main(["info", "--config", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flyer: error: ") and f"'{field}'" in err and str(p) in err and "\n" not in err, err


@pytest.mark.parametrize("fields", [
    dict(indexer_types=("shared", "full", "full", "full")),
    dict(indexer_types=("full", "shared")),
    dict(indexer_types=("full", "dense", "full", "full")),
    dict(index_topk=0, indexer_types=("full",) * 4),
])
def test_impossible_indexer_types_are_one_line(fields):
    with pytest.raises(ConfigError, match="^config field 'indexer_types': ") as e:
        preset("tiny", **{"index_topk": 8, **fields})
    assert "\n" not in str(e.value)
