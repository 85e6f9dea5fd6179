"""Qwen3-MoE checkpoints (Qwen3's GQA attention with per-head q/k norms, then dense layers first and a
sparse MoE block: softmax over every expert in FP32, top-k, renormalised, no shared expert): flyer's
logits and routing, ``flyer generate``'s and the serving engine's greedy tokens equal transformers'
Qwen3MoeForCausalLM; import -> export -> transformers gives the same tensors and logits; a native
flyer GQA + MoE model (no dense layer) and a ``train --init`` step export as Qwen3-MoE; dense-layer
patterns flyer cannot express are one line naming the field. Tiny random models, FP32, CPU."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from flyer.config import ModelConfig, preset
from flyer.errors import ConfigError
from flyer.infer.decoder import Decoder
from flyer.interop.export import export_model
from flyer.interop.export_config import hf_config, hf_model_type
from flyer.interop.hf import load_hf
from flyer.model.transformer import Transformer
from tests.bounds import FP32_U, route_weight_bound
from tests.hf_models import _COMMON, FAMILIES, VOCAB, build, save_tiny
from tests.test_interop_export import tensors
from tests.test_qwen3 import _config_error, check_round_trip, info_json, rel, train_init_then_export
# Qwen3's end-to-end tests, collected here too: run on this module's ``src`` (the Qwen3-MoE directory)
from tests.test_qwen3 import test_cli_greedy_tokens_equal_transformers  # noqa: F401
from tests.test_qwen3 import test_serving_engine_greedy_equals_flyer_generate  # noqa: F401
from tests.test_qwen3 import logit_tolerance as attention_tolerance


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A tiny random Qwen3-MoE directory (layer 0 dense, then 8 experts top-2 renormalised; head_dim 24 !=
    64 / 4 heads; random q_norm / k_norm) and transformers' model of it."""
    path = tmp_path_factory.mktemp("qwen3_moe")
    build("qwen3_moe", path)
    return path, AutoModelForCausalLM.from_pretrained(path).eval()


def logit_tolerance(cfg: ModelConfig, T: int) -> float:
    """``tests.test_qwen3.logit_tolerance`` (its per-layer dim + inter_dim covers the shorter expert sums)
    plus, per layer, the softmax's sum over the E experts and the K weighted expert outputs, n u each."""
    return attention_tolerance(cfg, T) + cfg.n_layers * (cfg.n_routed_experts + cfg.n_activated_experts) * FP32_U


def _routes(layers, gate_of, pick) -> tuple[list[list], list]:
    """Per MoE layer, its gate's input (T, D) and what ``pick`` takes from its output in the next forward (remove the
    hooks after)."""
    got: list[list] = [[] for _ in layers]
    hooks = [gate_of(m).register_forward_hook(lambda _m, args, out, i=i: got[i].append((args[0], *pick(out))))
             for i, m in enumerate(layers)]
    return got, hooks


def check_logits_and_routes(model, cfg: ModelConfig, ref, tolerance) -> tuple:
    """flyer's logits on 64 tokens within ``tolerance(cfg, T)`` of transformers' ``ref``, from the training
    path and from the decode cache (a 20-token chunk, then a token at a time); every MoE layer picks the
    same experts for every token, their weights within ``route_weight_bound`` of the two gates' inputs. Returns
    (tokens, transformers' logits, the tolerance, flyer's (expert ids, weights) per MoE layer) for further checks."""
    T = 64
    tokens = torch.randint(3, VOCAB, (2, T), generator=torch.Generator().manual_seed(0))
    moe = range(cfg.n_dense_layers, cfg.n_layers)
    theirs, h1 = _routes([ref.model.layers[i] for i in moe], lambda m: m.mlp.gate, lambda out: (out[2], out[1]))
    mine, h2 = _routes([model.layers[i] for i in moe], lambda m: m.ffn.gate, lambda out: (out[1], out[0]))
    with torch.no_grad():
        want = ref(tokens).logits
        err, tol = rel(model(tokens), want), tolerance(cfg, T)
    for h in h1 + h2:
        h.remove()
    assert err <= tol, f"{err:.3g} > {tol:.3g}"
    assert len(theirs) == len(mine) == len(moe)
    routes = [m[0][1:] for m in mine]
    for (x_a, ids_a, w_a), (x_b, ids_b, w_b), i in zip((t[0] for t in theirs), (m[0] for m in mine), moe):
        order_a, order_b = ids_a.sort(-1), ids_b.sort(-1)
        assert torch.equal(order_a.values, order_b.values)  # the same experts for every token
        w_a, w_b = w_a.gather(1, order_a.indices), w_b.gather(1, order_b.indices)
        bound = route_weight_bound(x_a.reshape(x_b.shape), x_b, model.layers[i].ffn.gate.weight, w_b)
        assert ((w_a.double() - w_b.double()).abs() <= bound).all(), f"layer {i}"
    with torch.no_grad():
        dec = Decoder(model, 2, T, cache_dtype=torch.float32)
        cached = [dec.logits(dec.forward(tokens[:, :20], torch.zeros(2, dtype=torch.long)))]
        cached += [dec.logits(dec.forward(tokens[:, t:t + 1], torch.full((2,), t))) for t in range(20, T)]
        assert rel(torch.cat(cached, 1), want) <= tol
    return tokens, want, tol, routes


