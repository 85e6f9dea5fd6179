"""DeepSeek-V4 checkpoints (``deepseek_v4``: hybrid attention, hyper-connections, hash-routed and sqrtsoftplus
experts): DeepSeek's published configs read as flyer's presets; flyer's training-path logits equal transformers'
DeepseekV4ForCausalLM, from its ``save_pretrained`` spelling and from DeepSeek's hub spelling; import -> export ->
transformers gives the same tensors and logits; ``train --init`` from a V4 directory trains and exports; what
flyer cannot run is one line naming the field. Tiny random models, FP32, CPU."""

import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, DeepseekV4ForCausalLM

from flyer.cli import main
from flyer.config import ModelConfig, preset
from flyer.errors import ConfigError
from flyer.interop.export import export_model
from flyer.interop.export_config import hf_model_type
from flyer.interop.hf import load_hf
from flyer.interop.hf_names import v4_name
from flyer.interop.load import load_pretrained
from flyer.interop.v4_quant import (dequantize_fp4_e2m1, dequantize_ue8m0_blocks, quantize_fp4_e2m1,
                                    quantize_ue8m0_blocks)
from tests.hf_models import FAMILIES, VOCAB, build
from tests.test_interop_export import tensors
from tests.test_qwen3 import TEXT, rel, train_init_then_export
from tests.test_rope_scaling import FP32_U

