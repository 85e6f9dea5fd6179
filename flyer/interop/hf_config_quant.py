"""A Hugging Face config's ``quantization_config``: the formats flyer decodes, the rest refused naming the field
(no torch: ``flyer.interop.hf_config`` uses it).

* ``quant_method`` "fp8": DeepSeek's E4M3 weights with 128x128 ``weight_scale_inv`` blocks (``flyer.interop.hf``).
* ``quant_method`` "compressed-tensors" with weight-only integer quantization, as llm-compressor's GPTQ / AWQ / RTN
  recipes write it and as Moonshot released Kimi-K2-Thinking and K2.5 (``kimi_int4_config``: pack-quantized,
  4-bit, symmetric, groups of 32, the routed experts only). Decoded by ``flyer.interop.compressed``:
  ``format`` "pack-quantized" (codes packed in int32) or "naive-quantized" / "int-quantized" (codes stored as
  int8); ``weights`` of ``num_bits`` 1-8, ``type`` "int", ``symmetric`` true or false (a ``weight_zero_point``),
  ``strategy`` "group" (``group_size`` columns a scale) or "channel" (one scale per output row), ``actorder``
  null / "weight" (the stored format unchanged) or "group" (a ``weight_g_idx``: column j in group g_idx[j]; the
  library removed it in 0.20 and refuses to read it, vLLM and older releases still do). Each of ``config_groups``
  may quantize its ``targets`` its own way (W8A16 attention and W4A16 experts, say; a group's own ``format``
  overriding the config's, which is then "mixed-precision"): ``CompressedConfig.scheme_of`` resolves a module.
  Fields mean what compressed-tensors (0.20) reads them as: ``QuantizationArgs`` defaults num_bits 8, type int,
  symmetric true, strategy "group" when group_size > 0 and "channel" when it is -1 (else "tensor");
  ``QuantizationScheme`` has no other keys than ``SCHEME_KEYS``. Targets and ``ignore`` entries match as its
  ``utils.match`` does: "re:<regex>" ``re.match``-es the module name, any other equals the name or one of the
  module's class names (``LINEAR``, ``EMBEDDING``).
* NVFP4 weights (``flyer.interop.nvfp4``): compressed-tensors' ``format`` "nvfp4-pack-quantized" (llm-compressor's
  NVFP4 / NVFP4A16 schemes: ``NVFP4_ARGS``), a group of its own beside integer ones if need be; and ``quant_method``
  "modelopt" with ``quant_algo`` "NVFP4" (NVIDIA's DeepSeek-R1 / V3 / Kimi-K2 FP4 releases; ``ModelOptConfig``, also
  read from hf_quant_config.json). NVFP4's W4A4 (its activations' FP4 arguments) runs as W4A16. MXFP4 likewise:
  compressed-tensors' "mxfp4-pack-quantized" (``MXFP4_ARGS``: a UE8M0 scale per 32 columns, DeepSeek-V4's FP4).
* FP8 E4M3 weights (``flyer.interop.fp8_scaled``): compressed-tensors' ``format`` "float-quantized" (or, activations
  unquantized, "naive-quantized") with ``weights`` of ``type`` "float", 8 bits, symmetric, ``strategy`` "tensor",
  "channel" or "block" (``block_structure`` [rows, columns]): llm-compressor's FP8 / FP8_DYNAMIC / FP8_BLOCK; and
  ModelOpt's ``quant_algo`` "FP8" (one FP32 scale per tensor). Their FP8 activations (W8A8) run as W8A16.

Anything else (other float types, token / group strategies of FP8 weights, dynamic weights, other activation or any
KV cache quantization, sparsity or transforms, other formats) is a ``ConfigError`` naming the field.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Any

from flyer.errors import ConfigError

PACK_QUANTIZED = "pack-quantized"
FLOAT_QUANTIZED = "float-quantized"
# codes stored one a byte in <stem>.weight (int8, or float8_e4m3fn for FP8 weights): one layout, three names (the
# library decompresses them all with its NaiveQuantizationCompressor)
INT8_FORMATS = ("naive-quantized", "int-quantized", FLOAT_QUANTIZED)
NVFP4 = "nvfp4-pack-quantized"  # E2M1 codes two a byte, FP8 scales per 16 columns, a global one (flyer.interop.nvfp4)
MXFP4 = "mxfp4-pack-quantized"  # E2M1 codes two a byte, a UE8M0 (power-of-two) scale per 32 columns (v4_quant's)
FORMATS = (PACK_QUANTIZED, *INT8_FORMATS, NVFP4, MXFP4)
# the formats of FP8 weights: "float-quantized" (W8A8's), "naive-quantized" (the library's for weight-only FP8)
FP8_FORMATS = (FLOAT_QUANTIZED, "naive-quantized")
FP8_STRATEGIES = ("tensor", "channel", "block")  # FP8 weights' scales flyer reads (flyer.interop.fp8_scaled)
PACKED_FORMATS = (PACK_QUANTIZED, NVFP4, MXFP4)  # codes in <stem>.weight_packed
# the only NVFP4 quantization arguments there are (compressed-tensors' NVFP4 / NVFP4A16 presets), weights' and,
# W4A4, the activations'
NVFP4_GROUP = 16  # input columns a row per FP8 block scale, in both NVFP4 layouts
NVFP4_ARGS = {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": NVFP4_GROUP,
              "symmetric": True}
MXFP4_ARGS = {"num_bits": 4, "type": "float", "strategy": "group", "group_size": 32, "symmetric": True}
# each FP4 format's quantization arguments and its weights' scale dtype (compressed-tensors' presets)
FP4_FORMATS = {NVFP4: (NVFP4_ARGS, "torch.float8_e4m3fn"), MXFP4: (MXFP4_ARGS, "torch.uint8")}
# QuantizationScheme's fields: the library refuses a group with any other key (pydantic's extra="forbid")
SCHEME_KEYS = ("targets", "weights", "input_activations", "output_activations", "format")
# the class names (torch's MRO below nn.Module) a target like "Linear" matches: the library quantizes only linears
# and embeddings (apply_quantization_config)
LINEAR, EMBEDDING = ("Linear", "Module"), ("Embedding", "Module")


@dataclass(frozen=True)
class CompressedScheme:
    """compressed-tensors' weight scheme as flyer reads it (``flyer.interop.compressed``): ``format`` one of
    ``FORMATS``; ``num_bits``-bit signed codes; ``group_size`` consecutive input columns a scale (None: strategy
    "channel", one scale per row); a zero point per scale unless ``symmetric``; ``g_idx``: actorder "group", each
    column's group stored in ``weight_g_idx``. ``fp8``: FP8 E4M3 codes (type "float"), one scale per ``fp8``
    (rows, columns) block of the weight: (1, 0) a row, (0, 0) the tensor (0: the whole dimension), else strategy
    "block"'s ``block_structure``; None for integer codes."""

    group_size: int | None
    num_bits: int = 4
    symmetric: bool = True
    g_idx: bool = False
    format: str = PACK_QUANTIZED
    fp8: tuple[int, int] | None = None


