"""compressed-tensors checkpoints whose ``config_groups`` quantize different modules differently (W8A16 attention
beside W4A16 experts, say), each module in the scheme of the group its ``targets`` pick
(``hf_config_quant.CompressedConfig.scheme_of``). The oracle is the compressed-tensors library: its
``apply_quantization_config`` picks each module's scheme (on a tree of the checkpoint's modules, linears as
``nn.Linear``, DeepSeek's router as the plain module it is), ``tests.test_hf_compressed.compress`` stores it; flyer's
weights equal its decompression bit for bit, and its logits those of transformers' model of the directory
(compressed-tensors' own route: the library's targets, decompressed) within ``logit_tolerance``."""

import copy
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from flyer.errors import CheckpointError
from flyer.interop.hf import load_hf
from flyer.interop.hf_config_quant import EMBEDDING, LINEAR, compressed_scheme
from tests.hf_models import _COMMON, FAMILIES, plain_twin, save_bf16
from tests.test_hf_compressed import assert_logits_match, GROUP, NAIVE, PACK, _scheme, compress
from tests.test_qwen3 import _config_error

pytest.importorskip("compressed_tensors")  # the oracle: pyproject's test extra
from compressed_tensors.quantization import (QuantizationConfig, QuantizationScheme,  # noqa: E402
                                             apply_quantization_config)
from pydantic import ValidationError  # noqa: E402


def group(targets: list[str], fmt: str, bits: int, symmetric: bool, strategy: str) -> dict:
    """One of ``config_groups`` as llm-compressor writes it: weight-only, its own ``format``."""
    return {"targets": targets, "weights": {
        "num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": strategy,
        "group_size": GROUP if strategy == "group" else None, "dynamic": False, "actorder": None,
        "observer": "minmax"}, "input_activations": None, "output_activations": None, "format": fmt}


def quant_config(groups: dict, ignore: list[str]) -> dict:
    return {"quant_method": "compressed-tensors", "format": "mixed-precision", "quantization_status": "compressed",
            "kv_cache_scheme": None, "config_groups": groups, "ignore": ignore}


# transformers' own route through the library decompresses packed weights only without zero points, and its fused
# experts only pack-quantized symmetric ones: asymmetric groups are int8-stored there
LLAMA = quant_config({
    "group_0": group(["Linear"], PACK, 4, True, "group"),
    "group_1": group([r"re:.*self_attn\..*"], NAIVE, 8, False, "channel"),
    # an exact name before any regex or class; a regex before a class
    "group_2": group(["model.layers.1.mlp.down_proj", r"re:.*layers\.2\.mlp\..*"], NAIVE, 4, False, "group")},
    ["lm_head"])
QWEN3_MOE = quant_config({
    "group_0": group([r"re:.*mlp\.experts\..*"], PACK, 4, True, "group"),
    "group_1": group(["Linear"], NAIVE, 8, False, "channel"),
    "group_2": group(["model.layers.0.mlp.down_proj", r"re:.*self_attn\.o_proj$"], NAIVE, 4, False, "group")},
    ["lm_head", r"re:.*mlp\.gate$"])
# DeepSeek's router is no Linear: "re:.*mlp\..*" leaves it BF16, as the library does. Of two regexes the first in
# text order wins, not in the config's ("re:.*mlp" before "re:.*shared": group_2 takes the shared experts); a
# target two groups list is the last one's (group_2 takes layer 1's o_proj)
V3 = quant_config({
    "group_0": group([r"re:.*shared_experts\..*", "model.layers.0.mlp.up_proj", "model.layers.1.self_attn.o_proj"],
                     PACK, 3, False, "channel"),
    "group_1": group([r"re:.*self_attn\..*"], NAIVE, 8, True, "channel"),
    "group_2": group([r"re:.*mlp\..*", "model.layers.1.self_attn.o_proj"], PACK, 4, False, "group")},
    ["lm_head"])


def module_tree(state: dict[str, torch.Tensor], family: str) -> nn.Module:
    """The checkpoint's 2-D weights as the modules the library quantized: ``nn.Embedding`` for ``embed_tokens``,
    DeepSeek's router a plain module (transformers' ``DeepseekV3TopkRouter``), every other an ``nn.Linear``."""
    root = nn.Module()
    for k, v in state.items():
        if not k.endswith(".weight") or v.dim() != 2:
            continue
        *path, leaf = k.removesuffix(".weight").split(".")
        parent = root
        for p in path:
            if not hasattr(parent, p):
                parent.add_module(p, nn.Module())
            parent = getattr(parent, p)
        if leaf == "embed_tokens":
            module = nn.Embedding(*v.shape)
        elif leaf == "gate" and family == "v3":
            module = nn.Module()
            module.weight = nn.Parameter(v)
        else:
            module = nn.Linear(v.shape[1], v.shape[0], bias=False)
        parent.add_module(leaf, module)
    return root