# DeepSeek's hub config.json of DeepSeek-V4-Flash and -Pro, verbatim but for the Pro's list of ratios written
# as a product (62 entries: the 61 layers' and the MTP layer's)
FLASH = {
    "architectures": ["DeepseekV4ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 0,
    "eos_token_id": 1, "expert_dtype": "fp4", "hc_eps": 1e-06, "hc_mult": 4, "hc_sinkhorn_iters": 20, "head_dim": 512,
    "hidden_act": "silu", "hidden_size": 4096, "index_head_dim": 128, "index_n_heads": 64, "index_topk": 512,
    "initializer_range": 0.02, "max_position_embeddings": 1048576, "model_type": "deepseek_v4",
    "moe_intermediate_size": 2048, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True,
    "num_attention_heads": 64, "num_experts_per_tok": 6, "num_hidden_layers": 43, "num_hash_layers": 3,
    "num_key_value_heads": 1, "num_nextn_predict_layers": 1, "o_groups": 8, "o_lora_rank": 1024, "q_lora_rank": 1024,
    "qk_rope_head_dim": 64, "quantization_config": {
        "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "scale_fmt": "ue8m0",
        "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 16,
                                            "original_max_position_embeddings": 65536, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.5, "scoring_func": "sqrtsoftplus", "sliding_window": 128,
    "swiglu_limit": 10.0, "tie_word_embeddings": False, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "transformers_version": "4.57.1", "use_cache": True, "vocab_size": 129280, "compress_rope_theta": 160000,
    "compress_ratios": [0, 0, 4, 128, 4, 128, 4, 128, 4, 128, 4, 128, 4, 128, 4, 128, 4, 128, 4, 128, 4, 128, 4, 128,
                        4, 128, 4, 128, 4, 128, 4, 128, 4, 128, 4, 128, 4, 128, 4, 128, 4, 128, 4, 0],
}
PRO = {**FLASH, "hidden_size": 7168, "index_topk": 1024, "moe_intermediate_size": 3072, "n_routed_experts": 384,
       "num_attention_heads": 128, "num_hidden_layers": 61, "o_groups": 16, "q_lora_rank": 1536,
       "routed_scaling_factor": 2.5, "compress_ratios": [128, 128] + [4, 128] * 29 + [4, 0]}


@pytest.mark.parametrize("name, published", [("dsv4-flash", FLASH), ("dsv4-pro", PRO)])
def test_published_configs_read_as_the_presets(name, published):
    assert ModelConfig.from_dict(published) == preset(name)


def v4_tolerance(cfg: ModelConfig, T: int) -> float:
    """Bound on max|flyer - transformers| / max|logit| for FP32 evaluations of one V4 checkpoint on T positions,
    as ``tests.test_rope_scaling.logit_tolerance`` derives it: each layer sums, in two different orders, the
    hyper-connections' N D inputs (twice), the projections' (dim, q_lora_rank, a head group's H hd / g channels,
    the g o_lora_rank), the FFN's moe_inter_dim, attention over at most T + T / 4 keys and sinks, and the
    Sinkhorn normalisation's 2 N terms per iteration; plus the RoPE angles' error, T (ln theta + 8) u."""
    N, L = cfg.hc_mult, cfg.n_layers
    per_layer = (2 * N * cfg.dim + cfg.dim + cfg.q_lora_rank + cfg.n_heads * cfg.head_dim // cfg.o_groups
                 + cfg.o_groups * cfg.o_lora_rank + cfg.moe_inter_dim + T + T // 4 + 2 * N * cfg.hc_sinkhorn_iters)
    return (L * per_layer + T * (math.log(cfg.compress_rope_theta) + 8)) * FP32_U


def _tokens(T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A tiny random V4 directory as transformers saves it (every layer kind, hash-routed layers, 4 streams, the
    SwiGLU clamp active) and transformers' model of it."""
    path = tmp_path_factory.mktemp("v4")
    build("v4", path)
    ref = AutoModelForCausalLM.from_pretrained(path).eval()
    assert isinstance(ref, DeepseekV4ForCausalLM)
    return path, ref


def test_logits_equal_transformers(src):
    """At 64 tokens (windows of 8 slide, 16 CSA entries of which queries keep 4, 4 HCA entries) and at 8."""
    path, ref = src
    model, cfg, _ = load_hf(path)
    assert (cfg.attn, cfg.compress_ratios, cfg.n_hash_layers, cfg.hc_mult, cfg.window_size) == ("hybrid", (0, 4, 16, 4),
                                                                                                 2, 4, 8)
    for T in (64, 8):
        x = _tokens(T, T)
        with torch.no_grad():
            err, tol = rel(model(x), ref(x).logits), v4_tolerance(cfg, T)
        assert err <= tol, f"T={T}: {err:.3g} > {tol:.3g}"


def test_mutations_are_far_outside_the_tolerance(src):
    """The same weights with the compressed layers' RoPE at the window layers' base, a window one key wider, or
    no hash routing (layer 0 routed by its scores) miss transformers' logits by far more than the tolerance."""
    path, ref = src
    model, cfg, _ = load_hf(path)
    x = _tokens(64)
    with torch.no_grad():
        want = ref(x).logits
    tol = v4_tolerance(cfg, 64)
    for change in (dict(compress_rope_theta=cfg.rope_theta), dict(window_size=cfg.window_size + 1),
                   dict(n_hash_layers=0)):
        wrong = type(model)(cfg.replace(**change)).eval()
        state = {k: v for k, v in model.state_dict().items() if "tid2eid" not in k or change.get("n_hash_layers") != 0}
        missing = wrong.load_state_dict(state, strict=False)
        assert not missing.unexpected_keys
        with torch.no_grad():
            err = rel(wrong(x), want)
        assert err > 100 * tol, f"{change}: {err:.3g} within 100x {tol:.3g}"


def _to_hub_spelling(src_path, out, ratios_map, hub: bool = True):
    """``src_path``'s model as DeepSeek's hub files spell it: un-prefixed native tensor names, and (``hub``) the
    config's ``compress_ratios`` (one more entry for the MTP layer), ``num_hash_layers``, ``rope_theta`` +
    ``rope_scaling``, ``compress_rope_theta``, ``qk_rope_head_dim``."""
    out.mkdir()
    state = {}
    for f in sorted(src_path.glob("*.safetensors")):
        state.update({v4_name(k): t for k, t in load_file(f).items()})
    save_file(state, out / "model.safetensors")
    for f in src_path.glob("tokenizer*"):
        (out / f.name).write_bytes(f.read_bytes())
    d = json.loads((src_path / "config.json").read_text())
    if not hub:
        (out / "config.json").write_text(json.dumps(d))
        return
    comp = dict(d["rope_parameters"]["compress"])
    for k in ("layer_types", "compress_rates", "mlp_layer_types", "rope_parameters", "partial_rotary_factor"):
        d.pop(k, None)
    comp.pop("partial_rotary_factor"), comp.pop("attention_factor", None)
    d.update(compress_ratios=ratios_map + [0], num_hash_layers=2, rope_scaling={"type": comp.pop("rope_type"), **comp},
             compress_rope_theta=comp.pop("rope_theta"), qk_rope_head_dim=8)
    (out / "config.json").write_text(json.dumps(d))


def test_hub_spelling_reads_alike_in_flyer_and_transformers(tmp_path):
    """A model whose HCA ratio is the hub's 128 (the hub spelling has no other), saved by transformers and
    rewritten in DeepSeek's spelling: flyer reads the same config and weights from both, and transformers
    computes the hub files as flyer does (at 160 tokens: one HCA entry)."""
    kw = dict(FAMILIES["v4"][2], compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 128})
    FAMILIES["v4-hub"] = (FAMILIES["v4"][0], FAMILIES["v4"][1], kw)
    try:
        build("v4-hub", tmp_path / "saved")
    finally:
        del FAMILIES["v4-hub"]
    _to_hub_spelling(tmp_path / "saved", tmp_path / "hub", [0, 4, 128, 4])
    model, cfg, _ = load_hf(tmp_path / "hub")
    saved, cfg_saved, _ = load_hf(tmp_path / "saved")
    assert cfg == cfg_saved and cfg.compress_ratios == (0, 4, 128, 4)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), saved.state_dict().values()))
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "hub").eval()
    x = _tokens(160, 3)
    with torch.no_grad():
        err, tol = rel(model(x), ref(x).logits), v4_tolerance(cfg, 160)
    assert err <= tol, f"{err:.3g} > {tol:.3g}"