def check_softmax_router(model, cfg: ModelConfig, tokens, want, tol: float, routes) -> None:
    """The renormalised top-k weights of every token sum to 1, and the same weights routed without
    renormalising or with sigmoid scores are far outside the tolerance."""
    for _, w in routes:
        assert torch.allclose(w.sum(-1), torch.ones(len(w)))
    with torch.no_grad():
        for wrong in (dict(norm_topk_prob=False), dict(score_func="sigmoid")):
            other = Transformer(cfg.replace(**wrong)).eval()
            other.load_state_dict(model.state_dict())
            assert rel(other(tokens), want) > 100 * tol, wrong


# the fields an export of a GQA model with routed experts reads back as
ROUTED_GQA_KEYS = ("n_layers", "n_dense_layers", "n_routed_experts", "n_activated_experts", "moe_inter_dim",
                   "n_shared_experts", "score_func", "router_bias", "norm_topk_prob", "route_scale", "n_expert_groups",
                   "n_limited_groups", "n_kv_heads", "head_dim", "rotary_dim", "attn_bias", "qk_norm", "mtp_depth")


def trained_step_exports(cfg: ModelConfig, tok, out, tolerance, arch: str, prepare=lambda model: None) -> dict:
    """A flyer model of ``cfg`` trains a step (every weight the tokens reach moves; ``prepare`` may set more),
    exports in FP32 as ``arch``: transformers' model of the export computes it within ``tolerance(cfg, 24)``,
    every layer past the dense ones has experts, and it reads back to the same ``ROUTED_GQA_KEYS``.
    Returns the written config.json."""
    torch.manual_seed(0)
    model = Transformer(cfg)
    x = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(x).logsumexp(-1).mean().backward()
    opt.step()
    with torch.no_grad():
        prepare(model)
    assert hf_model_type(cfg) == arch
    export_model(model.eval(), tok, out, "fp32")
    back = AutoModelForCausalLM.from_pretrained(out).eval()
    assert all(hasattr(layer.mlp, "experts") for layer in back.model.layers[cfg.n_dense_layers:])
    with torch.no_grad():
        assert rel(model(x), back(x).logits) <= tolerance(cfg, 24)
    back_cfg = load_hf(out)[1]
    assert [getattr(back_cfg, k) for k in ROUTED_GQA_KEYS] == [getattr(cfg, k) for k in ROUTED_GQA_KEYS]
    return json.loads((out / "config.json").read_text())


def test_logits_and_routing_equal_transformers(src):
    """Within ``logit_tolerance`` of transformers, from the training path and the decode cache; each MoE
    layer picks the same experts with the same weights; the same weights routed without renormalising,
    with sigmoid scores, or without head norms are far outside the tolerance."""
    path, ref = src
    model, cfg, _ = load_hf(path)
    assert (cfg.attn, cfg.qk_norm, cfg.head_dim, cfg.n_dense_layers, cfg.n_routed_experts, cfg.n_shared_experts,
            cfg.score_func, cfg.router_bias, cfg.norm_topk_prob, cfg.route_scale) == (
        "gqa", True, 24, 1, 8, 0, "softmax", False, True, 1.0)
    tokens, want, tol, routes = check_logits_and_routes(model, cfg, ref, logit_tolerance)
    check_softmax_router(model, cfg, tokens, want, tol, routes)
    with torch.no_grad():
        plain = Transformer(cfg.replace(qk_norm=False)).eval()
        plain.load_state_dict({k: v for k, v in model.state_dict().items() if "head_norm" not in k})
        assert rel(plain(tokens), want) > 100 * tol


