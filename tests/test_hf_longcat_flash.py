"""Meituan's LongCat-Flash checkpoints (``longcat_flash``): each decoder layer two MLA + dense-FFN sublayers (flyer:
two blocks) sharing one shortcut MoE (its input sublayer 0's FFN input, its output added at sublayer 1's end), a
softmax router over routed + zero-computation (identity) experts with a correction bias, not renormalised, and MLA's
"LoRA scaling" folded into q_b_proj and kv_a_layernorm. flyer held equal to transformers' LongcatFlashForCausalLM:
logits, routes (identity experts picked), the decode cache, greedy tokens, ``flyer generate``, export both ways,
``flyer info`` and one-line errors. Tiny random models, FP32, CPU."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LongcatFlashConfig, LongcatFlashForCausalLM

from flyer.cli import main
from flyer.config import ModelConfig, preset
from flyer.errors import ConfigError, FieldError
from flyer.infer.decoder import Decoder
from flyer.infer.generate import GenerationConfig, generate
from flyer.interop.export import export_model
from flyer.interop.export_config import hf_model_type
from flyer.interop.hf import load_hf
from flyer.interop.hf_names import hf_names
from flyer.interop.load import load_pretrained
from flyer.model.moe import update_router_bias
from flyer.model.transformer import Transformer
from flyer.parallel.mesh import validate_layout
from flyer.parallel.stages import validate_pipeline
from tests.bounds import FP32_U
from tests.hf_models import VOCAB, make_tokenizer
from tests.test_interop_export import tensors
from tests.test_qwen3 import _config_error, engine_greedy, info_json, rel

E, Z = 8, 4  # routed and zero-computation experts
_LONGCAT = dict(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_attention_heads=4, ffn_hidden_size=96,
                q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, head_dim=8, v_head_dim=16,
                moe_topk=3, n_routed_experts=E, zero_expert_num=Z, expert_ffn_hidden_size=32,
                routed_scaling_factor=1.5, max_position_embeddings=256, initializer_range=0.1, bos_token_id=1,
                eos_token_id=2)
_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
         "mscale": 0.8, "mscale_all_dim": 0.6, "beta_fast": 32.0, "beta_slow": 1.0}
VARIANTS = {
    # the MLA scales sqrt(64 / 16) = 2: folded and unfolded exactly
    "pow2": _LONGCAT,
    # scales sqrt(64 / 24) and sqrt(64 / 12) (rounded when folded), YaRN (mscale_all_dim on the softmax), tied
    "yarn-tied": {**_LONGCAT, "q_lora_rank": 24, "kv_lora_rank": 12, "tie_word_embeddings": True,
                  "rope_parameters": _YARN},
}
# the correction bias lifts the identity columns (softmax scores ~1/12) so that tokens pick them, not always
_ZERO_BIAS = 0.02


def build(out, variant: str = "pow2", seed: int = 0) -> LongcatFlashForCausalLM:
    """Save a random tiny LongCat-Flash (FP32) with a tokenizer under ``out``; return transformers' model of it."""
    torch.manual_seed(seed)
    model = LongcatFlashForCausalLM(LongcatFlashConfig(**VARIANTS[variant])).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            bias = layer.mlp.router.e_score_correction_bias
            bias.copy_(torch.cat([torch.randn(E) * 0.01, torch.full((Z,), _ZERO_BIAS)]))
    model.save_pretrained(out)
    make_tokenizer(out)
    return LongcatFlashForCausalLM.from_pretrained(out).eval()


@pytest.fixture(scope="module", params=list(VARIANTS))
def src(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"longcat-{request.param}")
    return path, build(path, request.param)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    path = tmp_path_factory.mktemp("longcat")
    return path, build(path)