def library_groups(tree: nn.Module, q: dict) -> dict[str, str]:
    """{module: group name} as the library's ``apply_quantization_config`` quantizes ``tree`` under ``q``."""
    config = QuantizationConfig.model_validate({**q, "quantization_status": "initialized"})
    apply_quantization_config(tree, config)
    return {name: next(g for g, s in config.config_groups.items() if s == m.quantization_scheme)
            for name, m in tree.named_modules() if getattr(m, "quantization_scheme", None) is not None}


def build(path, family: str, q: dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A tiny random BF16 model of ``family`` saved with each module the library quantizes under ``q`` compressed in
    its group's scheme; returns (the library's decompression by weight name, each module's group)."""
    state = save_bf16(family, path)
    groups = library_groups(module_tree(state, family), q)
    g = torch.Generator().manual_seed(1)
    out, want = {}, {}
    for k, v in state.items():
        stem = k.removesuffix(".weight")
        if stem not in groups or not k.endswith(".weight"):
            out[k] = v
            continue
        w = q["config_groups"][groups[stem]]["weights"]
        parts, want[k] = compress(v, q["config_groups"][groups[stem]]["format"], w["num_bits"], w["symmetric"],
                                  w["strategy"], None, g)
        out.update({f"{stem}.{n}": t for n, t in parts.items()})
    save_file(out, str(path / "model.safetensors"), metadata={"format": "pt"})
    d = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**d, "quantization_config": q}))
    return want, groups


def test_each_module_is_in_the_group_the_library_picks():
    """Exact names, regexes and class names of several groups, a target two groups list, ``ignore`` by name,
    regex or class: flyer's group of each linear and embedding is the one ``apply_quantization_config`` gives it;
    a router (no linear) the library leaves alone."""
    names = ["model.embed_tokens", "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj",
             "model.layers.0.mlp.gate", "model.layers.0.mlp.experts.0.up_proj",
             "model.layers.0.mlp.experts.0.down_proj", "model.layers.0.mlp.shared_experts.up_proj",
             "model.layers.1.mlp.down_proj", "lm_head"]
    q = quant_config({
        "group_0": group(["Linear", "re:.*mlp.*"], PACK, 4, True, "group"),
        "group_1": group(["re:.*self_attn.*", "Embedding", "model.layers.0.mlp.experts.0.down_proj"], PACK, 8, True,
                         "channel"),
        "group_2": group(["re:.*experts.*", "model.layers.0.mlp.experts.0.down_proj"], NAIVE, 4, False, "group")},
        ["lm_head", "re:.*q_proj$"])
    tree = module_tree({n + ".weight": torch.zeros(4, GROUP) for n in names}, "v3")
    want = library_groups(tree, q)
    config = compressed_scheme({"quantization_config": q})
    got = {}
    for name, m in tree.named_modules():
        classes = EMBEDDING if isinstance(m, nn.Embedding) else LINEAR if isinstance(m, nn.Linear) else None
        if classes is not None and (found := config.scheme_of(name, classes)) is not None:
            got[name] = found[0]
    assert got == want == {"model.embed_tokens": "group_1", "model.layers.0.self_attn.o_proj": "group_1",
                           "model.layers.0.mlp.experts.0.up_proj": "group_2",
                           "model.layers.0.mlp.experts.0.down_proj": "group_2",
                           "model.layers.0.mlp.shared_experts.up_proj": "group_2",
                           "model.layers.1.mlp.down_proj": "group_0"}
    assert config.scheme_of("model.layers.0.mlp.gate", ("Module",))[0] == "group_0"  # by name; the library: no linear
    q["ignore"] = ["lm_head", "Embedding"]  # a class name ignores its modules
    want = library_groups(module_tree({n + ".weight": torch.zeros(4, GROUP) for n in names}, "v3"), q)
    config = compressed_scheme({"quantization_config": q})
    assert "model.embed_tokens" not in want and config.scheme_of("model.embed_tokens", EMBEDDING) is None
    assert want["model.layers.0.self_attn.q_proj"] == config.scheme_of("model.layers.0.self_attn.q_proj")[0]


@pytest.mark.parametrize("family, q", [("v3", V3), ("qwen3_moe", QWEN3_MOE)], ids=["v3", "qwen3_moe"])
def test_weights_equal_the_librarys_decompression(tmp_path, family, q):
    """Every module in its group's scheme (formats, bits, zero points, strategies differing): flyer's model of the
    directory equals, tensor for tensor, its model of a plain directory holding the library's weights."""
    want, groups = build(tmp_path / "q", family, q)
    assert len(set(groups.values())) == 3
    plain_twin(tmp_path / "q", want, tmp_path / "plain")
    got, ref = load_hf(tmp_path / "q")[0].state_dict(), load_hf(tmp_path / "plain")[0].state_dict()
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in got)


def transformers_decompressed(path, cls) -> nn.Module:
    """transformers' model of ``path`` through compressed-tensors' own route (each module's scheme by the library's
    targets, decompressed), as a plain FP32 model (the upcast exact)."""
    ref = cls.from_pretrained(path)  # dequantize off: the library's apply_quantization_config, then decompressed
    ref.hf_quantizer.compressor.decompress_model(ref)
    config = copy.deepcopy(ref.config)
    del config.quantization_config
    plain = cls(config).eval()
    plain.load_state_dict({k: v for k, v in ref.state_dict().items() if "weight_" not in k})
    return plain.float()