def _matches(target: str, module: str, classes: tuple[str, ...]) -> bool:
    """compressed-tensors' ``is_match`` of one target: "re:" ``re.match``-es the name, else the name or a class."""
    return re.match(target[3:], module) is not None if target.startswith("re:") else \
        target == module or target in classes


@dataclass(frozen=True)
class CompressedConfig:
    """A compressed-tensors ``quantization_config``: ``groups`` (name, targets, scheme) in ``config_groups``' order;
    modules ``ignore`` matches are stored unquantized."""

    groups: tuple[tuple[str, tuple[str, ...], CompressedScheme], ...]
    ignore: tuple[str, ...] = ()

    def ignores(self, module: str, classes: tuple[str, ...] = LINEAR) -> bool:
        """Whether ``ignore`` matches the module named ``module`` (a tensor's name without ``.weight``) of
        ``classes``."""
        return any(_matches(p, module, classes) for p in self.ignore)

    def scheme_of(self, module: str, classes: tuple[str, ...] = LINEAR) -> tuple[str, CompressedScheme] | None:
        """(group name, scheme) quantizing the module ``module`` of ``classes``; None when no group targets it or
        ``ignore`` matches it. Which group wins as compressed-tensors 0.20's ``apply_quantization_config`` picks it:
        a target listed by several groups is the last one's (an ordered dict of target -> scheme), and of the
        targets matching the module (``match_targets``) the first, sorted as (an exact name, then regexes, then
        class names; each kind by its text, ``sorted(key=("re:" in t, t))``)."""
        if self.ignores(module, classes):
            return None
        owner = {t: (name, scheme) for name, targets, scheme in self.groups for t in targets}
        ordered = sorted(owner, key=lambda t: ("re:" in t, t))
        named = [t for t in ordered if _matches(t, module, ())]
        hit = named or [t for t in ordered if t in classes]
        return owner[hit[0]] if hit else None

    @property
    def formats(self) -> set[str]:
        """The groups' storage formats."""
        return {scheme.format for _, _, scheme in self.groups}