def logit_tolerance(cfg: ModelConfig, T: int) -> float:
    """Bound on max|flyer - transformers| / max|logit| for FP32 evaluations on T positions, to first order (as
    ``tests.test_hf_mistral4.logit_tolerance``), per flyer block (two per LongCat layer, each counted with the
    pair's MoE): sums, in two orders, n u each, the terms' absolute sum taken as the logit scale: the projections
    from the model dim, the query and key-value latents, a head's q.k, the T attended values, the output projection
    over the heads' values, the dense FFN's hidden sum (wider than an expert's here), the softmax over the E + Z
    columns and the K weighted outputs; the two folded MLA scales, one rounding each; and transformers' FP32
    frequencies, off by up to (ln theta + 8) u, an angle by T times that."""
    per_block = (cfg.dim + cfg.q_lora_rank + cfg.kv_lora_rank + cfg.qk_head_dim + T + cfg.n_heads * cfg.v_head_dim
                 + max(cfg.inter_dim, cfg.moe_inter_dim) + cfg.n_route_columns + cfg.n_activated_experts + 2)
    return (cfg.n_layers * per_block + T * (math.log(cfg.rope_theta) + 8)) * FP32_U


def _routes(ref, model):
    """Hooks capturing (expert ids, weights) of every router in the next forward: transformers', flyer's."""
    theirs, mine = [], []
    hooks = [layer.mlp.router.register_forward_hook(lambda _m, _i, out: theirs.append((out[2], out[1])))
             for layer in ref.model.layers]
    hooks += [blk.shortcut.gate.register_forward_hook(lambda _m, _i, out: mine.append((out[1], out[0])))
              for blk in model.layers if blk.shortcut is not None]
    return theirs, mine, hooks


def test_config_reads_as_transformers_configures_it(plain):
    path, ref = plain
    cfg = load_hf(path)[1]
    tc = ref.config
    assert (cfg.n_layers, cfg.attn, cfg.shortcut_moe, cfg.n_zero_experts, cfg.n_routed_experts,
            cfg.n_activated_experts, cfg.score_func, cfg.router_bias, cfg.norm_topk_prob, cfg.route_scale,
            cfg.n_shared_experts, cfg.n_dense_layers, cfg.n_expert_groups, cfg.mtp_depth, cfg.inter_dim,
            cfg.moe_inter_dim, cfg.rope_theta) == (
        tc.num_hidden_layers, "mla", True, tc.zero_expert_num, tc.n_routed_experts, tc.moe_topk, "softmax", True,
        False, 1.5, 0, 0, 1, 0, tc.ffn_hidden_size, tc.expert_ffn_hidden_size, tc.rope_parameters["rope_theta"])
    assert "model.layers.1.mlp.experts.7.gate_proj.weight" in tensors(path)  # save_pretrained: one per expert
    d = json.loads((path / "config.json").read_text())  # transformers 4's spelling: rope_theta at the top
    d.update(rope_theta=d.pop("rope_parameters")["rope_theta"])
    assert ModelConfig.from_dict(d) == cfg
    # Meituan's remote-code spelling (the released config.json's fields): num_hidden_layers = num_layers, the MTP
    # layer and its own dtype fields, none of which changes what transformers computes; the MTP layer declared is
    # flyer's MTP module (read where the files hold it: tests/test_hf_longcat_mtp.py)
    released = {**d, "num_hidden_layers": d["num_layers"], "mla_scale_q_lora": True, "mla_scale_kv_lora": True,
                "zero_expert_type": "identity", "router_bias": False, "norm_topk_prob": False, "topk_method": None,
                "num_nextn_predict_layers": 1, "nextn_use_scmoe": False, "ep_size": 1, "pretraining_tp": 1,
                "params_dtype": "bfloat16", "rounter_params_dtype": "float32", "attention_method": "MLA"}
    assert ModelConfig.from_dict(released) == cfg.replace(mtp_depth=1)
    no_theta = {k: v for k, v in released.items() if k != "rope_theta"}  # LongcatFlashConfig's default_theta
    assert ModelConfig.from_dict({**no_theta, "rope_scaling": {"rope_type": "default"}}).rope_theta == 1e7