@pytest.mark.parametrize("family, q", [("llama", LLAMA), ("qwen3_moe", QWEN3_MOE)], ids=["llama", "qwen3_moe"])
def test_logits_equal_transformers(tmp_path, family, q):
    """FP32 logits within ``logit_tolerance`` of transformers' model of the same directory; its weights are the
    library's decompression (``build``'s), the routed experts in transformers' fused stacks."""
    want, _ = build(tmp_path, family, q)
    model, cfg, _ = load_hf(tmp_path, dtype=torch.float32)
    ref = transformers_decompressed(tmp_path, FAMILIES[family][0])
    state = ref.state_dict()
    for k, v in want.items():
        if m := re.fullmatch(r"(.*\.experts)\.(\d+)\.(gate|up|down)_proj\.weight", k):  # (E, 2F, D): gate, up
            got = state[f"{m[1]}.down_proj"][int(m[2])] if m[3] == "down" else \
                state[f"{m[1]}.gate_up_proj"][int(m[2])].chunk(2)[m[3] == "up"]
        else:
            got = state[k]
        assert torch.equal(got, v.float()), k
    assert_logits_match(model, ref, cfg)


def _rewrite(path, change=None, groups=None, ignore=None) -> None:
    """``path``'s tensors changed by ``change`` (a function of the dict) and its quantization_config's groups or
    ignore replaced."""
    if change is not None:
        tensors = load_file(str(path / "model.safetensors"))
        change(tensors)
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    d = json.loads((path / "config.json").read_text())
    q = d["quantization_config"]
    q.update({"config_groups": groups or q["config_groups"], "ignore": q["ignore"] if ignore is None else ignore})
    (path / "config.json").write_text(json.dumps(d))


_DOWN = "model.layers.1.mlp.down_proj"


def _plain_down(tensors: dict) -> None:
    for part in ("weight", "weight_scale", "weight_zero_point"):
        tensors.pop(f"{_DOWN}.{part}")
    tensors[f"{_DOWN}.weight"] = torch.zeros(_COMMON["hidden_size"], _COMMON["intermediate_size"],
                                             dtype=torch.bfloat16)


@pytest.mark.parametrize("edit, problem", [
    (dict(groups={"group_0": group([r"re:.*mlp\..*"], PACK, 4, True, "group"),
                  "group_2": LLAMA["config_groups"]["group_2"]}),
     r"tensor model\.layers\.0\.self_attn\.\w+\.weight is quantized, but no group of .* targets"),
    (dict(ignore=["lm_head", _DOWN]), rf"tensor {_DOWN}\.weight is quantized, but .*ignore lists"),
    (dict(groups={**LLAMA["config_groups"], "group_1": group([r"re:.*self_attn\..*"], PACK, 8, False, "channel")}),
     r"self_attn\.\w+\.weight is not stored in the format of config_groups\.group_1 \(pack-quantized\)"),
    (dict(change=_plain_down), rf"tensor {_DOWN}\.weight is not quantized, but .*config_groups\.group_2 targets"),
], ids=["no-group", "ignored", "format", "plain-but-targeted"])
def test_a_module_off_its_group_is_one_line(tmp_path, edit, problem):
    """A quantized module no group targets or ``ignore`` lists, one stored in another format than its group's, or
    a weight stored plain that a group names: a ``CheckpointError`` naming the tensor, from the headers."""
    build(tmp_path, "llama", LLAMA)
    _rewrite(tmp_path, **edit)
    with pytest.raises(CheckpointError, match=problem):
        load_hf(tmp_path)


_G = "quantization_config.config_groups.group_0"


@pytest.mark.parametrize("change, field, refused", [
    (lambda g: g.update(target=g.pop("targets")), f"{_G}.target", True),
    (lambda g: g.update(quantize_lm_head=True), f"{_G}.quantize_lm_head", True),
    (lambda g: g.pop("targets"), f"{_G}.targets", True),
    (lambda g: g.update(targets="Linear"), f"{_G}.targets", True),
    (lambda g: g.update(targets=["re:(experts"]), f"{_G}.targets", False),  # the library: re.error as it matches
], ids=["typo", "unknown", "no-targets", "targets-string", "targets-regex"])
def test_a_group_the_library_refuses_is_one_line(tmp_path, capsys, change, field, refused):
    """A group with a key ``QuantizationScheme`` does not have (a misspelt ``targets`` would quantize nothing),
    without a list of targets, or with a target no regular expression: flyer exits 2 with one line naming the field;
    the library refuses the group as it reads it."""
    d = _scheme()
    g = d["quantization_config"]["config_groups"]["group_0"]
    change(g)
    if refused:
        with pytest.raises(ValidationError):
            QuantizationScheme.model_validate(g)
    _config_error(tmp_path, capsys, d, field)