MODELOPT_ALGOS = ("NVFP4", "FP8")  # quant_algo values flyer reads (FP8: per-tensor scales, ModelOpt's "FP8")


@dataclass(frozen=True)
class ModelOptConfig:
    """A ModelOpt checkpoint (``quant_method`` "modelopt", ``flyer.interop.modelopt``): ``algo`` one of
    ``MODELOPT_ALGOS`` ("NVFP4": ``flyer.interop.nvfp4``; "FP8": ``flyer.interop.fp8_scaled``); ``exclude`` the
    module-name patterns left unquantized (fnmatch wildcards, as ModelOpt writes them and vLLM matches them)."""

    exclude: tuple[str, ...] = ()
    algo: str = "NVFP4"

    def excluded(self, module: str) -> bool:
        return any(fnmatch.fnmatchcase(module, p) for p in self.exclude)


def modelopt_config(q: dict[str, Any], where: str, field: str = "quantization_config") -> ModelOptConfig:
    """``q``: ModelOpt's quantization fields (config.json's ``quantization_config``, or hf_quant_config.json's
    ``quantization``). NVFP4 in groups of 16 (read as W4A16) and FP8 per tensor (as W8A16); another algorithm, or
    an FP8 KV cache's scales: ``ConfigError`` naming the field."""
    algo = q.get("quant_algo")
    if not isinstance(algo, str) or algo.upper() not in MODELOPT_ALGOS:
        raise _bad(where, f"{field}.quant_algo", f"{algo!r:.40} is not supported (only "
                                                 f"{' or '.join(map(repr, MODELOPT_ALGOS))})")
    if algo.upper() == "NVFP4" and q.get("group_size", NVFP4_GROUP) != NVFP4_GROUP:
        raise _bad(where, f"{field}.group_size", f"{q['group_size']!r:.40} is not supported (only {NVFP4_GROUP})")
    if q.get("kv_cache_quant_algo") is not None:
        raise _bad(where, f"{field}.kv_cache_quant_algo", f"{q['kv_cache_quant_algo']!r:.40} is not supported "
                   "(only null: the cache's dtype is flyer's own choice)")
    key = "exclude_modules" if "exclude_modules" in q else "ignore"  # hf_quant_config.json's, config.json's
    exclude = q.get(key) or []
    if not isinstance(exclude, list) or not all(isinstance(p, str) for p in exclude):
        raise _bad(where, f"{field}.{key}", f"expected a list of module-name patterns (got {exclude!r:.60})")
    return ModelOptConfig(tuple(exclude), algo.upper())


KIMI_GROUP_SIZE = 32