def test_import_export_round_trip_loads_in_transformers(src, tmp_path, capsys):
    a = tensors(src[0])  # one tensor per expert, and layer 0's dense MLP
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in a and "model.layers.0.mlp.gate_proj.weight" in a
    check_round_trip(src, tmp_path, capsys, "qwen3_moe", Qwen3MoeForCausalLM,
                     {"architectures": ["Qwen3MoeForCausalLM"], "mlp_only_layers": [0], "num_experts": 8,
                      "norm_topk_prob": True})


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_balance_loss_weighs_as_transformers(tmp_path, family):
    """A balanced router (zero router weights: each expert's probability 1/E, whatever the routing) costs
    transformers coef * K (its loss pools the layers' routing) and flyer alpha per MoE layer: the imported alpha,
    coef * K / L, makes the term a fine-tune adds transformers' own, and export writes coef back."""
    cls, cfg_cls, kw = FAMILIES[family]
    torch.manual_seed(0)
    ref = cls(cfg_cls(**{**_COMMON, **kw, "num_hidden_layers": 5, "router_aux_loss_coef": 0.02}))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.zero_()
    save_tiny(ref, tmp_path, family)
    model, cfg, tok = load_hf(tmp_path)
    L = cfg.n_layers - cfg.n_dense_layers
    assert L / cfg.n_activated_experts in (2.0, 2.5)  # the factor the coefficient as it stands was off by
    tokens = torch.randint(3, VOCAB, (2, 16))
    want = 0.02 * ref(tokens[:, :-1], output_router_logits=True).aux_loss
    got = model.train().compute_loss(tokens[:, :-1], tokens[:, 1:]).aux_loss
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    assert hf_config(cfg, tok, "float32")["router_aux_loss_coef"] == pytest.approx(0.02, rel=1e-15)


def test_native_gqa_moe_without_dense_layers_exports_as_qwen3_moe(src, tmp_path):
    """A flyer GQA + MoE model with no dense layer and no shared expert (head norms, softmax router,
    plain top-k) trains a step and exports as a Qwen3-MoE transformers computes within the tolerance."""
    _, _, tok = load_hf(src[0])
    cfg = preset("tiny", vocab_size=VOCAB, attn="gqa", n_kv_heads=2, head_dim=16, qk_norm=True, n_dense_layers=0,
                 n_shared_experts=0, n_routed_experts=8, n_activated_experts=2, n_expert_groups=1,
                 n_limited_groups=1, score_func="softmax", router_bias=False, norm_topk_prob=False, route_scale=1.0,
                 mtp_depth=0)
    written = trained_step_exports(cfg, tok, tmp_path / "out", logit_tolerance, "qwen3_moe")
    assert (written["mlp_only_layers"], written["norm_topk_prob"], written["head_dim"]) == ([], False, 16)


def test_train_init_from_qwen3_moe_then_export(src, tmp_path, capsys):
    """The run's logits are the export's in transformers (within the tolerance); the router learns too."""
    model, cfg, back = train_init_then_export(src, tmp_path, capsys, "qwen3_moe")
    assert cfg.is_moe and cfg.qk_norm and cfg.n_shared_experts == 0
    assert not torch.equal(model.layers[1].ffn.gate.weight, load_hf(src[0])[0].layers[1].ffn.gate.weight)
    x = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel(model(x), back(x).logits) <= logit_tolerance(cfg, 24)


def _sparse_layers(d: dict) -> list[int]:
    """The layers transformers' Qwen3MoeForCausalLM gives a sparse MoE block (built on the meta device)."""
    with torch.device("meta"):
        hf = Qwen3MoeForCausalLM(Qwen3MoeConfig.from_dict(d))
    return [i for i, layer in enumerate(hf.model.layers) if hasattr(layer.mlp, "experts")]


@pytest.mark.parametrize("change, field", [
    (dict(mlp_only_layers=[]), None),
    (dict(mlp_only_layers=[0, 1]), None),
    (dict(mlp_only_layers=[0, 7]), None),  # past the last layer: transformers ignores it
    (dict(mlp_only_layers=[1]), "mlp_only_layers"),
    (dict(mlp_only_layers=[0, 2]), "mlp_only_layers"),
    (dict(mlp_only_layers=[], decoder_sparse_step=2), "decoder_sparse_step"),
    (dict(num_hidden_layers=2, mlp_only_layers=[], decoder_sparse_step=2), None),  # layer 0 dense, layer 1 MoE
    (dict(decoder_sparse_step=3), None),  # layers 0 and 1 dense, layer 2 MoE
    (dict(num_hidden_layers=4, decoder_sparse_step=3), "decoder_sparse_step"),  # layer 3 dense again
    (dict(num_local_experts=0), None),  # every layer dense
], ids=["no-dense", "two-dense", "index-past-end", "dense-second", "dense-gap", "every-other", "step-2-of-2",
        "step-3", "step-3-of-4", "no-experts"])