def test_logits_routes_and_decode_equal_transformers(src):
    """Within ``logit_tolerance`` of transformers on 64 positions, from the training path and the decode cache; every
    shortcut MoE picks the same columns for every token (identity experts among them) with the same weights. The
    same weights renormalised, without the folded MLA scales, or with the shortcut MoE added at the pair's first
    block are far outside the tolerance."""
    path, ref = src
    model, cfg, _ = load_hf(path)
    T = 64
    tokens = torch.randint(3, VOCAB, (2, T), generator=torch.Generator().manual_seed(0))
    theirs, mine, hooks = _routes(ref, model)
    with torch.no_grad():
        want = ref(tokens).logits
        err, tol = rel(model(tokens), want), logit_tolerance(cfg, T)
    for h in hooks:
        h.remove()
    assert err <= tol, f"{err:.3g} > {tol:.3g}"
    assert len(theirs) == len(mine) == cfg.n_layers // 2
    for (ids_a, w_a), (ids_b, w_b) in zip(theirs, mine):
        order_a, order_b = ids_a.sort(-1), ids_b.sort(-1)
        assert torch.equal(order_a.values, order_b.values)  # the same columns for every token
        # route_scale times a softmax score: the router's D-term sums and E + Z-term softmax are in the bound
        assert torch.allclose(w_a.gather(1, order_a.indices), w_b.gather(1, order_b.indices), rtol=0,
                              atol=cfg.route_scale * tol)
        zero = ids_b >= E
        assert 0 < int(zero.sum()) < zero.numel()  # identity experts picked, and routed ones
    with torch.no_grad():
        dec = Decoder(model, 2, T, cache_dtype=torch.float32)
        cached = [dec.logits(dec.forward(tokens[:, :20], torch.zeros(2, dtype=torch.long)))]
        cached += [dec.logits(dec.forward(tokens[:, t:t + 1], torch.full((2,), t))) for t in range(20, T)]
        assert rel(torch.cat(cached, 1), want) <= tol
        state = model.state_dict()
        other = Transformer(cfg.replace(norm_topk_prob=True)).eval()
        other.load_state_dict(state)
        assert rel(other(tokens), want) > 100 * tol
        unfolded = {s.key: state[s.key] / s.scale for s in hf_names(cfg, False).values() if s.scale != 1.0}
        assert len(unfolded) == 2 * cfg.n_layers  # q_b_proj and kv_a_layernorm of every block
        other = Transformer(cfg).eval()
        other.load_state_dict({**state, **unfolded})
        assert rel(other(tokens), want) > 100 * tol
        other.load_state_dict(state)
        for first in other.layers[::2]:  # the pair's MoE output added at its first block's end instead
            first.pair = []
            first.ffn_residual = (lambda x, ffn=None, blk=first: x + blk.ffn(blk.ffn_norm(x))
                                  + blk.shortcut(blk.ffn_norm(x)))
        assert rel(other(tokens), want) > 100 * tol


