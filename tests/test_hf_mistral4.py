"""Mistral 4 checkpoints (``mistral4``): DeepseekV3's MLA and MoE with DeepseekV2's softmax router (renormalised,
scaled), Llama 4's query temperature (1 + beta ln(1 + floor(p / original_max_position_embeddings)) on every query),
YaRN over the rope head only, and the routed experts stored fused (``mlp.experts.gate_up_proj`` / ``down_proj``).
flyer held equal to transformers' Mistral4ForCausalLM (which AutoModelForCausalLM does not map): logits, routes,
the decode cache, greedy tokens, ``flyer generate``, export both ways, ``flyer info`` and one-line errors. Tiny
random models, FP32, CPU; the temperature's period is 16 positions, so sequences of 64 cross three of its steps."""

import json
import math

import pytest
import torch
from transformers import Mistral4Config, Mistral4ForCausalLM

from flyer.cli import main
from flyer.config import ModelConfig, preset
from flyer.errors import ConfigError
from flyer.infer.generate import GenerationConfig, generate
from flyer.interop.export import export_model
from flyer.interop.export_config import hf_model_type
from flyer.interop.hf import load_hf
from flyer.interop.hf_names import hf_names, permute_rope
from flyer.interop.load import load_init_weights, load_pretrained
from flyer.interop.tensorfile import TensorFile
from flyer.model.experts import Experts
from flyer.model.transformer import Transformer
from tests.bounds import FP32_U
from tests.hf_models import _COMMON, VOCAB, make_tokenizer
from tests.test_interop_export import tensors
from tests.test_qwen3 import _config_error, check_round_trip, info_json, rel
from tests.test_qwen3_moe import check_logits_and_routes

_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
         "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.7, "llama_4_scaling_beta": 0.5}
# layer 0 dense, then top-2 of 8 softmax experts and a shared one; 16 + 8 channels per query head (a third rotating)
_MISTRAL4 = dict(_COMMON, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, first_k_dense_replace=1,
                 kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_shared_experts=1,
                 q_lora_rank=24, routed_scaling_factor=1.5, norm_topk_prob=True, rope_interleave=True,
                 rope_parameters=_YARN)
VARIANTS = {
    "interleaved": _MISTRAL4,
    # rotate-half rope rows, tied embeddings, the router not renormalised, no query compression
    "half-tied": {**_MISTRAL4, "rope_interleave": False, "tie_word_embeddings": True, "norm_topk_prob": False,
                  "q_lora_rank": None, "routed_scaling_factor": 1.0},
}


def build(out, variant: str = "interleaved", seed: int = 0) -> Mistral4ForCausalLM:
    """Save a random tiny Mistral 4 (FP32) with a tokenizer under ``out``; return transformers' model of it."""
    torch.manual_seed(seed)
    model = Mistral4ForCausalLM(Mistral4Config(**VARIANTS[variant])).eval()
    model.save_pretrained(out)
    make_tokenizer(out)
    return Mistral4ForCausalLM.from_pretrained(out).eval()


@pytest.fixture(scope="module", params=list(VARIANTS))
def src(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"mistral4-{request.param}")
    return path, build(path, request.param)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    path = tmp_path_factory.mktemp("mistral4")
    return path, build(path)


def logit_tolerance(cfg: ModelConfig, T: int) -> float:
    """Bound on max|flyer - transformers| / max|logit| for FP32 evaluations on T positions, to first order (as
    ``tests.test_rope_scaling.logit_tolerance``): each layer's sums, in two orders, n u each, the terms' absolute
    sum taken as the logit scale (random weights): the projections from the model dim, the query and key-value
    latents, a head's q.k, the T attended values, the output projection over the heads' values, the FFN's hidden
    sum, the softmax over the E experts and the K weighted outputs; and transformers' FP32 frequencies, off by up
    to (ln theta + 8) u, an angle by T times that. The query temperature is computed alike (the same FP32 ops)."""
    per_layer = (cfg.dim + cfg.q_lora_rank + cfg.kv_lora_rank + cfg.qk_head_dim + T + cfg.n_heads * cfg.v_head_dim
                 + max(cfg.inter_dim, cfg.moe_inter_dim) + cfg.n_routed_experts + cfg.n_activated_experts)
    return (cfg.n_layers * per_layer + T * (math.log(cfg.rope_theta) + 8)) * FP32_U