def test_dense_layer_patterns_read_as_transformers_builds_them(src, tmp_path, capsys, change, field):
    """flyer reads a Qwen3-MoE config exactly where transformers' dense layers are its first ones (then
    ``n_dense_layers`` counts them); any other pattern is one line naming the field that makes it."""
    path, _ = src
    d = {**json.loads((path / "config.json").read_text()), **change}
    sparse = _sparse_layers(d)
    if field is None:
        cfg = ModelConfig.from_dict(d)
        assert sparse == (list(range(cfg.n_dense_layers, cfg.n_layers)) if cfg.n_routed_experts else [])
    else:
        assert sparse != list(range(d["num_hidden_layers"] - len(sparse), d["num_hidden_layers"]))
        _config_error(tmp_path, capsys, d, field)


def test_what_flyer_cannot_run_or_export_is_one_line(src, tmp_path, capsys):
    """Reading: an attention bias (o_proj's too), a sparse step below 1, a malformed layer list; a sliding window
    slides every Qwen3-MoE layer (4096 where the file has none, transformers' default). Exporting a GQA model with
    experts: only with Qwen3-MoE's router and head norms."""
    path, _ = src
    d = json.loads((path / "config.json").read_text())
    cfg = load_hf(path)[1]
    every = tuple(range(cfg.n_layers))
    no_window = {k: v for k, v in d.items() if k != "sliding_window"}  # transformers' default: 4096
    assert ModelConfig.from_dict({**no_window, "use_sliding_window": True, "max_position_embeddings": 8192}) == \
        cfg.replace(window_size=4096, sliding_layers=every, max_seq_len=8192, original_seq_len=8192)
    assert ModelConfig.from_dict({**d, "use_sliding_window": True, "sliding_window": 64}) == \
        cfg.replace(window_size=64, sliding_layers=every)
    for change, field in ((dict(attention_bias=True), "attention_bias"),
                          (dict(decoder_sparse_step=-1), "decoder_sparse_step"),
                          (dict(mlp_only_layers="0"), "mlp_only_layers")):
        _config_error(tmp_path, capsys, {**d, **change}, field)
    assert ModelConfig.from_dict({**d, "use_sliding_window": True, "sliding_window": None}) == cfg  # none slides
    for change, field in ((dict(n_shared_experts=1), "n_shared_experts"), (dict(score_func="sigmoid"), "score_func"),
                          (dict(router_bias=True), "router_bias"), (dict(qk_norm=False), "qk_norm"),
                          (dict(route_scale=2.5), "route_scale"),
                          (dict(n_expert_groups=4, n_limited_groups=2), "n_limited_groups")):
        with pytest.raises(ConfigError) as e:
            hf_model_type(cfg.replace(**change))
        assert str(e.value).startswith(f"config field '{field}'") and "\n" not in str(e.value)
    assert hf_model_type(cfg.replace(n_expert_groups=4, n_limited_groups=4)) == "qwen3_moe"  # no group limit


QWEN3_30B_A3B = {  # Qwen/Qwen3-30B-A3B config.json (transformers 4 spelling)
    "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144, "max_position_embeddings": 40960,
    "max_window_layers": 48, "mlp_only_layers": [], "model_type": "qwen3_moe", "moe_intermediate_size": 768,
    "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 48, "num_key_value_heads": 4, "output_router_logits": False, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936}


def test_hub_config_counts_as_transformers_builds_it(tmp_path, capsys):
    """``flyer info --config`` of Qwen3-30B-A3B's hub file: the parameters transformers'
    Qwen3MoeForCausalLM has (meta device); a file without head_dim takes hidden_size / heads, as
    Qwen3MoeConfig does (not Qwen3Config's 128)."""
    got = info_json(tmp_path, capsys, QWEN3_30B_A3B)
    with torch.device("meta"):
        hf = Qwen3MoeForCausalLM(Qwen3MoeConfig.from_dict(QWEN3_30B_A3B))
    assert got["total_params"] == sum(t.numel() for t in hf.parameters())
    no_head_dim = {k: v for k, v in QWEN3_30B_A3B.items() if k != "head_dim"}
    with torch.device("meta"):
        attn = Qwen3MoeForCausalLM(Qwen3MoeConfig.from_dict({**no_head_dim, "num_hidden_layers": 1})).model.layers[0]
    assert ModelConfig.from_dict(no_head_dim).head_dim == attn.self_attn.head_dim == 64
