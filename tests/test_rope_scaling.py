"""Llama 3.1's ``llama3`` and ``linear`` RoPE scaling, and Mistral read as Llama: flyer's frequencies,
logits and greedy tokens equal transformers' past the original context, exports load in transformers
with the same RoPE, configs without ``rope_type`` stay YaRN, and what flyer cannot run is one line
naming the field. Tiny random models, FP32, CPU."""

import json
import math
from dataclasses import replace

import pytest
import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, DeepseekV3Config, LlamaConfig, LlamaForCausalLM,
                          MistralConfig, MistralForCausalLM)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from flyer.cli import main
from flyer.config import ModelConfig, preset
from flyer.errors import ConfigError
from flyer.interop.export import export_model
from flyer.interop.export_config import hf_model_type
from flyer.interop.hf import load_hf
from flyer.model.rope import rope_frequencies
from flyer.model.transformer import Transformer
from tests.bounds import FP32_U
from tests.hf_models import FAMILIES, VOCAB, _COMMON, make_tokenizer, to_transformers_4, trained_bias
from tests.test_interop_export import tensors

ORIG = 64  # original context: with head_dim 16 and theta 1e4, llama3's three bands all occur (checked)
LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": ORIG}
LINEAR = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}
_V3 = FAMILIES["v3"][2]

