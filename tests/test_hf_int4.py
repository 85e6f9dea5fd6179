"""Kimi K2 / K2-Thinking / K2.5 checkpoints as Moonshot releases them: a top-level ``model_type`` ``kimi_k2`` read as
DeepseekV3, and compressed-tensors' pack-quantized INT4 routed experts (W4A16, symmetric, groups of 32) decoded as
they load. The oracle is the compressed-tensors library itself (the ``test`` extra): it packs a tiny random
DeepseekV3 / Kimi K2.5 into a real pack-quantized directory; flyer's weights equal its decompression bit for bit,
flyer's logits and greedy tokens equal transformers' (which loads the directory through the library) within
``tests.test_hf_mistral4.logit_tolerance``; export writes the dequantized weights; one-line errors."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, Kimi_K25ForConditionalGeneration

from flyer.cli import main
from flyer.errors import CheckpointError
from flyer.infer.generate import GenerationConfig, generate
from flyer.interop.export import export
from flyer.interop.hf import load_hf
from flyer.interop.int4_pack import dequantize_int4, unpack_int4
from tests.hf_models import _COMMON, FAMILIES, VOCAB, make_tokenizer, trained_bias
from tests.test_config import DSV3_HF
from tests.test_hf_kimi_k25 import TextModel, build as build_k25
from tests.test_hf_mistral4 import logit_tolerance
from tests.test_qwen3 import _config_error, info_json, rel

pytest.importorskip("compressed_tensors")  # the oracle: pyproject's test extra
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme  # noqa: E402
from compressed_tensors.quantization.utils import calculate_qparams  # noqa: E402

GROUP = 32
SCHEME = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(num_bits=4, type="int", symmetric=True,
                                                                         strategy="group", group_size=GROUP))
# Kimi-K2-Thinking's quantization_config as published (Kimi-K2.5's ignores its vision tower and projector too)
KIMI_INT4 = {
    "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
    "kv_cache_scheme": None, "config_groups": {"group_0": {
        "targets": ["Linear"], "input_activations": None, "output_activations": None,
        "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": GROUP,
                    "dynamic": False, "actorder": None, "block_structure": None, "observer": "minmax",
                    "observer_kwargs": {}}}},
    "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", r"re:.*mlp\.(gate|up|gate_up|down)_proj.*"]}
EXPERT = re.compile(r".*\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight")
PARTS = ("weight_packed", "weight_scale", "weight_shape")


def pack_experts(path) -> dict[str, torch.Tensor]:
    """Rewrite ``path``'s model.safetensors with each routed expert's weight packed by compressed-tensors (its
    min-max scales, ``calculate_qparams``, in BF16 as Kimi's; its ``PackedQuantizationCompressor``); return the
    library's own decompression of each, by the weight's name."""
    w, out, want = load_file(str(path / "model.safetensors")), {}, {}
    for k, v in w.items():
        if not EXPERT.fullmatch(k):
            out[k] = v
            continue
        groups = v.float().unflatten(-1, (-1, GROUP))
        scale = calculate_qparams(groups.amin(-1), groups.amax(-1), SCHEME.weights)[0].to(torch.bfloat16)
        packed = PackedQuantizationCompressor.compress({"weight": v, "weight_scale": scale}, SCHEME)
        stem = k.removesuffix("weight")
        out.update({stem + n: t for n, t in packed.items()})
        want[k] = PackedQuantizationCompressor.decompress(packed, SCHEME)["weight"]
    save_file(out, str(path / "model.safetensors"), metadata={"format": "pt"})
    return want


def build_k2(path) -> dict[str, torch.Tensor]:
    """A tiny random BF16 DeepseekV3 saved as Kimi-K2-Thinking's hub files are: top-level model_type kimi_k2,
    experts INT4 (two groups per row of every expert weight), the rest BF16; returns ``pack_experts``'."""
    _, config_cls, kw = FAMILIES["v3"]
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(config_cls(**_COMMON, **{**kw, "moe_intermediate_size": 2 * GROUP}))
    trained_bias(model)
    model.to(torch.bfloat16).save_pretrained(path)
    make_tokenizer(path)
    want = pack_experts(path)
    d = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**d, "model_type": "kimi_k2", "quantization_config": KIMI_INT4}))
    return want