def kimi_int4_config(mtp: bool = False) -> dict[str, Any]:
    """Kimi-K2-Thinking's ``quantization_config`` as Moonshot published it (its config.json): the routed experts
    pack-quantized INT4 in groups of ``KIMI_GROUP_SIZE``, everything ``ignore`` lists BF16 (the head, attention,
    shared experts and dense MLPs; the embeddings, norms and router are no ``Linear`` the group targets). ``mtp``:
    a model with DeepSeek's MTP layers (Kimi has none), whose own linears (``eh_proj``, ``shared_head.head``) stay
    BF16 as well, listed so that a loader of those layers does not look for them packed."""
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": KIMI_GROUP_SIZE,
               "dynamic": False, "actorder": None, "block_structure": None, "observer": "minmax",
               "observer_kwargs": {}}
    return {"quant_method": "compressed-tensors", "format": PACK_QUANTIZED, "quantization_status": "compressed",
            "kv_cache_scheme": None, "config_groups": {"group_0": {
                "targets": ["Linear"], "input_activations": None, "output_activations": None, "weights": weights}},
            "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*",
                       r"re:.*mlp\.(gate|up|gate_up|down)_proj.*",
                       *([r"re:.*\.eh_proj$", r"re:.*\.shared_head\.head$"] if mtp else [])]}


def _bad(where: str, field: str, problem: str) -> ConfigError:
    return ConfigError(f"{where}: field '{field}': {problem}")


def _weights(g: dict[str, Any], where: str, field: str, fmt: str) -> CompressedScheme:
    """One config group's ``weights`` as a scheme (no ``ignore`` yet), every field checked as compressed-tensors
    defaults it."""
    w = g.get("weights")
    if not isinstance(w, dict):
        raise _bad(where, f"{field}.weights", f"expected the weights' quantization arguments (got {w!r:.40})")
    field += ".weights"
    if fmt in FP4_FORMATS:
        args, scale_dtype = FP4_FORMATS[fmt]
        _check_fp4(w, fmt, where, field, ("dynamic", False), ("actorder", None), ("block_structure", None),
                   ("scale_dtype", scale_dtype))
        return CompressedScheme(args["group_size"], args["num_bits"], True, False, fmt)
    if w.get("type") == "float" and fmt in FP8_FORMATS:
        return CompressedScheme(None, 8, True, False, fmt, _fp8_block(w, where, field))
    bits = w.get("num_bits", 8)
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
        raise _bad(where, f"{field}.num_bits", f"{bits!r:.40} is not supported (integers of 1 to 8 bits)")
    symmetric = w.get("symmetric", True)
    if not isinstance(symmetric, bool):
        raise _bad(where, f"{field}.symmetric", f"expected true or false (got {symmetric!r:.40})")
    for key, want in (("type", "int"), ("dynamic", False), ("block_structure", None)):
        if w.get(key, want) != want or isinstance(w.get(key, want), bool) != isinstance(want, bool):
            raise _bad(where, f"{field}.{key}", f"{w.get(key, want)!r:.40} is not supported (only {want!r}: "
                                                f"integer weights in groups or channels)")
    size = w.get("group_size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < -1 or size == 0):
        raise _bad(where, f"{field}.group_size", f"expected a positive integer, or -1 for channels (got {size!r:.40})")
    strategy = w.get("strategy") or ("group" if size and size > 0 else "channel" if size == -1 else "tensor")
    if strategy not in ("group", "channel"):
        raise _bad(where, f"{field}.strategy", f"{strategy!r:.40} is not supported (only 'group' or 'channel')")
    if (strategy == "group") != (size is not None and size > 0) or (strategy == "channel" and size is not None
                                                                    and size != -1):
        raise _bad(where, f"{field}.group_size", f"{size!r:.40} does not fit strategy {strategy!r} (a positive "
                                                 f"size for 'group'; null or -1 for 'channel')")
    # "group" (alias "dynamic", or true) stores a weight_g_idx permuting the groups; "weight" / "static" changes
    # only how the scales were calibrated, not the stored format
    actorder = w.get("actorder")
    if actorder not in (None, False, True, "weight", "static", "group", "dynamic"):
        raise _bad(where, f"{field}.actorder", f"{actorder!r:.40} is not supported (null, 'weight' or 'group')")
    g_idx = actorder in (True, "group", "dynamic")
    if g_idx and strategy != "group":
        raise _bad(where, f"{field}.actorder", f"{actorder!r:.40} orders groups: strategy {strategy!r} has none")
    return CompressedScheme(size if strategy == "group" else None, bits, symmetric, g_idx, fmt)


def _fp8_block(w: dict[str, Any], where: str, field: str) -> tuple[int, int]:
    """FP8 weights' arguments (``w``, type "float"): ``CompressedScheme.fp8``, the block one scale covers; a field
    off llm-compressor's FP8 presets (8 bits, symmetric, static, no actorder; strategies ``FP8_STRATEGIES``):
    ``ConfigError`` naming it."""
    for key, want in (("num_bits", 8), ("symmetric", True), ("dynamic", False), ("actorder", None)):
        got = w.get(key, want)
        if got != want or isinstance(got, bool) != isinstance(want, bool):
            raise _bad(where, f"{field}.{key}", f"{got!r:.40} is not supported (only {want!r}: FP8 E4M3 weights)")
    size = w.get("group_size")
    strategy = w.get("strategy") or ("group" if size and size > 0 else "channel" if size == -1 else "tensor")
    if strategy not in FP8_STRATEGIES:
        raise _bad(where, f"{field}.strategy", f"{strategy!r:.40} is not supported for FP8 weights (only "
                                               f"{', '.join(map(repr, FP8_STRATEGIES))})")
    if size not in (None, -1):
        raise _bad(where, f"{field}.group_size", f"{size!r:.40} does not fit strategy {strategy!r} (only null)")
    shape = w.get("block_structure")
    if strategy != "block":
        if shape is not None:
            raise _bad(where, f"{field}.block_structure", f"{shape!r:.40} does not fit strategy {strategy!r} "
                                                          f"(only null)")
        return (0, 0) if strategy == "tensor" else (1, 0)
    if not (isinstance(shape, list) and len(shape) == 2
            and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)):
        raise _bad(where, f"{field}.block_structure", f"expected [rows, columns] of a block, positive integers "
                                                      f"(got {shape!r:.40})")
    return shape[0], shape[1]


