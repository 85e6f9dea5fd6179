"""A Hugging Face config's ``quantization_config``: the formats flyer decodes, the rest refused naming the field
(no torch: ``flyer.interop.hf_config`` uses it).

* ``quant_method`` "fp8": DeepSeek's E4M3 weights with 128x128 ``weight_scale_inv`` blocks (``flyer.interop.hf``).
* ``quant_method`` "compressed-tensors", ``format`` "pack-quantized": the INT4 weights Moonshot released
  Kimi-K2-Thinking and Kimi-K2.5 in (W4A16, routed experts only). Their published config: one group whose
  ``weights`` are num_bits 4, type "int", symmetric, strategy "group", group_size 32, actorder null, with no
  activation quantization; ``ignore`` lists lm_head, ``re:.*self_attn.*``, ``re:.*shared_experts.*`` and
  ``re:.*mlp\\.(gate|up|gate_up|down)_proj.*`` (K2.5 adds its vision tower and projector). Decoded by
  ``flyer.interop.int4_pack``. Fields mean what compressed-tensors (0.20) reads them as: ``QuantizationArgs``
  defaults num_bits 8, type int, symmetric true, and strategy "group" when only group_size is given;
  ``match_name`` ``re.match``-es an ``ignore`` entry "re:<regex>" against the module name, any other must equal it.

Anything else (asymmetric zero points, other bit widths, channel / tensor / block strategies, activation or KV cache
quantization, activation-ordered groups' ``weight_g_idx``, sparsity or transforms) is a ``ConfigError`` naming the
field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from flyer.errors import ConfigError

PACK_QUANTIZED = "pack-quantized"


@dataclass(frozen=True)
class Int4Pack:
    """compressed-tensors' pack-quantized INT4 scheme as flyer reads it: symmetric, one scale per ``group_size``
    consecutive input columns of a row; modules ``ignore`` matches are stored unquantized."""

    group_size: int
    ignore: tuple[str, ...] = ()

    def ignores(self, module: str) -> bool:
        """Whether the module named ``module`` (a tensor's name without ``.weight``) is listed in ``ignore``, as
        compressed-tensors matches it (``match_name``: "re:" prefix, ``re.match``; else the exact name)."""
        return any(re.match(p[3:], module) is not None if p.startswith("re:") else p == module for p in self.ignore)


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


def _weights(g: dict[str, Any], where: str, field: str) -> int:
    """The group size of one config group's ``weights``, every field checked as compressed-tensors defaults it."""
    w = g.get("weights")
    if not isinstance(w, dict):
        raise _bad(where, f"{field}.weights", f"expected the weights' quantization arguments (got {w!r:.40})")
    field += ".weights"
    for key, want, default in (("num_bits", 4, 8), ("type", "int", "int"), ("symmetric", True, True),
                               ("dynamic", False, False), ("block_structure", None, None)):
        if w.get(key, default) != want or isinstance(w.get(key, default), bool) != isinstance(want, bool):
            raise _bad(where, f"{field}.{key}", f"{w.get(key, default)!r:.40} is not supported (only {want!r}: "
                                                f"symmetric 4-bit integers in groups, as Kimi's INT4 weights)")
    size = w.get("group_size")
    strategy = w.get("strategy") or ("group" if size else None)
    if strategy != "group":
        raise _bad(where, f"{field}.strategy", f"{strategy!r:.40} is not supported (only 'group')")
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise _bad(where, f"{field}.group_size", f"expected a positive integer (got {size!r:.40})")
    # "group" (alias "dynamic", or true) stores a weight_g_idx permuting the groups; "weight" / "static" changes
    # only how the scales were calibrated, not the stored format
    if w.get("actorder") not in (None, False, "weight", "static"):
        raise _bad(where, f"{field}.actorder", f"{w['actorder']!r:.40} is not supported (activation-ordered "
                                               f"groups: only null or 'weight')")
    return size


def int4_pack(d: dict[str, Any], where: str = "config.json") -> Int4Pack | None:
    """The INT4 scheme of a (text model's) config ``d`` whose ``quantization_config`` is compressed-tensors'
    pack-quantized; None for unquantized or FP8 weights; any other quantization: ``ConfigError`` naming the field."""
    q = d.get("quantization_config")
    if q is None:
        return None
    if not isinstance(q, dict):
        raise _bad(where, "quantization_config", f"expected an object (got {q!r:.40})")
    method = q.get("quant_method", "fp8")
    if method == "fp8":
        return None
    if method != "compressed-tensors":
        raise _bad(where, "quantization_config.quant_method",
                   f"{method!r:.40} is not supported (DeepSeek's FP8 blocks, compressed-tensors' pack-quantized INT4, "
                   f"or unquantized weights)")
    f = "quantization_config"
    for key, want in (("quantization_status", "compressed"), ("kv_cache_scheme", None), ("sparsity_config", None),
                      ("transform_config", None)):
        if q.get(key, want) != want:
            raise _bad(where, f"{f}.{key}", f"{q[key]!r:.40} is not supported (only {want!r})")
    groups = q.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise _bad(where, f"{f}.config_groups", f"expected an object of quantization groups (got {groups!r:.40})")
    sizes = set()
    for name, g in groups.items():
        field = f"{f}.config_groups.{name}"
        if not isinstance(g, dict):
            raise _bad(where, field, f"expected a quantization scheme object (got {g!r:.40})")
        fmt = g.get("format") or q.get("format")  # a group's own format overrides the config's
        if fmt != PACK_QUANTIZED:
            raise _bad(where, f"{field}.format" if g.get("format") else f"{f}.format",
                       f"{fmt!r:.40} is not supported (only {PACK_QUANTIZED!r})")
        for key in ("input_activations", "output_activations"):  # W4A16: activations stay in the model's dtype
            if g.get(key) is not None:
                raise _bad(where, f"{field}.{key}", "activation quantization is not supported (only null: W4A16)")
        sizes.add(_weights(g, where, field))
    if len(sizes) > 1:  # each tensor's group size is read from its scale's shape: one size leaves no doubt
        raise _bad(where, f"{f}.config_groups", f"groups of sizes {sorted(sizes)}: only one group size is supported")
    ignore = q.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(p, str) for p in ignore):
        raise _bad(where, f"{f}.ignore", f"expected a list of module names or 're:' patterns (got {ignore!r:.60})")
    for p in ignore:
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as e:
                raise _bad(where, f"{f}.ignore", f"{p!r:.60} is not a regular expression ({e})") from None
    return Int4Pack(sizes.pop(), tuple(ignore))


__all__ = ["KIMI_GROUP_SIZE", "PACK_QUANTIZED", "Int4Pack", "int4_pack", "kimi_int4_config"]