_FP8 = re.compile(r"attn\.(wq_a|wq_b|wkv|wo_a|wo_b|indexer\.wq_b)\.weight$|shared_experts\.w[123]\.weight$")


def test_published_fp8_and_fp4_format_loads_as_its_values(src, tmp_path):
    """DeepSeek's published format (its safetensors header): attention, indexer-query and shared-expert weights
    as E4M3 codes with UE8M0 128x128 block scales (``<name>.scale``), routed experts as FP4 E2M1 two to a byte
    with a UE8M0 scale per 32 inputs, the rest in BF16/F32. flyer reads each weight as exactly its codes times
    its scales (``flyer.interop.v4_quant``, held to transformers' decoder by ``tests/test_v4_quant.py``), and
    the model computes as one holding those values."""
    _to_hub_spelling(src[0], tmp_path / "hub", [0, 4, 16, 4], hub=False)
    state, quant = load_file(tmp_path / "hub" / "model.safetensors"), {}
    values = {}
    for name, w in state.items():
        if _FP8.search(name) or re.search(r"\.experts\.\d+\.w[123]\.weight$", name):
            fp4 = ".experts." in name and "shared" not in name
            codes, scale = (quantize_fp4_e2m1 if fp4 else quantize_ue8m0_blocks)(w, name=name)
            quant[name], quant[name.removesuffix(".weight") + ".scale"] = codes, scale
            values[name] = (dequantize_fp4_e2m1 if fp4 else dequantize_ue8m0_blocks)(codes, scale)
        else:
            quant[name] = w
    assert sum(v.dtype == torch.int8 for v in quant.values()) == 4 * 8 * 3  # every routed expert in FP4
    save_file(quant, tmp_path / "hub" / "model.safetensors")
    model, cfg, _ = load_hf(tmp_path / "hub")
    plain, _, _ = load_hf(src[0])
    state = plain.state_dict()
    for name, v in values.items():  # each decoded weight in place of the plain one
        m = re.fullmatch(r"(layers\.\d+\.ffn\.)experts\.(\d+)\.(w[123])\.weight", name)
        key = f"{m.group(1)}experts.{m.group(3)}" if m else name.replace("shared_experts", "shared")
        (state[key][int(m.group(2))] if m else state[key]).copy_(v)
    mine = model.state_dict()
    assert all(torch.equal(mine[k], state[k]) for k in state)
    x = _tokens(32, 4)
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))


def test_import_export_round_trip_loads_in_transformers(src, tmp_path, capsys):
    """``export_model`` of the import and ``flyer export`` of the directory write the source's tensors (in
    DeepSeek's names) and a config transformers loads as DeepseekV4: the same logits, bit for bit; flyer reads
    the export as the same config."""
    path, ref = src
    model, cfg, tok = load_hf(path)
    assert hf_model_type(cfg) == "deepseek_v4"
    export_model(model, tok, tmp_path / "out", "fp32")
    capsys.readouterr()
    assert main(["export", str(path), "--out", str(tmp_path / "streamed"), "--dtype", "fp32"]) == 0
    assert json.loads(capsys.readouterr().out)["model_type"] == "deepseek_v4"
    a = {v4_name(k): t for k, t in tensors(path).items()}
    x = _tokens(40, 1)
    with torch.no_grad():
        want = ref(x).logits
    for out in (tmp_path / "out", tmp_path / "streamed"):
        b = tensors(out)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert b["layers.0.ffn.gate.tid2eid"].dtype == torch.int64
        back = AutoModelForCausalLM.from_pretrained(out).eval()
        assert isinstance(back, DeepseekV4ForCausalLM)
        with torch.no_grad():
            assert torch.equal(back(x).logits, want)
        assert load_hf(out)[1] == cfg