def _check_fp8_inputs(args: Any, where: str, field: str) -> None:
    """FP8 weights' input activations ``args`` are FP8 E4M3 (W8A8: flyer runs it as W8A16, not reading their
    scales), else ``ConfigError`` naming the field."""
    if not isinstance(args, dict):
        raise _bad(where, field, f"expected the activations' quantization arguments (got {args!r:.40})")
    for key, want, default in (("type", "float", "int"), ("num_bits", 8, 8)):
        if args.get(key, default) != want:
            raise _bad(where, f"{field}.{key}", f"{args.get(key)!r:.40} is not supported (only {want!r}: FP8 "
                                                f"activations beside FP8 weights, run as W8A16)")


def _check_fp4(args: dict[str, Any], fmt: str, where: str, field: str, *more: tuple[str, Any]) -> None:
    """``args`` (a group's weights or input activations) are the FP4 format ``fmt``'s (``FP4_FORMATS``, and
    ``more``), else ``ConfigError`` naming the first field off."""
    want_args = FP4_FORMATS[fmt][0]
    for key, want in (*want_args.items(), *more):
        got = args.get(key, want)
        if got != want or isinstance(got, bool) != isinstance(want, bool):
            raise _bad(where, f"{field}.{key}", f"{got!r:.40} is not supported (only {want!r}: {fmt}'s FP4 "
                                                f"values in groups of {want_args['group_size']})")


def _patterns(entries: Any, where: str, field: str, what: str) -> tuple[str, ...]:
    """``targets`` or ``ignore``: a list of strings, each "re:" one a regular expression."""
    if not isinstance(entries, list) or not all(isinstance(p, str) for p in entries):
        raise _bad(where, field, f"expected a list of {what} or 're:' patterns (got {entries!r:.60})")
    for p in entries:
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as e:
                raise _bad(where, field, f"{p!r:.60} is not a regular expression ({e})") from None
    return tuple(entries)


