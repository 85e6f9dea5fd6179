"""NVFP4 weights encoded as ``flyer export --dtype nvfp4`` writes them: compressed-tensors' "nvfp4-pack-quantized"
(llm-compressor's NVFP4A16 scheme: FP4 weights, activations left to the model's dtype), which vLLM serves and
transformers loads through compressed-tensors; loading decodes it in ``flyer.interop.nvfp4``.

``quantize_nvfp4`` is the library's (0.20) round to nearest, bit for bit: a global scale 448 x 6 / amax over the
whole weight (``generate_gparam``: 1 where that is not finite), each 16 columns' block scale global x amax_block / 6
rounded to FP8 E4M3 (``calculate_qparams``; a zero one replaced by E4M3's eps, 0.125), and each value the E2M1 code
nearest to w / (block / global), ties to the even code, saturating at +-6 (``quantize`` then ``pack_fp4_to_uint8``).
"""

from __future__ import annotations

from typing import Callable

import torch

from flyer.errors import FieldError
from flyer.fp8.fp4 import E2M1_MAX, e2m1_codes, pack_e2m1
from flyer.interop.hf_config_quant import NVFP4, NVFP4_ARGS, NVFP4_GROUP

FP8_MAX = 448.0  # E4M3's largest magnitude
FP8_EPS = 0.125  # the library's stand-in for a block scale that rounds to zero (its E4M3 "eps")
PACKED, SCALE, GLOBAL = ".weight_packed", ".weight_scale", ".weight_global_scale"


def quantize_nvfp4(w: torch.Tensor, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weight_packed (R, C/2) uint8, weight_scale (R, C/16) float8_e4m3fn, weight_global_scale (1,) float32) of
    ``w`` (R, C) float (module docstring); C not a multiple of 16: ``FieldError`` naming ``name``."""
    if w.dim() != 2 or not w.dtype.is_floating_point or w.shape[1] % NVFP4_GROUP:
        raise FieldError("dtype", f"nvfp4 needs a 2-D float weight whose input width is a multiple of "
                                  f"{NVFP4_GROUP}: {name} is {w.dtype} {tuple(w.shape)}")
    R, C = w.shape
    x = w.float()
    amax = x.abs().amax().clamp(min=torch.finfo(torch.float32).tiny)
    g = (FP8_MAX * E2M1_MAX / amax).nan_to_num(nan=1.0, posinf=1.0, neginf=1.0).reshape(1)
    block = x.view(R, -1, NVFP4_GROUP).abs().amax(-1)
    scale = (g * (block / E2M1_MAX)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    scale = torch.where(scale.float() == 0, torch.tensor(FP8_EPS, dtype=scale.dtype), scale)
    # the library divides the weight as stored (a BF16 weight promotes to FP32) by the FP32 effective scale
    ratio = w / (scale.float() / g).repeat_interleave(NVFP4_GROUP, dim=1)
    # + 0.0: an exact -0.0 encodes as +0 (code 0), as the library's sign test (x < 0) has it; e2m1_codes reads
    # the sign bit, as the hardware cast of V4's FP4 does
    codes = e2m1_codes((ratio.float().clamp(-E2M1_MAX, E2M1_MAX) + 0.0).view(R, -1, NVFP4_GROUP),
                       torch.zeros(R, C // NVFP4_GROUP, dtype=torch.int32))
    return pack_e2m1(codes.view(R, C)), scale, g


def nvfp4_items(name: str, shape: tuple[int, int], get: Callable[[], torch.Tensor]
                ) -> list[tuple[str, tuple[int, ...], torch.dtype, Callable]]:
    """The (name, shape, dtype, make) items ``flyer.interop.export`` writes for the weight ``name``
    (``<stem>.weight``; ``get``: its (R, C) values) in NVFP4: ``<stem>.weight_packed``, ``.weight_scale``,
    ``.weight_global_scale``. The weight is encoded once, when its codes are written; its scales are kept until
    they are."""
    rows, cols = shape
    if cols % NVFP4_GROUP:
        raise FieldError("dtype", f"nvfp4 needs every linear's input width to be a multiple of {NVFP4_GROUP}: "
                                  f"{name} has {cols}")
    made: list[torch.Tensor] = []

    def make(i: int) -> torch.Tensor:
        if not made:
            made.extend(quantize_nvfp4(get(), name))
        t = made[i]
        if i == 2:
            made.clear()
        return t

    stem = name.removesuffix(".weight")
    return [(stem + PACKED, (rows, cols // 2), torch.uint8, lambda: make(0)),
            (stem + SCALE, (rows, cols // NVFP4_GROUP), torch.float8_e4m3fn, lambda: make(1)),
            (stem + GLOBAL, (1,), torch.float32, lambda: make(2))]


# the linears an NVFP4 export leaves in BF16, as compressed-tensors' ``ignore`` names them: the head (and an MTP
# layer's copy), the routers (a Linear in some families) and DSA's indexer head weights
NVFP4_IGNORE = ["lm_head", r"re:.*shared_head\.head$", r"re:.*\.gate$", r"re:.*router\.classifier$",
                r"re:.*weights_proj$"]


def nvfp4_config() -> dict:
    """The ``quantization_config`` of an NVFP4 export: one group of every Linear in ``NVFP4_ARGS`` (W4A16) as
    compressed-tensors serialises llm-compressor's NVFP4A16 scheme, ``NVFP4_IGNORE`` left unquantized."""
    weights = {**NVFP4_ARGS, "dynamic": False, "scale_dtype": "torch.float8_e4m3fn"}
    return {"quant_method": "compressed-tensors", "format": NVFP4, "quantization_status": "compressed",
            "kv_cache_scheme": None, "global_compression_ratio": None, "moe_sparsity_config": None,
            "config_groups": {"group_0": {
                "targets": ["Linear"], "weights": weights, "input_activations": None, "output_activations": None,
                "format": None}}, "ignore": list(NVFP4_IGNORE)}


__all__ = ["FP8_EPS", "FP8_MAX", "NVFP4_IGNORE", "nvfp4_config", "nvfp4_items", "quantize_nvfp4"]