@pytest.fixture(scope="module")
def k2(tmp_path_factory):
    path = tmp_path_factory.mktemp("kimi-k2-int4")
    return path, build_k2(path)


def transformers_decompressed(path, cls=DeepseekV3ForCausalLM):
    """transformers' model of ``path`` in FP32 (it decompresses the INT4 experts through compressed-tensors, into
    the scales' BF16), its BF16 expert stacks as loaded, then those upcast (exact) so it computes in FP32. A kimi_k2
    directory is read through a view of it saying deepseek_v3: transformers has no kimi_k2 model type (the hub's
    runs remote code), and fuses DeepseekV3's per-expert tensors by the model type's name."""
    d = json.loads((path / "config.json").read_text())
    if d["model_type"] == "kimi_k2":
        view = path.parent / f"{path.name}-as-deepseek_v3"
        if not view.exists():
            view.mkdir()
            for f in path.iterdir():
                if f.name != "config.json":
                    (view / f.name).symlink_to(f)
            (view / "config.json").write_text(json.dumps({**d, "model_type": "deepseek_v3"}))
        path = view
    ref = cls.from_pretrained(path, dtype=torch.float32).eval()
    loaded = {n: p.detach().clone() for n, p in ref.named_parameters() if p.dtype != torch.float32}
    for p in ref.parameters():
        p.data = p.data.float()
    return ref, loaded