# name -> (model class, config class, config kwargs), over tests.hf_models' common sizes (max_position 256)
MODELS = {
    "llama3": (LlamaForCausalLM, LlamaConfig, dict(num_key_value_heads=2, rope_parameters=LLAMA3, rms_norm_eps=1e-5)),
    "linear": (LlamaForCausalLM, LlamaConfig, dict(num_key_value_heads=2, rope_parameters=LINEAR)),
    "mistral": (MistralForCausalLM, MistralConfig, dict(num_key_value_heads=2, sliding_window=None,
                                                        rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    # transformers' DeepseekV3 takes any rope_type; without mscale_all_dim its softmax is not scaled
    "v3-llama3": (None, DeepseekV3Config, {**_V3, "rope_parameters": LLAMA3}),
}
PROMPT = "the quick brown fox jumps over the lazy dog, hello world " * 4  # 97 tokens > ORIG


def build(name: str, out, spelling: int = 5):
    """Save a random tiny ``name`` model (FP32) with a tokenizer under ``out``; return it."""
    cls, cfg_cls, kw = MODELS[name]
    torch.manual_seed(0)
    if cls is None:
        model = AutoModelForCausalLM.from_config(cfg_cls(**_COMMON, **kw)).eval()
        trained_bias(model)
    else:
        model = cls(cfg_cls(**_COMMON, **kw)).eval()
    model.save_pretrained(out)
    make_tokenizer(out)
    if spelling == 4:
        to_transformers_4(out)
    return model


def logit_tolerance(cfg: ModelConfig, T: int) -> float:
    """Bound on max|flyer - transformers| / max|logit| for FP32 evaluations of one checkpoint on T
    positions, to first order: each of the L layers sums at most dim, inter_dim and T terms (projections,
    FFN, attention) in two different orders (n u each, the terms' absolute sum taken as the logit
    scale: random weights); and transformers' FP32 frequencies are off by up to (ln theta + 8) u (the
    pow's exponent is rounded, then a few operations), so an angle t f (f <= 1) by T (ln theta + 8) u."""
    L = cfg.n_layers
    return (L * (cfg.dim + cfg.inter_dim + T) + T * (math.log(cfg.rope_theta) + 8)) * FP32_U


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("kw", [
    dict(hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072, rope_parameters={  # Llama 3.1 8B
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    dict(hidden_size=2048, num_attention_heads=32, head_dim=64, max_position_embeddings=131072,  # Llama 3.2 1B
         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    dict(hidden_size=64, num_attention_heads=4, max_position_embeddings=256, rope_parameters=LLAMA3),
    dict(hidden_size=256, num_attention_heads=4, max_position_embeddings=4096, rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 2.0,
        "high_freq_factor": 8.0, "original_max_position_embeddings": 1024}),
    dict(hidden_size=64, num_attention_heads=4, max_position_embeddings=256, rope_parameters=LINEAR),
    dict(hidden_size=4096, num_attention_heads=32, max_position_embeddings=16384, rope_parameters={
        "rope_type": "linear", "rope_theta": 1e6, "factor": 2.5}),
], ids=["llama3.1", "llama3.2", "tiny-llama3", "llama3-2-8", "tiny-linear", "linear-2.5"])
def test_frequencies_equal_transformers(kw):
    """flyer's frequencies (FP64, rounded once) against transformers' ``ROPE_INIT_FUNCTIONS`` (FP32):
    within transformers' own rounding of frequency i, (ln theta 2i/d + 8) u: its exponent 2i/d is
    rounded before the pow, which moves theta^(2i/d) by ln theta 2i/d u, then a few operations."""
    hf = LlamaConfig(vocab_size=32, num_hidden_layers=1, intermediate_size=8, **kw)
    rp = hf.rope_parameters
    want, attention_factor = ROPE_INIT_FUNCTIONS[rp["rope_type"]](hf)
    cfg = ModelConfig.from_dict(hf.to_dict())
    assert (cfg.rope_type, cfg.rope_factor, cfg.rope_attn_factor, attention_factor) == (rp["rope_type"],
                                                                                         rp["factor"], 1.0, 1.0)
    got = rope_frequencies(hf.head_dim, cfg)
    i = torch.arange(hf.head_dim // 2, dtype=torch.float64)
    bound = (math.log(rp["rope_theta"]) * 2 * i / hf.head_dim + 8) * FP32_U * want.double()
    assert got.dtype == torch.float32 and ((got.double() - want.double()).abs() <= bound).all()
    plain = 1.0 / rp["rope_theta"] ** (2 * i / hf.head_dim)
    assert not torch.allclose(got.double(), plain, rtol=1e-3)  # scaled: not the unscaled frequencies


def test_llama3_bands_all_occur_in_the_tiny_models():
    """The test models' head_dim 16 with a 64-position original context has frequencies in each of
    llama3's bands: kept (wavelength < 64 / 4), divided by the factor (> 64 / 1), and mixed."""
    cfg = ModelConfig.from_dict(LlamaConfig(**_COMMON, **MODELS["llama3"][2]).to_dict())
    plain = 1.0 / 10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    wavelength = 2 * math.pi / plain
    high, low = wavelength < ORIG / 4, wavelength > ORIG / 1
    mixed = ~high & ~low
    assert high.any() and low.any() and mixed.any()
    got = rope_frequencies(16, cfg).double()
    assert torch.allclose(got[high], plain[high]) and torch.allclose(got[low], plain[low] / 8)
    assert ((got[mixed] < plain[mixed]) & (got[mixed] > plain[mixed] / 8)).all()


CASES = [("llama3", 5), ("llama3", 4), ("linear", 5), ("mistral", 5), ("v3-llama3", 4)]


@pytest.mark.parametrize("name, spelling", CASES)
def test_logits_and_cli_greedy_tokens_equal_transformers(tmp_path, capsys, name, spelling):
    """Past the original context (160 > 64 positions) flyer's logits are transformers' within
    ``logit_tolerance``, while the same model without the scaling is far outside it; ``flyer
    generate`` of a 97-token prompt gives transformers' greedy tokens."""
    ref = build(name, tmp_path, spelling)
    model, cfg, _ = load_hf(tmp_path)
    assert cfg.rope_type == MODELS[name][2]["rope_parameters"]["rope_type"]
    T = 160
    tokens = torch.randint(3, VOCAB, (2, T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(tmp_path).eval()(tokens).logits  # reads this spelling
        err, tol = rel(model(tokens), want), logit_tolerance(cfg, T)
        assert err <= tol, f"{name}: {err:.3g} > {tol:.3g}"
        if cfg.rope_type != "default":  # the same weights, frequencies not scaled
            plain = Transformer(cfg.replace(rope_type="default", rope_factor=1.0)).eval()
            plain.load_state_dict(model.state_dict())
            assert rel(plain(tokens), want) > 100 * tol
    ids = AutoTokenizer.from_pretrained(tmp_path)(PROMPT)["input_ids"]
    assert len(ids) > ORIG
    out = ref.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=16, eos_token_id=None, pad_token_id=0)
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(tmp_path), "--prompt", PROMPT, "--max-new-tokens", "16",
                 "--eos-id", "-1", "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == [out[0, len(ids):].tolist()]


@pytest.mark.parametrize("name", ["llama3", "linear", "mistral", "v3-llama3"])
def test_export_loads_in_transformers_with_the_same_rope(tmp_path, name):
    """Import then export writes the source's tensors and a config whose RoPE transformers computes
    as the source does (Mistral without a window is written as Llama): the same logits."""
    src = build(name, tmp_path / "src")
    model, cfg, tok = load_hf(tmp_path / "src")
    summary = export_model(model, tok, tmp_path / "out", "fp32")
    a, b = tensors(tmp_path / "src"), tensors(tmp_path / "out")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    written = json.loads((tmp_path / "out" / "config.json").read_text())["rope_parameters"]
    source = src.config.rope_parameters
    assert written == {k: v for k, v in source.items() if k != "partial_rotary_factor"}
    assert summary["model_type"] == ("llama" if name == "mistral" else src.config.model_type)
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    x = torch.randint(3, VOCAB, (2, 160), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel(back(x).logits, src(x).logits) <= logit_tolerance(cfg, 160)
    assert load_hf(tmp_path / "out")[1] == cfg


LLAMA31_8B = {  # meta-llama/Llama-3.1-8B config.json (transformers 4 spelling)
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000,
    "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "vocab_size": 128256}
MISTRAL_7B_V03 = {  # mistralai/Mistral-7B-v0.3 config.json
    "architectures": ["MistralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 32768, "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 32768}


def _spellings(d: dict) -> list[dict]:
    """Llama 3.1's file, its ``type`` spelling (older transformers 4) and transformers 5's."""
    rs = dict(d["rope_scaling"])
    kind = rs.pop("rope_type")
    rest = {k: v for k, v in d.items() if k not in ("rope_scaling", "rope_theta")}
    return [d, {**d, "rope_scaling": {**rs, "type": kind}},
            {**rest, "rope_parameters": {**rs, "rope_type": kind, "rope_theta": d["rope_theta"]}}]


def test_hub_configs_read_and_round_trip():
    a, b, c = (ModelConfig.from_dict(d) for d in _spellings(LLAMA31_8B))
    assert a == b == c
    assert (a.rope_type, a.rope_factor, a.original_seq_len, a.low_freq_factor, a.high_freq_factor) == \
        ("llama3", 8.0, 8192, 1.0, 4.0)
    assert (a.rope_theta, a.max_seq_len, a.mscale, a.rope_attn_factor, a.softmax_scale) == \
        (500000.0, 131072, 0.0, 1.0, 128 ** -0.5)
    assert ModelConfig.from_dict(json.loads(json.dumps(a.to_dict()))) == a  # a run's saved config.json
    m = ModelConfig.from_dict(MISTRAL_7B_V03)
    assert (m.attn, m.rope_type, m.rope_factor, m.n_kv_heads, m.head_dim, m.attn_bias) == \
        ("gqa", "default", 1.0, 8, 128, False)
    every = tuple(range(m.n_layers))
    for window in (4096, 32768):  # Mistral 7B v0.1's; one as long as the context, which a longer row would slide
        assert ModelConfig.from_dict({**MISTRAL_7B_V03, "sliding_window": window}) == m.replace(
            window_size=window, sliding_layers=every)


def test_configs_without_rope_type_stay_yarn():
    """Presets and configs saved before ``rope_type`` (no such key) compute as they did: YaRN,
    with its softmax scale, when rope_factor > 1; unscaled at 1."""
    dsv3 = preset("dsv3")
    old = {k: v for k, v in dsv3.to_dict().items() if k not in ("rope_type", "low_freq_factor", "high_freq_factor")}
    assert ModelConfig.from_dict(old) == dsv3 and dsv3.rope_type == "yarn"
    assert math.isclose(dsv3.softmax_scale, 192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2)
    tiny = preset("tiny")
    assert tiny.rope_type == "yarn" and tiny.rope_factor == 1.0
    plain = 1.0 / 10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    assert torch.equal(rope_frequencies(16, tiny), plain.float())
    # llama3's bands and linear interpolation leave the softmax alone, whatever mscale says
    for kind in ("llama3", "linear"):
        assert dsv3.replace(rope_type=kind).softmax_scale == 192 ** -0.5


def _llama3_file(**rope) -> dict:
    return {**LLAMA31_8B, "rope_scaling": {**LLAMA31_8B["rope_scaling"], **rope}}


@pytest.mark.parametrize("d, field", [
    ({**LLAMA31_8B, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_scaling.rope_type"),
    ({**MISTRAL_7B_V03, "sliding_window": 0}, "sliding_window"),
    ({**LLAMA31_8B, "rope_scaling": {k: v for k, v in LLAMA31_8B["rope_scaling"].items() if k != "low_freq_factor"}},
     "rope_scaling.low_freq_factor"),
    (_llama3_file(factor=None), "rope_scaling.factor"),
    (_llama3_file(high_freq_factor="4"), "rope_scaling.high_freq_factor"),
    (_llama3_file(high_freq_factor=1.0), "high_freq_factor"),
    (_llama3_file(low_freq_factor=0.0), "low_freq_factor"),
    (_llama3_file(factor=0.5), "rope_factor"),
    ({**DeepseekV3Config(**_COMMON, **_V3).to_dict(), "rope_parameters": {**LLAMA3, "mscale_all_dim": 1.0}},
     "rope_parameters.mscale_all_dim"),
])
def test_unsupported_rope_and_windows_are_one_line_errors(tmp_path, capsys, d, field):
    p = tmp_path / "config.json"
    p.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=f"field '{field}'"):  # an HF key, or the flyer field it sets
        ModelConfig.from_json(p)
    assert main(["info", "--config", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flyer: error: ") and field in err and "\n" not in err
    if field == "rope_scaling.rope_type":
        assert "(supported: default, yarn, llama3, linear)" in err


@pytest.mark.parametrize("over, message", [
    (dict(rope_type="ntk"), "'rope_type': must be one of default, yarn, llama3, linear"),
    (dict(rope_type="default", rope_factor=4.0), "'rope_factor': must be 1 with rope_type 'default'"),
    (dict(rope_type="llama3", rope_attn_factor=1.2), "'rope_attn_factor': must be 1 with rope_type 'llama3'"),
    (dict(rope_type="llama3", low_freq_factor=4.0, high_freq_factor=4.0), "'high_freq_factor': must be > low_freq"),
])
def test_rope_fields_are_validated(over, message):
    with pytest.raises(ConfigError) as e:
        preset("dsv3", **over)
    assert str(e.value).startswith(f"config field {message}") and "\n" not in str(e.value)


@pytest.mark.parametrize("rope_type", ["llama3", "linear"])
def test_a_gqa_config_with_llama3_or_linear_exports_as_llama(rope_type):
    """YaRN's softmax correction (mscale) is what Llama cannot compute; a GQA config scaled another
    way exports whatever its (unused) mscale says, as a flyer config or preset has mscale 1."""
    cfg = preset("llama3.1-405b", rope_type=rope_type, rope_factor=8.0, mscale=1.0)
    assert hf_model_type(cfg) == "llama" and cfg.softmax_scale == cfg.head_dim ** -0.5
    with pytest.raises(ConfigError, match="mscale"):
        hf_model_type(replace(cfg, rope_type="yarn"))
