"""Qwen3 dense checkpoints (GQA with an RMSNorm over each head's query and key before RoPE, a
head_dim of its own, tied embeddings): flyer's logits, ``flyer generate``'s and the serving engine's
greedy tokens equal transformers' Qwen3ForCausalLM; import -> export -> transformers gives the same
tensors and logits; ``train --init`` from a Qwen3 directory; sliding layers read as transformers slides them;
what flyer cannot run (head norms on MLA) is one line naming the field. Tiny random models, FP32, CPU."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

from flyer.cli import main
from flyer.config import ModelConfig, preset
from flyer.errors import ConfigError
from flyer.infer.decoder import Decoder
from flyer.infer.generate import GenerationConfig, generate
from flyer.interop.export import export_model
from flyer.interop.export_config import hf_model_type
from flyer.interop.hf import load_hf
from flyer.interop.load import load_pretrained
from flyer.model.transformer import Transformer
from flyer.serve.engine import Engine, EngineConfig, SamplingOptions
from tests.bounds import FP32_U
from tests.hf_models import VOCAB, build
from tests.test_interop_export import TEXT, tensors

PROMPTS = ["the quick brown fox jumps over the lazy dog, hello world", "hello"]  # 2 lengths, one batch


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A tiny random Qwen3 directory (head_dim 24 != 64 / 4 heads, tied, random q_norm / k_norm) and
    transformers' model of it."""
    path = tmp_path_factory.mktemp("qwen3")
    build("qwen3", path)
    return path, AutoModelForCausalLM.from_pretrained(path).eval()


def logit_tolerance(cfg: ModelConfig, T: int) -> float:
    """``tests.test_rope_scaling.logit_tolerance`` with the head norms: each of the L layers sums
    dim, inter_dim, T and (the two head norms' mean squares) head_dim terms in two different orders,
    n u each; transformers' FP32 frequencies move an angle by up to T (ln theta + 8) u."""
    L = cfg.n_layers
    return (L * (cfg.dim + cfg.inter_dim + T + 2 * cfg.head_dim) + T * (math.log(cfg.rope_theta) + 8)) * FP32_U


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b).abs().max() / b.abs().max())