def assert_experts_equal(model, want: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Each routed expert weight of the flyer ``model`` equals ``want``'s (by its HF name), cast to ``dtype``."""
    for k, v in want.items():
        i, e, proj = re.fullmatch(r".*layers\.(\d+)\.mlp\.experts\.(\d+)\.(\w+)_proj\.weight", k).groups()
        w = getattr(model.layers[int(i)].ffn.experts, {"gate": "w1", "down": "w2", "up": "w3"}[proj])
        assert torch.equal(w[int(e)], v.to(dtype)), k


def test_unpack_is_the_librarys():
    """Every nibble value in every position of a word: ``unpack_int4`` is compressed-tensors' ``unpack_from_int32``
    (the signed code's offset of 8, the low nibble first), for column counts a multiple of 8 and not."""
    g = torch.Generator().manual_seed(0)
    for cols in (64, 29):
        q = torch.randint(-8, 8, (16, cols), generator=g, dtype=torch.int8)
        packed = pack_to_int32(q, 4)
        assert torch.equal(unpack_int4(packed, cols), q)
        assert torch.equal(unpack_from_int32(packed, 4, torch.Size((16, cols))), q)


def test_weights_equal_the_librarys_decompression(k2):
    """Loaded in the checkpoint's BF16 and in FP32, every routed expert equals compressed-tensors' decompression bit
    for bit (the product rounded to the scale's BF16 as the library rounds it), every unquantized tensor equals
    the file's, and transformers loads the same expert values."""
    path, want = k2
    files = load_file(str(path / "model.safetensors"))
    for dtype in (None, torch.float32):
        model, cfg, _ = load_hf(path, dtype=dtype)
        assert cfg.attn == "mla" and cfg.router_bias and model.embed.weight.dtype == (dtype or torch.bfloat16)
        assert_experts_equal(model, want, dtype or torch.bfloat16)
        assert torch.equal(model.layers[1].attn.wo.weight, files["model.layers.1.self_attn.o_proj.weight"].to(
            dtype or torch.bfloat16))
    _, loaded = transformers_decompressed(path)
    stack = loaded["model.layers.2.mlp.experts.down_proj"]
    assert stack.dtype == torch.bfloat16
    assert torch.equal(stack[5], want["model.layers.2.mlp.experts.5.down_proj.weight"])


def test_logits_and_tokens_equal_transformers(k2, capsys):
    """FP32: logits within ``logit_tolerance`` of transformers' on the same directory (decompressed by the library)
    and the same greedy tokens; ``flyer generate --ckpt`` runs it."""
    path, _ = k2
    model, cfg, _ = load_hf(path, dtype=torch.float32)
    ref, _ = transformers_decompressed(path)
    T = 32
    x = torch.randint(3, VOCAB, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel(model(x), ref(x).logits) <= logit_tolerance(cfg, T)
    prompt = x[0, :8].tolist()
    want = ref.generate(input_ids=torch.tensor([prompt]), do_sample=False, max_new_tokens=12, eos_token_id=None,
                        pad_token_id=0)[0, 8:].tolist()
    gen = GenerationConfig(max_new_tokens=12, temperature=0.0, cache_dtype=torch.float32, eos_id=None)
    assert generate(model, [prompt], gen).tokens[0] == want
    assert main(["generate", "--ckpt", str(path), "--prompt", "hello world", "--max-new-tokens", "4",
                 "--device", "cpu"]) == 0


def test_export_writes_the_dequantized_weights(k2, tmp_path):
    """``flyer export`` of an INT4 directory: a plain DeepseekV3 directory (no quantization_config) whose experts
    are the library's decompression, in BF16 exactly."""
    path, want = k2
    summary = export(path, tmp_path / "out", "bf16")
    d = json.loads((tmp_path / "out" / "config.json").read_text())
    assert summary["model_type"] == d["model_type"] == "deepseek_v3" and "quantization_config" not in d
    out = {}
    for f in (tmp_path / "out").glob("*.safetensors"):
        out.update(load_file(str(f)))
    assert not any(k.endswith(PARTS) for k in out)
    for k, v in want.items():
        assert torch.equal(out[k], v), k


def test_kimi_k25_int4_on_the_wrapper_or_its_text_config(tmp_path):
    """Kimi K2.5: the wrapper's text model with INT4 experts under ``language_model.``; its quantization_config
    read from the text config (as the hub's) or the wrapper (as transformers reads it); the experts equal the
    library's decompression, the logits transformers' Kimi_K25ForConditionalGeneration's on text ids."""
    build_k25(tmp_path, "published")
    want = pack_experts(tmp_path)
    assert want and all(k.startswith("language_model.") for k in want)
    d = json.loads((tmp_path / "config.json").read_text())
    quant = {**KIMI_INT4, "ignore": KIMI_INT4["ignore"] + ["re:.*vision_tower.*", "re:.*mm_projector.*"]}
    (tmp_path / "config.json").write_text(json.dumps({**d, "quantization_config": quant}))
    ref, _ = transformers_decompressed(tmp_path, Kimi_K25ForConditionalGeneration)
    model, cfg, _ = load_hf(tmp_path, dtype=torch.float32)
    x = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel(model(x), TextModel(ref)(x).logits) <= logit_tolerance(cfg, 24)
    (tmp_path / "config.json").write_text(json.dumps({**d, "text_config": {**d["text_config"],
                                                                           "quantization_config": quant}}))
    assert_experts_equal(load_hf(tmp_path)[0], want, torch.float32)  # build_k25's model is FP32


# Kimi-K2-Thinking's config.json shapes: DeepSeek-V3's with 384 experts, 64 heads, one dense layer, no MTP layer
KIMI_K2_HUB = {**DSV3_HF, "model_type": "kimi_k2", "vocab_size": 163840, "num_attention_heads": 64,
               "num_key_value_heads": 64, "n_routed_experts": 384, "n_group": 1, "topk_group": 1,
               "first_k_dense_replace": 1, "num_nextn_predict_layers": 0, "routed_scaling_factor": 2.827,
               "rope_theta": 50000.0, "max_position_embeddings": 262144,
               "rope_scaling": {**DSV3_HF["rope_scaling"], "factor": 64.0, "beta_fast": 1.0, "beta_slow": 1.0},
               "quantization_config": KIMI_INT4}


def test_info_counts_kimi_k2_as_deepseek_v3(tmp_path, capsys):
    """``flyer info --config`` of Kimi-K2-Thinking's config: the parameters transformers' DeepseekV3ForCausalLM has
    for a DeepseekV3Config of the same fields (meta device), INT4 experts counted as the weights they decode to."""
    got = info_json(tmp_path, capsys, KIMI_K2_HUB)
    fields = {k: v for k, v in KIMI_K2_HUB.items() if k not in ("model_type", "quantization_config")}
    with torch.device("meta"):
        hf = DeepseekV3ForCausalLM(DeepseekV3Config(**fields))
    assert got["total_params"] == sum(p.numel() for p in hf.parameters()) > 1.0e12


def _weights(**change) -> dict:
    return {**KIMI_K2_HUB, "quantization_config": {**KIMI_INT4, "config_groups": {"group_0": {
        **KIMI_INT4["config_groups"]["group_0"], "weights": {**KIMI_INT4["config_groups"]["group_0"]["weights"],
                                                               **change}}}}}


_W = "quantization_config.config_groups.group_0.weights"


@pytest.mark.parametrize("d, field", [
    (_weights(num_bits=16), f"{_W}.num_bits"), (_weights(strategy="tensor"), f"{_W}.strategy"),
    (_weights(symmetric="no"), f"{_W}.symmetric"), (_weights(type="float"), f"{_W}.type"),
    (_weights(actorder="random"), f"{_W}.actorder"), (_weights(group_size=0), f"{_W}.group_size"),
    ({**KIMI_K2_HUB, "quantization_config": {**KIMI_INT4, "format": "float-quantized"}}, "quantization_config.format"),
    ({**KIMI_K2_HUB, "quantization_config": {**KIMI_INT4, "quant_method": "gptq"}}, "quantization_config.quant_method"),
    ({**KIMI_K2_HUB, "quantization_config": {**KIMI_INT4, "config_groups": {"group_0": {
        **KIMI_INT4["config_groups"]["group_0"], "input_activations": {"num_bits": 8}}}}},
     "quantization_config.config_groups.group_0.input_activations"),
    ({"model_type": "kimi_k25", "text_config": _weights(num_bits=0)}, f"{_W}.num_bits"),
], ids=["bits", "strategy", "asymmetric", "float", "actorder", "group_size", "format", "method", "activations",
        "wrapped"])
def test_what_flyer_cannot_decode_is_one_line(tmp_path, capsys, d, field):
    """A quantization flyer cannot decode: exit 2, one line naming the field (on the config or a wrapper's text
    config)."""
    _config_error(tmp_path, capsys, d, field)


def test_packed_weights_the_config_ignores_are_refused(k2, tmp_path, capsys):
    """A packed tensor of a module the config's ``ignore`` lists (stored unquantized, by the config) is a one-line
    ``CheckpointError`` naming it, before a byte is read; so is a scale off the config's group size."""
    path, _ = k2
    for f in path.iterdir():
        (tmp_path / f.name).symlink_to(f)
    (tmp_path / "config.json").unlink()
    d = json.loads((path / "config.json").read_text())
    for quant, problem in (({**KIMI_INT4, "ignore": KIMI_INT4["ignore"] + [r"re:.*experts\.3\.up_proj$"]},
                            r"experts\.3\.up_proj\.weight_packed is quantized, but .* ignore"),
                           (_weights(group_size=16)["quantization_config"], "groups of 16 columns")):
        (tmp_path / "config.json").write_text(json.dumps({**d, "quantization_config": quant}))
        with pytest.raises(CheckpointError, match=problem):
            load_hf(tmp_path)
        capsys.readouterr()
        assert main(["generate", "--ckpt", str(tmp_path), "--prompt", "hi", "--device", "cpu"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("flyer: error: ") and "\n" not in err


def test_dequantize_checks_its_inputs():
    """A weight_shape, scale or packed tensor inconsistent with the others is a ValueError naming the weight."""
    q = torch.randint(-8, 8, (4, 64), dtype=torch.int8)
    packed, scale, shape = pack_to_int32(q, 4), torch.ones(4, 2, dtype=torch.bfloat16), torch.tensor([4, 64])
    assert torch.equal(dequantize_int4(packed, scale, shape), q.float())
    for args in ((packed, scale, torch.tensor([4, 72])), (packed, torch.ones(4, 3), shape),
                 (packed, torch.ones(4, 2, dtype=torch.int32), shape), (packed.long(), scale, shape)):
        with pytest.raises(ValueError, match="w.up"):
            dequantize_int4(*args, name="w.up")


def test_parts_in_other_shards_and_int32_shapes(k2, tmp_path):
    """Sharded as the hub's files are (a weight's packed codes, scale and shape may sit in different shards; Kimi's
    weight_shape is int32, the library's int64): the same weights."""
    path, want = k2
    tensors = load_file(str(path / "model.safetensors"))
    shards: list[dict] = [{}, {}, {}]
    for i, (k, v) in enumerate(sorted(tensors.items())):  # neighbours (a weight's parts) land in different shards
        shards[i % 3][k] = v.int() if k.endswith("weight_shape") else v
    names = [f"model-0000{i + 1}-of-00003.safetensors" for i in range(3)]
    for name, shard in zip(names, shards):
        save_file(shard, str(tmp_path / name), metadata={"format": "pt"})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: name for name, shard in zip(names, shards) for k in shard}}))
    for f in ("config.json", "tokenizer.json"):
        (tmp_path / f).write_bytes((path / f).read_bytes())
    stem = "model.layers.1.mlp.experts.6.up_proj."
    assert len({i for i, s in enumerate(shards) for n in PARTS if stem + n in s}) == 3
    assert_experts_equal(load_hf(tmp_path)[0], want, torch.bfloat16)