def test_config_reads_as_transformers_configures_it(plain):
    path, ref = plain
    cfg = load_hf(path)[1]
    tc = ref.config
    assert (cfg.attn, cfg.score_func, cfg.router_bias, cfg.norm_topk_prob, cfg.route_scale, cfg.n_expert_groups,
            cfg.n_dense_layers, cfg.n_shared_experts, cfg.mtp_depth, cfg.llama4_attn_beta, cfg.original_seq_len,
            cfg.rope_type, cfg.rope_factor, cfg.qk_rope_head_dim) == (
        "mla", "softmax", False, True, 1.5, 1, tc.first_k_dense_replace, 1, 0,
        tc.rope_parameters["llama_4_scaling_beta"], tc.rope_parameters["original_max_position_embeddings"], "yarn",
        4.0, int(tc.head_dim * tc.rope_parameters["partial_rotary_factor"]))
    assert "model.layers.1.mlp.experts.gate_up_proj" in tensors(path)  # transformers' fused stacks, read as such
    d = json.loads((path / "config.json").read_text())  # transformers 4's spelling: rope_theta + rope_scaling
    rp = dict(d.pop("rope_parameters"))
    d.update(rope_theta=rp.pop("rope_theta"), rope_scaling={**rp, "type": rp.pop("rope_type")})
    assert ModelConfig.from_dict(d) == cfg


def test_logits_routes_and_decode_equal_transformers(src):
    """Within ``logit_tolerance`` of transformers on 64 positions (three steps of the query temperature), from the
    training path and the decode cache; every MoE layer picks the same experts with the same weights. The same
    weights without the temperature, with sigmoid scores, with the renormalisation flipped, or with the rope rows
    left in the file's other layout are far outside the tolerance."""
    path, ref = src
    model, cfg, _ = load_hf(path)
    tokens, want, tol, _ = check_logits_and_routes(model, cfg, ref, logit_tolerance)
    state = model.state_dict()
    with torch.no_grad():
        for wrong in (dict(llama4_attn_beta=0.0), dict(score_func="sigmoid"),
                      dict(norm_topk_prob=not cfg.norm_topk_prob)):
            other = Transformer(cfg.replace(**wrong)).eval()
            other.load_state_dict(state)
            assert rel(other(tokens), want) > 100 * tol, wrong
        other = Transformer(cfg).eval()  # the rope rows permuted as a rotate-half file's are on the way in
        moved = {s.key: permute_rope(state[s.key], s.rope_rows) for s in hf_names(cfg, True).values() if s.rope_rows}
        other.load_state_dict({**state, **moved})
        assert moved and rel(other(tokens), want) > 100 * tol


def test_greedy_tokens_and_cli_equal_transformers(plain, capsys):
    """Greedy decoding past two steps of the temperature: ``generate`` and ``flyer generate --ckpt`` (FP32 cache)
    give transformers' tokens."""
    path, ref = plain
    model, cfg, tok = load_hf(path)
    prompt = torch.randint(3, VOCAB, (10,), generator=torch.Generator().manual_seed(1)).tolist()
    want = ref.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=30, eos_token_id=None,
                        pad_token_id=0)[0, 10:].tolist()
    gen = GenerationConfig(max_new_tokens=30, temperature=0.0, cache_dtype=torch.float32, eos_id=None)
    assert generate(model, [prompt], gen).tokens[0] == want
    text = "the quick brown fox jumps over the lazy dog, hello world"
    ids = tok.encode_ids(text)
    want = ref.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=24, eos_token_id=None,
                        pad_token_id=0)[0, len(ids):].tolist()
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(path), "--prompt", text, "--max-new-tokens", "24", "--cache-dtype", "fp32",
                 "--eos-id", "-1", "--device", "cpu", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["token_ids"] == [want] and res["attention"] == "absorbed"