def test_logits_equal_transformers_and_need_the_head_norms_in_rope_order(src):
    """Within ``logit_tolerance`` of transformers, from the training path and from the decode cache
    (a prefill chunk, then a token at a time); the same weights with the head norms' channels left
    in the file's rotate-half order, or without the head norms, are far outside it."""
    path, ref = src
    model, cfg, _ = load_hf(path)
    assert (cfg.attn, cfg.qk_norm, cfg.head_dim, cfg.attn_bias, cfg.tie_embeddings) == ("gqa", True, 24, False, True)
    assert cfg.head_dim != cfg.dim // cfg.n_heads
    T = 64
    tokens = torch.randint(3, VOCAB, (2, T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(tokens).logits
        err, tol = rel(model(tokens), want), logit_tolerance(cfg, T)
        assert err <= tol, f"{err:.3g} > {tol:.3g}"
        dec = Decoder(model, 2, T, cache_dtype=torch.float32)
        cached = [dec.logits(dec.forward(tokens[:, :20], torch.zeros(2, dtype=torch.long)))]
        cached += [dec.logits(dec.forward(tokens[:, t:t + 1], torch.full((2,), t))) for t in range(20, T)]
        assert rel(torch.cat(cached, 1), want) <= tol
        unpermuted = Transformer(cfg).eval()
        unpermuted.load_state_dict(model.state_dict())
        for mine, theirs in zip(unpermuted.layers, ref.model.layers):
            mine.attn.q_head_norm.weight.copy_(theirs.self_attn.q_norm.weight)
            mine.attn.k_head_norm.weight.copy_(theirs.self_attn.k_norm.weight)
        assert rel(unpermuted(tokens), want) > 100 * tol
        plain = Transformer(cfg.replace(qk_norm=False)).eval()
        plain.load_state_dict({k: v for k, v in model.state_dict().items() if "head_norm" not in k})
        assert rel(plain(tokens), want) > 100 * tol


def _hf_greedy(ref, path, prompt: str, n: int) -> list[int]:
    ids = AutoTokenizer.from_pretrained(path)(prompt)["input_ids"]
    out = ref.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["one", "batch-of-two"])
def test_cli_greedy_tokens_equal_transformers(src, capsys, prompts):
    """``flyer generate`` (FP32 cache; two prompts of different lengths batched, each at its own
    positions) gives each prompt transformers' greedy tokens for it alone."""
    path, ref = src
    want = [_hf_greedy(ref, path, p, 16) for p in prompts]
    capsys.readouterr()
    argv = ["generate", "--ckpt", str(path), "--max-new-tokens", "16", "--cache-dtype", "fp32", "--eos-id", "-1",
            "--device", "cpu", "--json"]
    assert main(argv + [a for p in prompts for a in ("--prompt", p)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["token_ids"] == want and res["attention"] == "gqa" and res["cache_dtype"] == "fp32"


def test_serving_engine_greedy_equals_flyer_generate(src):
    """The engine's paged K/V (chunked prefill, prefix sharing, continuous batching) gives each
    request the greedy tokens ``generate`` gives the prompts as one batch, and transformers' alone."""
    path, ref = src
    model, cfg, tok = load_hf(path)
    prompts = [tok.encode_ids(p) for p in PROMPTS] + [tok.encode_ids(PROMPTS[0] + " over the lazy dog")]
    want = generate(model, prompts, GenerationConfig(max_new_tokens=10, cache_dtype=torch.float32,
                                                     eos_id=None)).tokens
    for p, w in zip(prompts, want):
        out = ref.generate(torch.tensor([p]), do_sample=False, max_new_tokens=10, eos_token_id=None, pad_token_id=0)
        assert out[0, len(p):].tolist() == w
    outs, eng = engine_greedy(model, prompts, 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 4)
    assert outs == want and eng.alloc.hits > 0  # the third prompt took the first one's blocks


def engine_greedy(model, prompts: list[list[int]], bytes_per_token: int, n: int = 10) -> tuple[list[list[int]], Engine]:
    """The serving engine's ``n`` greedy tokens for each of ``prompts`` (FP32 cache of 64 blocks of 4 positions,
    ``bytes_per_token`` each; prefill in chunks of 8, all submitted at once), and the engine (its prefix hits)."""
    eng = Engine(model, EngineConfig(kv_cache_bytes=64 * 4 * bytes_per_token, block_size=4, prefill_chunk=8,
                                     cache_dtype=torch.float32))
    outs: list[list[int]] = [[] for _ in prompts]
    for i, p in enumerate(prompts):
        eng.submit(p, SamplingOptions(max_tokens=n), lambda e, i=i: outs[i].append(e.token))
    eng.run_until_idle()
    return outs, eng


def check_round_trip(src, tmp_path, capsys, model_type: str, arch: type, written: dict, moved: tuple[str, ...] = (),
                     auto: bool = True) -> None:
    """``export_model`` of the import and ``flyer export`` of the directory (streamed) write the source's
    tensors (rope rows and head-norm channels permuted back; those named with a ``moved`` part excepted: rows the
    export lays out otherwise) and a config (with ``written``'s fields) transformers loads as ``arch`` (through
    ``AutoModelForCausalLM`` when ``auto``; Mistral 4 is not mapped there): the same logits, bit for bit; flyer
    reads the export as the same config."""
    path, ref = src
    model, cfg, tok = load_hf(path)
    assert hf_model_type(cfg) == model_type
    export_model(model, tok, tmp_path / "out", "fp32")
    capsys.readouterr()
    assert main(["export", str(path), "--out", str(tmp_path / "streamed"), "--dtype", "fp32"]) == 0
    assert json.loads(capsys.readouterr().out)["model_type"] == model_type
    a = tensors(path)
    x = torch.randint(3, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(x).logits
    for out in (tmp_path / "out", tmp_path / "streamed"):
        b = tensors(out)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if not any(m in k for m in moved))
        config = json.loads((out / "config.json").read_text())
        assert {k: config[k] for k in (*written, "model_type")} == {**written, "model_type": model_type}
        back = (AutoModelForCausalLM if auto else arch).from_pretrained(out).eval()
        assert isinstance(back, arch)
        with torch.no_grad():
            assert torch.equal(back(x).logits, want)
        assert load_hf(out)[1] == cfg


def train_init_then_export(src, tmp_path, capsys, model_type: str):
    """A step of ``flyer train --init DIR``, exported as ``model_type``: (the run's model, its config,
    transformers' model of the export)."""
    path, _ = src
    (tmp_path / "text.txt").write_text(TEXT)
    assert main(["train", "--init", str(path), "--steps", "1", "--batch-size", "2", "--seq-len", "16",
                 "--data", str(tmp_path / "text.txt"), "--data-cache", str(tmp_path / "cache"), "--out",
                 str(tmp_path / "run"), "--no-progress", "--no-plots", "--eval-every", "1", "--eval-batches", "1",
                 "--ckpt-every", "1", "--device", "cpu", "--precision", "fp32"]) == 0
    model, cfg, _ = load_pretrained(tmp_path / "run")
    capsys.readouterr()
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "out"), "--dtype", "fp32"]) == 0
    assert json.loads(capsys.readouterr().out)["model_type"] == model_type
    return model, cfg, AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()