@pytest.mark.parametrize("family", ["llama", "qwen3", "qwen3_moe", "glm4_moe"])
def test_every_linear_of_other_architectures(tmp_path, family):
    """W4A16 as community checkpoints of other families quantize them (every Linear but the head, attention
    included: rotate-half q / k rows, GQA, dense and expert MLPs; groups of 32): flyer's model equals, tensor for
    tensor, its model of the same directory holding the library's decompression of each weight in BF16."""
    cls, config_cls, kw = FAMILIES[family]
    torch.manual_seed(0)
    src, plain = tmp_path / "int4", tmp_path / "plain"
    cls(config_cls(**_COMMON, **kw)).to(torch.bfloat16).save_pretrained(src)
    make_tokenizer(src)
    config = json.loads((src / "config.json").read_text())
    weights, packed = load_file(str(src / "model.safetensors")), {}
    decompressed = dict(weights)
    for k, v in weights.items():
        if k.endswith("proj.weight") and v.dim() == 2:
            groups = v.float().unflatten(-1, (-1, GROUP))
            scale = calculate_qparams(groups.amin(-1), groups.amax(-1), SCHEME.weights)[0].to(torch.bfloat16)
            parts = PackedQuantizationCompressor.compress({"weight": v, "weight_scale": scale}, SCHEME)
            packed.update({k.removesuffix("weight") + n: t for n, t in parts.items()})
            decompressed[k] = PackedQuantizationCompressor.decompress(parts, SCHEME)["weight"].to(torch.bfloat16)
        else:
            packed[k] = v
    assert any("self_attn.q_proj.weight_packed" in k for k in packed)
    plain.mkdir()
    (plain / "tokenizer.json").write_bytes((src / "tokenizer.json").read_bytes())
    for out, tensors, extra in ((src, packed, {"quantization_config": {**KIMI_INT4, "ignore": ["lm_head"]}}),
                                (plain, decompressed, {})):
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        (out / "config.json").write_text(json.dumps({**config, **extra}))
    got, want = load_hf(src)[0].state_dict(), load_hf(plain)[0].state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