def test_gradients_equal_transformers(plain):
    """The training path's gradients (cross-entropy on 32 positions) equal transformers': the router over the routed
    and identity columns, the pair's experts, each block's dense FFN, and the folded q_b_proj (flyer's is s times
    the file's, so its gradient 1/s times), each within twice ``logit_tolerance`` of its largest entry (the
    backward's sums are the forward's, transposed, and the T positions of a weight's gradient)."""
    path, ref = plain
    model, cfg, _ = load_hf(path)
    T = 32
    x = torch.randint(3, VOCAB, (2, T + 1), generator=torch.Generator().manual_seed(6))
    loss = torch.nn.functional.cross_entropy(model(x)[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    loss.backward()
    want = ref(x, labels=x.clone()).loss  # transformers shifts the labels itself
    want.backward()
    tol = 2 * logit_tolerance(cfg, T) + T * FP32_U
    assert abs(float(loss.detach() - want.detach())) <= tol * float(want.detach())
    s = hf_names(cfg, False)["model.layers.0.self_attn.1.q_b_proj.weight"].scale
    for mine, theirs in ((model.layers[0].shortcut.gate.weight.grad, ref.model.layers[0].mlp.router.classifier),
                         (model.layers[2].shortcut.experts.w2.grad, ref.model.layers[1].mlp.experts.down_proj),
                         (model.layers[3].ffn.w1.weight.grad, ref.model.layers[1].mlps[1].gate_proj.weight),
                         (model.layers[1].attn.wq_b.weight.grad * s, ref.model.layers[0].self_attn[1].q_b_proj.weight)):
        theirs = getattr(theirs, "weight", theirs).grad
        assert rel(mine, theirs) <= tol, f"{rel(mine, theirs):.3g} > {tol:.3g}"


def test_greedy_tokens_and_cli_equal_transformers(plain, capsys):
    """Greedy decoding: ``generate`` and ``flyer generate --ckpt`` (FP32 cache) give transformers' tokens."""
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


def test_serving_engine_greedy_equals_generate(plain):
    """The engine's paged latent cache (chunked prefill, prefix sharing, continuous batching) gives each request the
    greedy tokens ``generate`` gives the prompts as one batch: the packed rows' shortcut MoE handed on in its pair."""
    path, _ = plain
    model, cfg, tok = load_hf(path)
    texts = ["the quick brown fox", "hello world, flyer reads", "the quick brown fox jumps over the lazy dog"]
    prompts = [tok.encode_ids(t) for t in texts]
    want = generate(model, prompts, GenerationConfig(max_new_tokens=10, cache_dtype=torch.float32,
                                                     eos_id=None)).tokens
    outs, eng = engine_greedy(model, prompts, cfg.n_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4)
    assert outs == want and eng.alloc.hits > 0  # the third prompt took the first one's blocks


def test_export_round_trip_loads_in_transformers(src, tmp_path, capsys):
    """``export_model`` of the import and ``flyer export`` of the directory (streamed) write the source's tensors (the
    folded MLA scales taken out: bit for bit where they are powers of two, else within one rounding each way) and a
    longcat_flash config that AutoModelForCausalLM loads as LongcatFlashForCausalLM: the same logits (bit for bit
    where the tensors are), and flyer reads the export as the same config."""
    path, ref = src
    model, cfg, tok = load_hf(path)
    assert hf_model_type(cfg) == "longcat_flash"
    export_model(model, tok, tmp_path / "out", "fp32")
    capsys.readouterr()
    assert main(["export", str(path), "--out", str(tmp_path / "streamed"), "--dtype", "fp32"]) == 0
    assert json.loads(capsys.readouterr().out)["model_type"] == "longcat_flash"
    a = tensors(path)
    exact = cfg.dim // cfg.q_lora_rank == 4 and cfg.dim // cfg.kv_lora_rank == 4
    x = torch.randint(3, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(x).logits
    for out in (tmp_path / "out", tmp_path / "streamed"):
        b = tensors(out)
        assert a.keys() == b.keys()
        for k in a:
            if exact or not k.endswith(("q_b_proj.weight", "kv_a_layernorm.weight")):
                assert torch.equal(a[k], b[k]), k
            else:  # w s / s: two FP32 roundings of at most u |w| each
                assert ((a[k] - b[k]).abs() <= 2 * FP32_U * a[k].abs()).all(), k
        config = json.loads((out / "config.json").read_text())
        assert (config["model_type"], config["num_layers"], config["zero_expert_num"]) == (
            "longcat_flash", cfg.n_layers // 2, Z)
        back = AutoModelForCausalLM.from_pretrained(out).eval()
        assert isinstance(back, LongcatFlashForCausalLM)
        with torch.no_grad():
            got = back(x).logits
        assert torch.equal(got, want) if exact else rel(got, want) <= logit_tolerance(cfg, 40)
        assert load_hf(out)[1] == cfg


def test_train_init_then_export(plain, tmp_path, capsys):
    """A step of ``flyer train --init DIR`` exports as LongCat-Flash that transformers computes as the run does,
    within the tolerance; the shortcut experts learned, and the balancing bias moved over the zero experts too."""
    path, _ = plain
    (tmp_path / "text.txt").write_text("the quick brown fox jumps over the lazy dog. hello world, flyer reads. " * 40)
    assert main(["train", "--init", str(path), "--steps", "1", "--batch-size", "2", "--seq-len", "32", "--data",
                 str(tmp_path / "text.txt"), "--data-cache", str(tmp_path / "cache"), "--out", str(tmp_path / "run"),
                 "--no-progress", "--no-plots", "--eval-every", "1", "--eval-batches", "1", "--ckpt-every", "1",
                 "--device", "cpu", "--precision", "fp32"]) == 0
    model, cfg, _ = load_pretrained(tmp_path / "run")
    capsys.readouterr()
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "out"), "--dtype", "fp32"]) == 0
    assert json.loads(capsys.readouterr().out)["model_type"] == "longcat_flash"
    back = LongcatFlashForCausalLM.from_pretrained(tmp_path / "out").eval()
    before = load_hf(path)[0].layers[0].shortcut
    after = model.layers[0].shortcut
    assert not torch.equal(after.experts.w3, before.experts.w3)
    assert not torch.equal(after.gate.bias[E:], before.gate.bias[E:])
    x = torch.randint(3, VOCAB, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel(model(x), back(x).logits) <= logit_tolerance(cfg, 32)


def _native() -> ModelConfig:
    return preset("tiny", vocab_size=VOCAB, n_dense_layers=0, shortcut_moe=True, n_zero_experts=4, score_func="softmax",
                  router_bias=True, norm_topk_prob=False, n_expert_groups=1, n_limited_groups=1, n_shared_experts=0,
                  mtp_depth=0, route_scale=2.0)


def test_native_model_trains_and_exports_as_longcat(plain, tmp_path):
    """A flyer model with the shortcut MoE and zero experts trains a step (gradients reach the router's identity
    columns and the pair's experts), exports as LongCat-Flash that transformers computes within the tolerance; what
    LongCat-Flash cannot hold is one line naming the field."""
    tok = load_hf(plain[0])[2]
    cfg = _native()
    torch.manual_seed(0)
    model = Transformer(cfg)
    x = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
    model.compute_loss(x, torch.roll(x, -1, 1)).loss.backward()
    gate = model.layers[0].shortcut.gate.weight.grad
    assert gate[cfg.n_routed_experts:].abs().sum() > 0 and model.layers[2].shortcut.experts.w1.grad.abs().sum() > 0
    assert model.layers[1].shortcut is None and model.layers[1].ffn.w1.weight.grad.abs().sum() > 0
    model.eval()
    summary = export_model(model, tok, tmp_path / "out", "fp32")
    assert summary["model_type"] == "longcat_flash"
    back = LongcatFlashForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert rel(model(x), back(x).logits) <= logit_tolerance(cfg, 24)
    for change, field in ((dict(n_shared_experts=1), "n_shared_experts"), (dict(norm_topk_prob=True), "norm_topk_prob"),
                          (dict(router_bias=False), "router_bias"), (dict(q_lora_rank=0), "q_lora_rank"),
                          (dict(shortcut_moe=False), "shortcut_moe")):
        with pytest.raises(ConfigError, match=f"config field '{field}': .*longcat_flash") as e:
            hf_model_type(cfg.replace(**change))
        assert "\n" not in str(e.value)


def test_balancing_counts_every_column_and_its_bias_steers_the_zero_experts():
    """A training forward counts each routing column's picks, the identity experts' too, and the aux-loss-free
    update moves every column's bias by gamma sign(mean load - load): the zero experts balance with the rest (as
    LongCat-Flash's expert bias does)."""
    cfg = _native()
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    moe = model.layers[0].shortcut
    ids = []
    hook = moe.gate.register_forward_hook(lambda _m, _i, out: ids.append(out[1]))
    x = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(5))
    model.compute_loss(x, torch.roll(x, -1, 1))
    hook.remove()
    counts = torch.bincount(ids[0].flatten(), minlength=cfg.n_route_columns).float()
    assert counts[cfg.n_routed_experts:].sum() > 0  # identity experts picked
    assert torch.equal(moe.tokens_per_expert, counts)
    before = moe.gate.bias.clone()
    update_router_bias(model)
    assert torch.equal(moe.gate.bias - before, cfg.bias_update_speed * torch.sign(counts.mean() - counts))


def test_hub_config_counts_as_transformers_builds_it(tmp_path, capsys):
    """``flyer info --config`` of LongcatFlashConfig's defaults (LongCat-Flash-Chat, 560B): transformers' parameter
    count (meta device); activated: the K = 12 FFN experts a token runs at most, with the dense FFNs of both
    sublayers; a file with none of the fields those defaults fill reads as LongcatFlashConfig fills them."""
    d = LongcatFlashConfig().to_dict()
    got = info_json(tmp_path, capsys, d)
    with torch.device("meta"):
        hf = LongcatFlashForCausalLM(LongcatFlashConfig.from_dict(d))
    assert got["total_params"] == sum(t.numel() for t in hf.parameters())
    tc = LongcatFlashConfig()
    expert = 3 * tc.hidden_size * tc.expert_ffn_hidden_size
    assert got["activated_params"] == got["total_params"] - tc.num_layers * (tc.n_routed_experts - tc.moe_topk) * expert
    # a token picking zero experts only (K <= Z) runs none of the routed FFNs: its report's 18.6B-31.3B range
    assert got["activated_params_min"] == got["activated_params"] - tc.num_layers * tc.moe_topk * expert
    assert [round((got[k] - got["embedding_params"]) / 1e9, 1) for k in ("activated_params_min",
                                                                          "activated_params")] == [18.7, 31.4]
    assert (got["layers"], got["zero_experts"], got["shortcut_moe"]) == (2 * tc.num_layers, tc.zero_expert_num, True)
    mine = ModelConfig.from_dict({"model_type": "longcat_flash", "hidden_size": 6144})
    assert (mine.n_layers, mine.n_routed_experts, mine.n_zero_experts, mine.n_activated_experts, mine.q_lora_rank,
            mine.kv_lora_rank, mine.inter_dim, mine.moe_inter_dim, mine.route_scale, mine.rope_theta,
            mine.max_seq_len, mine.vocab_size, mine.norm_eps) == (
        tc.num_hidden_layers, tc.n_routed_experts, tc.zero_expert_num, tc.moe_topk, tc.q_lora_rank, tc.kv_lora_rank,
        tc.ffn_hidden_size, tc.expert_ffn_hidden_size, tc.routed_scaling_factor, tc.rope_parameters["rope_theta"],
        tc.max_position_embeddings, tc.vocab_size, tc.rms_norm_eps)


def test_what_flyer_cannot_run_is_one_line(plain, tmp_path, capsys):
    """One line naming the field: RoPE tables of another width than the rope head, another zero-expert kind, MLA
    without its scaling, a router bias or renormalised weights (transformers' LongcatFlash computes none), a layer
    count that is neither num_layers (Meituan's remote code) nor 2 num_layers (transformers'), biases on the
    projections; and, for the model, an odd block count, expert and
    more pipeline stages than block pairs (a stage boundary would fall inside a pair; tests/test_pp_longcat.py)."""
    d = json.loads((plain[0] / "config.json").read_text())
    for change, field in ((dict(head_dim=16), "head_dim"), (dict(zero_expert_type="copy"), "zero_expert_type"),
                          (dict(mla_scale_q_lora=False), "mla_scale_q_lora"), (dict(router_bias=True), "router_bias"),
                          (dict(num_hidden_layers=6), "num_hidden_layers"),
                          (dict(norm_topk_prob=True), "norm_topk_prob"), (dict(qk_head_dim=30), "qk_head_dim"),
                          (dict(attention_bias=True), "attention_bias")):
        _config_error(tmp_path, capsys, {**d, **change}, field)
    cfg = load_hf(plain[0])[1]
    assert ModelConfig.from_dict({**d, "zero_expert_type": "identity", "mla_scale_q_lora": True}) == cfg
    for n in (d["num_layers"], 2 * d["num_layers"]):  # Meituan's remote code's spelling, transformers'
        assert ModelConfig.from_dict({**d, "num_hidden_layers": n}) == cfg
    cfg = _native()
    for change, field in ((dict(n_layers=3), "n_layers"), (dict(n_dense_layers=1), "n_dense_layers"),
                          (dict(n_expert_groups=4), "n_zero_experts")):
        with pytest.raises(ConfigError, match=f"config field '{field}'"):
            cfg.replace(**change)
    validate_layout(cfg, 2, 2, 2)  # --ep runs it (tests/test_ep_longcat.py)
    with pytest.raises(FieldError, match=r"^pp: .*shortcut_moe"):
        validate_pipeline(cfg, 2, "dualpipev", 4)  # 4 stages, 2 pairs


def test_fused_stacks_and_mtp_tensors_read_as_transformers_reads_them(plain, tmp_path):
    """The same weights with the routed experts as transformers' fused stacks (``mlp.experts.gate_up_proj``,
    ``down_proj``) and a released checkpoint's MTP module beside them (``model.mtp.*``, which transformers skips
    and flyer does too where the config declares none, as transformers' does not) load to the same model."""
    path, _ = plain
    a = tensors(path)
    fused = {k: v for k, v in a.items() if ".mlp.experts." not in k}
    for i in range(2):
        pre = f"model.layers.{i}.mlp.experts."
        fused[pre + "gate_up_proj"] = torch.stack([torch.cat([a[f"{pre}{e}.gate_proj.weight"],
                                                              a[f"{pre}{e}.up_proj.weight"]]) for e in range(E)])
        fused[pre + "down_proj"] = torch.stack([a[f"{pre}{e}.down_proj.weight"] for e in range(E)])
    fused["model.mtp.layers.0.eh_proj.weight"] = torch.zeros(64, 128)
    out = tmp_path / "fused"
    out.mkdir()
    save_file(fused, str(out / "model.safetensors"))
    (out / "config.json").write_text((path / "config.json").read_text())
    make_tokenizer(out)
    mine, theirs = load_hf(out)[0].state_dict(), load_hf(path)[0].state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    ref = LongcatFlashForCausalLM.from_pretrained(out).eval()  # transformers reads the same file alike
    x = torch.randint(3, VOCAB, (1, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(ref(x).logits, LongcatFlashForCausalLM.from_pretrained(path).eval()(x).logits)


def test_held_bf16_weights_are_the_folded_ones_rounded_once(tmp_path):
    """``--weight-dtype bf16`` (weights held in BF16, computed in FP32) holds each GEMM weight as the FP32 import's,
    the MLA scales (sqrt(64 / 24), sqrt(64 / 12): not powers of two) folded first, then rounded once."""
    path = tmp_path / "yarn-tied"
    build(path, "yarn-tied")
    held, full = load_hf(path, dtype=torch.float32, held=torch.bfloat16)[0].state_dict(), load_hf(path)[0].state_dict()
    keys = [s.key for s in hf_names(load_hf(path)[1], False).values() if s.scale != 1.0]
    assert keys and held.keys() == full.keys()
    for k in held:
        assert torch.equal(held[k].float(), full[k].to(held[k].dtype).float()), k
    assert {held[k].dtype for k in keys} == {torch.bfloat16, torch.float32}  # q_b_proj held, the norm weight not


def test_low_precision_exports_keep_the_router_in_fp32(plain, tmp_path, capsys):
    """``--dtype bf16`` and ``--dtype fp8`` write the router's classifier and correction bias in FP32 (transformers
    keeps the classifier in FP32; DeepSeek's FP8 format keeps routers unquantized), the projections in the dtype."""
    path, _ = plain
    for dtype, proj in (("bf16", torch.bfloat16), ("fp8", torch.float8_e4m3fn)):
        assert main(["export", str(path), "--out", str(tmp_path / dtype), "--dtype", dtype]) == 0
        t = tensors(tmp_path / dtype)
        pre = "model.layers.0."
        assert (t[pre + "mlp.router.classifier.weight"].dtype, t[pre + "mlp.router.e_score_correction_bias"].dtype,
                t[pre + "self_attn.1.q_b_proj.weight"].dtype) == (torch.float32, torch.float32, proj), dtype
    capsys.readouterr()