def test_import_export_round_trip_loads_in_transformers(src, tmp_path, capsys):
    a = tensors(src[0])
    assert "model.layers.0.self_attn.q_norm.weight" in a and "lm_head.weight" not in a  # tied
    check_round_trip(src, tmp_path, capsys, "qwen3", Qwen3ForCausalLM,
                     {"architectures": ["Qwen3ForCausalLM"], "head_dim": 24, "attention_bias": False,
                      "tie_word_embeddings": True})


def test_train_init_from_qwen3_then_export(src, tmp_path, capsys):
    """The run's logits are the export's in transformers (within the tolerance); the norms learn too."""
    model, cfg, back = train_init_then_export(src, tmp_path, capsys, "qwen3")
    assert cfg.qk_norm and cfg.head_dim == 24
    before = load_hf(src[0])[0].layers[0].attn.q_head_norm.weight
    assert not torch.equal(model.layers[0].attn.q_head_norm.weight, before)
    x = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel(model(x), back(x).logits) <= logit_tolerance(cfg, 24)


def _config_error(tmp_path, capsys, d: dict, field: str) -> None:
    p = tmp_path / "config.json"
    p.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=f"field '{field}'"):
        ModelConfig.from_json(p)
    assert main(["info", "--config", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flyer: error: ") and f"'{field}'" in err and "\n" not in err


@pytest.mark.parametrize("change, sliding", [
    (dict(use_sliding_window=True, sliding_window=16, max_window_layers=1), (1, 2)),
    (dict(use_sliding_window=True, sliding_window=16), ()),  # max_window_layers 28 > 3 layers: none slides
    (dict(use_sliding_window=True, sliding_window=16, max_window_layers=3), ()),
    (dict(use_sliding_window=True, sliding_window=None, max_window_layers=0), ()),
    (dict(use_sliding_window=False, sliding_window=16, max_window_layers=0), ()),
    (dict(layer_types=["full_attention", "sliding_attention", "full_attention"], use_sliding_window=True,
          sliding_window=16), (1,)),
    (dict(layer_types=["full_attention"] * 3), ()),
], ids=["top-layers-slide", "window-layers-above", "max-window-layers-all", "no-window", "window-off",
        "layer-types-slide", "layer-types-full"])
def test_sliding_layers_are_read_as_transformers_slides_them(src, change, sliding):
    """A Qwen3 config slides exactly the layers transformers does (its ``layer_types``, from the file's or from
    use_sliding_window / sliding_window / max_window_layers), by its window; the rest of it is read as ever."""
    path, _ = src
    d = {k: v for k, v in json.loads((path / "config.json").read_text()).items() if k != "layer_types"}
    d.update(change)
    types = Qwen3Config.from_dict(d).layer_types
    assert tuple(i for i, t in enumerate(types) if t == "sliding_attention") == sliding
    want = load_hf(path)[1].replace(window_size=16 if sliding else 0, sliding_layers=sliding)
    assert ModelConfig.from_dict(d) == want


def test_what_flyer_cannot_run_is_one_line(src, tmp_path, capsys):
    """One line naming the field: layer types of the wrong length, or sliding ones without a window (transformers
    cannot build their mask); a bias (Qwen3's would go on o_proj too); head norms on MLA; head norms with Qwen2's
    q/k/v bias. Full-attention layer types beside a window transformers would apply from max_window_layers on
    without them: the types rule, no layer slides."""
    path, _ = src
    d = {k: v for k, v in json.loads((path / "config.json").read_text()).items() if k != "layer_types"}
    full = ["full_attention"] * 3
    for change, field in ((dict(layer_types=full[:2]), "layer_types"),
                          (dict(layer_types=full[:2] + ["sliding_attention"]), "layer_types"),
                          (dict(attention_bias=True), "attention_bias")):
        _config_error(tmp_path, capsys, {**d, **change}, field)
    listed = dict(layer_types=full, use_sliding_window=True, sliding_window=16, max_window_layers=1)
    assert ModelConfig.from_dict({**d, **listed}) == load_hf(path)[1]
    with pytest.raises(ConfigError) as e:
        preset("tiny", qk_norm=True)
    assert str(e.value).startswith("config field 'qk_norm': applies to gqa attention only") and "\n" not in str(e.value)
    (tmp_path / "mla.toml").write_text("qk_norm = true\n")
    assert main(["info", "tiny", "--config", str(tmp_path / "mla.toml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flyer: error: config field 'qk_norm'") and "\n" not in err
    gqa = preset("tiny", attn="gqa", n_kv_heads=2, head_dim=32, n_dense_layers=4, attn_bias=True, qk_norm=True)
    with pytest.raises(ConfigError, match="'qk_norm'/'attn_bias'"):
        hf_model_type(gqa)
    # without qk_norm a GQA model is what it was: no head-norm weights
    assert not any("head_norm" in k for k in Transformer(gqa.replace(qk_norm=False)).state_dict())


QWEN3_0_6B = {  # Qwen/Qwen3-0.6B config.json (transformers 4 spelling; head_dim 128 != 1024 / 16)
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 1024, "initializer_range": 0.02,
    "intermediate_size": 3072, "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3",
    "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False,
    "vocab_size": 151936}
QWEN3_8B = {**QWEN3_0_6B, "hidden_size": 4096, "intermediate_size": 12288, "max_window_layers": 36,
            "num_attention_heads": 32, "num_hidden_layers": 36, "tie_word_embeddings": False}


def info_json(tmp_path, capsys, d: dict) -> dict:
    """``flyer info --config --json`` of the config.json ``d``."""
    p = tmp_path / "config.json"
    p.write_text(json.dumps(d))
    capsys.readouterr()
    assert main(["info", "--config", str(p), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("d", [QWEN3_0_6B, QWEN3_8B], ids=["0.6B", "8B"])
def test_hub_configs_count_as_transformers_builds_them(tmp_path, capsys, d):
    """``flyer info --config`` of Qwen3's hub files: the parameters transformers' Qwen3ForCausalLM
    has (built on the meta device), head norms included; a file without head_dim takes Qwen3Config's
    default (128), not hidden_size / heads."""
    got = info_json(tmp_path, capsys, d)
    with torch.device("meta"):
        hf = Qwen3ForCausalLM(Qwen3Config.from_dict(d))
    assert got["total_params"] == sum(t.numel() for t in hf.parameters())
    assert got["kv_cache_bytes_per_token"] == d["num_hidden_layers"] * 2 * 8 * 128 * 2
    no_head_dim = {k: v for k, v in d.items() if k != "head_dim"}
    assert ModelConfig.from_dict(no_head_dim).head_dim == Qwen3Config.from_dict(no_head_dim).head_dim == 128