def compressed_scheme(d: dict[str, Any], where: str = "config.json") -> CompressedConfig | ModelOptConfig | None:
    """The weight schemes of a (text model's) config ``d`` whose ``quantization_config`` is compressed-tensors' or
    ModelOpt's (module docstring); None for unquantized or FP8 weights; any other quantization: ``ConfigError``
    naming the field."""
    q = d.get("quantization_config")
    if q is None:
        return None
    if not isinstance(q, dict):
        raise _bad(where, "quantization_config", f"expected an object (got {q!r:.40})")
    method = q.get("quant_method", "fp8")
    if method == "fp8":
        return None
    if method == "modelopt":
        return modelopt_config(q, where)
    if method != "compressed-tensors":
        raise _bad(where, "quantization_config.quant_method",
                   f"{method!r:.40} is not supported (DeepSeek's FP8 blocks, compressed-tensors' integer, FP8 or "
                   f"NVFP4 weights, ModelOpt's NVFP4 or FP8 weights, or unquantized weights)")
    f = "quantization_config"
    for key, want in (("quantization_status", "compressed"), ("kv_cache_scheme", None), ("sparsity_config", None),
                      ("transform_config", None)):
        if q.get(key, want) != want:
            raise _bad(where, f"{f}.{key}", f"{q[key]!r:.40} is not supported (only {want!r})")
    groups = q.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise _bad(where, f"{f}.config_groups", f"expected an object of quantization groups (got {groups!r:.40})")
    schemes = []
    for name, g in groups.items():
        field = f"{f}.config_groups.{name}"
        if not isinstance(g, dict):
            raise _bad(where, field, f"expected a quantization scheme object (got {g!r:.40})")
        unknown = sorted(set(g) - set(SCHEME_KEYS))
        if unknown:  # the library refuses them too: a misspelt "targets" would quantize nothing
            raise _bad(where, f"{field}.{unknown[0]}", f"unknown key (a group has {', '.join(SCHEME_KEYS)})")
        targets = _patterns(g.get("targets"), where, f"{field}.targets", "module names, class names")
        fmt = g.get("format") or q.get("format")  # a group's own format overrides the config's
        if fmt not in FORMATS:
            raise _bad(where, f"{field}.format" if g.get("format") else f"{f}.format",
                       f"{fmt!r:.40} is not supported (only {', '.join(map(repr, FORMATS))})")
        if fmt == FLOAT_QUANTIZED and (g.get("weights") or {}).get("type") != "float":
            raise _bad(where, f"{field}.format" if g.get("format") else f"{f}.format", f"{fmt!r} holds FP8 "
                       f"weights (type 'float'), not {(g.get('weights') or {}).get('type', 'int')!r:.20} ones")
        scheme = _weights(g, where, field, fmt)
        for key in ("input_activations", "output_activations"):  # weight-only: activations stay in the model's dtype
            if g.get(key) is None:
                continue
            # W4A4 and W8A8 FP8 run as W4A16 and W8A16, as vLLM runs these checkpoints on GPUs without FP4 / FP8
            # tensor cores (its Marlin kernels)
            if key == "input_activations" and fmt in FP4_FORMATS and isinstance(g[key], dict):
                _check_fp4(g[key], fmt, where, f"{field}.{key}")
                continue
            if key == "input_activations" and scheme.fp8 is not None:
                _check_fp8_inputs(g[key], where, f"{field}.{key}")
                continue
            raise _bad(where, f"{field}.{key}", "activation quantization is not supported (only null: weight-only "
                                                "schemes such as W4A16; NVFP4's W4A4 and FP8's W8A8 run weight-only)")
        schemes.append((name, targets, scheme))
    ignore = _patterns(q.get("ignore") or [], where, f"{f}.ignore", "module names")
    return CompressedConfig(tuple(schemes), ignore)


__all__ = ["EMBEDDING", "FLOAT_QUANTIZED", "FORMATS", "FP4_FORMATS", "FP8_FORMATS", "FP8_STRATEGIES", "INT8_FORMATS",
           "KIMI_GROUP_SIZE", "LINEAR", "MODELOPT_ALGOS", "MXFP4", "MXFP4_ARGS", "NVFP4", "NVFP4_ARGS", "NVFP4_GROUP",
           "PACKED_FORMATS", "PACK_QUANTIZED", "SCHEME_KEYS", "CompressedConfig", "CompressedScheme", "ModelOptConfig",
           "compressed_scheme", "kimi_int4_config", "modelopt_config"]