def test_export_round_trip_loads_in_transformers(src, tmp_path, capsys):
    """``export_model`` of the import and ``flyer export`` of the directory (streamed) write the source's tensors
    (fused stacks, rope rows as the export's rope_interleave: true says) and a mistral4 config transformers
    loads: the same logits, bit for bit; flyer reads the export as the same config."""
    _, ref = src
    moved = ("q_b_proj", "q_proj", "kv_a_proj_with_mqa") if not ref.config.rope_interleave else ()
    check_round_trip(src, tmp_path, capsys, "mistral4", Mistral4ForCausalLM,
                     {"architectures": ["Mistral4ForCausalLM"], "rope_interleave": True}, moved, auto=False)
    for out in (tmp_path / "out", tmp_path / "streamed"):
        config = json.loads((out / "config.json").read_text())
        assert (config["rope_parameters"]["llama_4_scaling_beta"], "num_nextn_predict_layers" in config) == (0.5, False)


def test_train_init_then_export(plain, tmp_path, capsys):
    """A step of ``flyer train --init DIR`` (40-token rows: the temperature trains too) exports as Mistral 4 that
    transformers computes as the run does, within the tolerance; the fused experts learned."""
    path, _ = plain
    (tmp_path / "text.txt").write_text("the quick brown fox jumps over the lazy dog. hello world, flyer reads. " * 40)
    assert main(["train", "--init", str(path), "--steps", "1", "--batch-size", "2", "--seq-len", "40", "--data",
                 str(tmp_path / "text.txt"), "--data-cache", str(tmp_path / "cache"), "--out", str(tmp_path / "run"),
                 "--no-progress", "--no-plots", "--eval-every", "1", "--eval-batches", "1", "--ckpt-every", "1",
                 "--device", "cpu", "--precision", "fp32"]) == 0
    model, cfg, _ = load_pretrained(tmp_path / "run")
    capsys.readouterr()
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "out"), "--dtype", "fp32"]) == 0
    assert json.loads(capsys.readouterr().out)["model_type"] == "mistral4"
    back = Mistral4ForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert not torch.equal(model.layers[1].ffn.experts.w3, load_hf(path)[0].layers[1].ffn.experts.w3)
    x = torch.randint(3, VOCAB, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel(model(x), back(x).logits) <= logit_tolerance(cfg, 40)


def test_native_model_exports_as_mistral4(plain, tmp_path):
    """A flyer MLA model with the temperature and a renormalised softmax router (its MTP module left out: Mistral 4
    has none) exports as Mistral 4 that transformers computes within the tolerance; without the temperature the
    renormalised softmax router alone is Mistral 4's, not renormalised DeepseekV2's; with groups or a bias none."""
    tok = load_hf(plain[0])[2]
    cfg = preset("tiny", vocab_size=VOCAB, score_func="softmax", router_bias=False, norm_topk_prob=True,
                 n_expert_groups=1, n_limited_groups=1, route_scale=1.5, llama4_attn_beta=0.3, original_seq_len=8)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    summary = export_model(model, tok, tmp_path / "out", "fp32")
    assert summary["model_type"] == "mistral4" and "MTP" in summary["left_out"]
    back = Mistral4ForCausalLM.from_pretrained(tmp_path / "out").eval()
    x = torch.randint(3, VOCAB, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel(model(x), back(x).logits) <= logit_tolerance(cfg, 40)
    assert hf_model_type(cfg.replace(llama4_attn_beta=0.0)) == "mistral4"
    assert hf_model_type(cfg.replace(llama4_attn_beta=0.0, norm_topk_prob=False)) == "deepseek_v2"
    for change, field in ((dict(n_expert_groups=4, n_limited_groups=2), "n_limited_groups"),
                          (dict(score_func="sigmoid", router_bias=True), "score_func")):
        with pytest.raises(ConfigError, match=f"config field '{field}': .*mistral4") as e:
            hf_model_type(cfg.replace(**change))
        assert "\n" not in str(e.value)


def test_hub_config_counts_as_transformers_builds_it(tmp_path, capsys):
    """``flyer info --config`` of Mistral4Config's defaults (Mistral Small 4: 119B parameters): transformers'
    parameter count (meta device); a file with none of the fields those defaults fill reads as Mistral4Config
    fills them."""
    d = Mistral4Config().to_dict()
    got = info_json(tmp_path, capsys, d)
    with torch.device("meta"):
        hf = Mistral4ForCausalLM(Mistral4Config.from_dict(d))
    assert got["total_params"] == sum(t.numel() for t in hf.parameters())
    bare = {"model_type": "mistral4", "hidden_size": 4096}
    mine, theirs = ModelConfig.from_dict(bare), Mistral4Config.from_dict(bare)
    rp = theirs.rope_parameters
    assert (mine.n_layers, mine.n_routed_experts, mine.n_activated_experts, mine.q_lora_rank, mine.kv_lora_rank,
            mine.rope_factor, mine.original_seq_len, mine.llama4_attn_beta, mine.max_seq_len, mine.vocab_size) == (
        theirs.num_hidden_layers, theirs.n_routed_experts, theirs.num_experts_per_tok, theirs.q_lora_rank,
        theirs.kv_lora_rank, rp["factor"], rp["original_max_position_embeddings"], rp["llama_4_scaling_beta"],
        theirs.max_position_embeddings, theirs.vocab_size)


def test_what_flyer_cannot_run_is_one_line(plain, tmp_path, capsys):
    """One line naming the field: a RoPE type transformers' Mistral4 cannot run (its default rotates the whole
    head), no temperature beta or period (transformers fails on None), a rotary fraction other than the rope
    head's, group-limited routing (scored by top-2 sums), biases on the projections."""
    d = json.loads((plain[0] / "config.json").read_text())
    rp = d["rope_parameters"]
    for change, field in (
            (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "llama_4_scaling_beta": 0.1,
                                   "original_max_position_embeddings": 16}), "rope_parameters.rope_type"),
            (dict(rope_parameters={k: v for k, v in rp.items() if k != "llama_4_scaling_beta"}),
             "rope_parameters.llama_4_scaling_beta"),
            (dict(rope_parameters={k: v for k, v in rp.items() if k != "original_max_position_embeddings"}),
             "rope_parameters.original_max_position_embeddings"),
            (dict(rope_parameters={**rp, "partial_rotary_factor": 0.5}), "partial_rotary_factor"),
            (dict(n_group=4, topk_group=2), "topk_group"),
            (dict(attention_bias=True), "attention_bias")):
        _config_error(tmp_path, capsys, {**d, **change}, field)
    assert ModelConfig.from_dict({**d, "n_group": 4, "topk_group": 4}) == load_hf(plain[0])[1]  # no group dropped