def test_train_init_from_v4_then_export(src, tmp_path, capsys):
    """A step of ``flyer train --init``: the hash tables are kept, the top-k layers' balancing biases and the
    hyper-connections move, and transformers computes the export as the run does."""
    model, cfg, back = train_init_then_export(src, tmp_path, capsys, "deepseek_v4")
    before = load_hf(src[0])[0]
    assert torch.equal(model.layers[0].ffn.gate.tid2eid, before.layers[0].ffn.gate.tid2eid)
    assert not torch.equal(model.layers[2].hc_attn.fn, before.layers[2].hc_attn.fn)
    assert not torch.equal(model.layers[1].attn.compressor.wkv.weight, before.layers[1].attn.compressor.wkv.weight)
    x = _tokens(24, 2)
    with torch.no_grad():
        err, tol = rel(model(x), back(x).logits), v4_tolerance(cfg, 24)
    assert err <= tol, f"{err:.3g} > {tol:.3g}"


def test_serve_refuses_a_v4_block_size_in_one_line(src, capsys, tmp_path):
    """flyer serve runs V4 with its on-disk prefix cache (``tests/test_serve_v4_disk.py``) in blocks of whole
    compressed entries: a --block-size a ratio does not divide is refused before the weights load."""
    assert main(["serve", "--ckpt", str(src[0]), "--prefix-cache", str(tmp_path / "pc"), "--block-size", "6"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "hybrid attention" in err[0] and "--block-size" in err[0], err
    assert not (tmp_path / "pc").exists()


@pytest.mark.parametrize("field, value, needs", [
    ("hc_mult", 1, ">= 2"), ("n_shared_experts", 2, "1"), ("swiglu_limit", 0.0, "> 0"),
    ("norm_topk_prob", False, "True"), ("num_key_value_heads", 2, "1"), ("compress_ratios", [0, 8], "0, 4 or 128"),
    ("layer_types", ["sliding_attention"] * 42, "expected 43 of 'sliding_attention'"),
    ("layer_types", ["sliding_attention"] * 42, "(got 42 entries: ['sliding_attention',")])  # the count said first
def test_unsupported_config_values_are_named(field, value, needs):
    with pytest.raises(ConfigError, match=field) as e:
        ModelConfig.from_dict({**FLASH, field: value})
    assert needs in str(e.value) and "\n" not in str(e.value)


def test_export_refuses_what_transformers_v4_does_not_compute():
    cfg = preset("dsv4-flash")
    for change, field in ((dict(hc_mult=1), "hc_mult"), (dict(n_shared_experts=2), "n_shared_experts"),
                          (dict(router_bias=False), "router_bias")):
        with pytest.raises(ConfigError, match=field):
            hf_model_type(cfg.replace(**change))


def test_tiny_v4_trains_from_scratch_then_exports(tmp_path, capsys):
    """``flyer train --preset tiny-v4`` (random hash tables: distinct experts per token id), two steps; the run
    reloads with its hash tables and exports as DeepSeek-V4, which transformers computes as the run does."""
    (tmp_path / "text.txt").write_text(TEXT)
    assert main(["train", "--preset", "tiny-v4", "--steps", "2", "--batch-size", "2", "--seq-len", "32", "--data",
                 str(tmp_path / "text.txt"), "--data-cache", str(tmp_path / "cache"), "--out", str(tmp_path / "run"),
                 "--no-progress", "--no-plots", "--ckpt-every", "1", "--device", "cpu", "--precision", "fp32"]) == 0
    model, cfg, _ = load_pretrained(tmp_path / "run")
    table = model.layers[0].ffn.gate.tid2eid
    assert cfg == preset("tiny-v4", vocab_size=cfg.vocab_size) and (table[:, 0] != table[:, 1]).all()  # its BPE
    capsys.readouterr()
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "out"), "--dtype", "fp32"]) == 0
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    x = torch.randint(0, cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        err, tol = rel(model(x), back(x).logits), v4_tolerance(cfg, 48)
    assert err <= tol, f"{err:.3g} > {tol:.3g}"


def test_fp8_export_of_v4_writes_its_published_format(src, tmp_path, capsys):
    """``--dtype fp8`` writes DeepSeek's published V4 format (tests/test_v4_export_fp8.py checks it tensor by
    tensor): the config says so as DeepSeek's does, and the experts are FP4."""
    assert main(["export", str(src[0]), "--out", str(tmp_path / "out"), "--dtype", "fp8"]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"] == FLASH["quantization_config"] and config["expert_dtype"] == "fp4"
    assert tensors(tmp_path / "out")["layers.2.ffn.experts.0.w1.weight"].dtype == torch.int8