def test_fused_stacks_are_read_one_expert_at_a_time_and_only_a_ranks(plain, monkeypatch):
    """A rank holding experts 4..7 (expert parallelism's ``Experts.first``) reads only those rows of the fused
    stacks, one expert per read (a real Mistral 4 layer's stack is GBs), and gets the whole model's values."""
    path, _ = plain
    whole, cfg, _ = load_pretrained(path)
    rank = Transformer(cfg)
    for layer in rank.layers[cfg.n_dense_layers:]:
        layer.ffn.experts = Experts(4, cfg.dim, cfg.moe_inter_dim, first=4)
    reads, read_into = [], TensorFile.read_into
    monkeypatch.setattr(TensorFile, "read_into", lambda tf, name, out, rows=None: (
        reads.append((name, rows)), read_into(tf, name, out, rows))[1])
    load_init_weights(rank, path)
    fused = [rows for name, rows in reads if name.endswith(("gate_up_proj", "down_proj"))]
    assert fused and len(fused) == 2 * 4 * (cfg.n_layers - cfg.n_dense_layers)
    assert all(rows is not None and rows[1] == rows[0] + 1 and rows[0] >= 4 for rows in fused)
    for mine, full in zip(rank.layers[cfg.n_dense_layers:], whole.layers[cfg.n_dense_layers:]):
        for w in ("w1", "w2", "w3"):
            assert torch.equal(getattr(mine.ffn.experts, w), getattr(full.ffn.experts, w)[4:])
