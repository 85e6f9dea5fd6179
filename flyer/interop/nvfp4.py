"""NVFP4 weights, NVIDIA's 4-bit float format: E2M1 codes two to a byte (column 2j in the low nibble, as
``flyer.fp8.fp4.pack_e2m1``), an FP8 E4M3 scale per 16 consecutive input columns of a row, and one FP32 scale per
tensor; a weight is code x block scale x tensor scale. Two layouts of the same numbers are read:

* compressed-tensors' "nvfp4-pack-quantized" (llm-compressor's NVFP4 / NVFP4A16 schemes): ``<stem>.weight_packed``
  uint8 (R, C/2), ``.weight_scale`` float8_e4m3fn (R, C/16) and ``.weight_global_scale`` float32 (1,), the
  reciprocal of the tensor scale: the library decodes code x (block scale / global scale), in that order.
* NVIDIA ModelOpt's (``quant_method`` "modelopt", ``quant_algo`` "NVFP4": nvidia/DeepSeek-R1-FP4,
  DeepSeek-V3-0324-FP4, Kimi-K2-Thinking-NVFP4): ``<stem>.weight`` uint8 (R, C/2), ``.weight_scale``
  float8_e4m3fn (R, C/16) and ``.weight_scale_2`` float32 (), the tensor scale itself (amax / (6 x 448)); decoded as
  code x (block scale x tensor scale). ``.input_scale`` is the activations' (W4A4 on Blackwell's FP4 tensor
  cores): not read. ``flyer.interop.modelopt`` finds these tensors.

Both are read as weight-only: flyer computes with the decoded weights and unquantized activations, as vLLM runs
these checkpoints on GPUs without FP4 tensor cores (its Marlin kernels). The decoded values are exact in FP32 but
for the one rounding of each scale product (and of each code's product with it, at most one more).
"""

from __future__ import annotations

import torch

from flyer.fp8.fp4 import E2M1_VALUES, unpack_e2m1
from flyer.interop.hf_config_quant import NVFP4_GROUP

WEIGHT, SCALE = ".weight", ".weight_scale"
SCALE_2 = ".weight_scale_2"  # ModelOpt's FP32 tensor scale
INPUT_SCALE = ".input_scale"  # ModelOpt W4A4's activations' scale (not read)


def decode_nvfp4(packed: torch.Tensor, block_scale: torch.Tensor, tensor_scale: torch.Tensor, reciprocal: bool,
                 name: str) -> torch.Tensor:
    """(R, C) float32 weight ``name`` from its codes ``packed`` (R, C/2) uint8, ``block_scale`` (R, C/16)
    float8_e4m3fn and ``tensor_scale`` (one FP32 value): code x (block / tensor) when ``reciprocal``
    (compressed-tensors' global scale), else code x (block x tensor) (ModelOpt's). Bad dtypes or shapes:
    ``ValueError`` naming ``name``."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"{name}: NVFP4 codes must be a 2-D uint8 tensor (got {packed.dtype} {tuple(packed.shape)})")
    R, C = packed.shape[0], 2 * packed.shape[1]
    if block_scale.dtype != torch.float8_e4m3fn or tuple(block_scale.shape) != (R, C // NVFP4_GROUP) \
            or C % NVFP4_GROUP:
        raise ValueError(f"{name}: block scales {block_scale.dtype} {tuple(block_scale.shape)} are not one "
                         f"float8_e4m3fn per {NVFP4_GROUP} of the {C} columns of {R} rows")
    if tensor_scale.numel() != 1 or not tensor_scale.dtype.is_floating_point:
        raise ValueError(f"{name}: the tensor scale must be one float (got {tensor_scale.dtype} "
                         f"{tuple(tensor_scale.shape)})")
    block, g = block_scale.float(), tensor_scale.float().reshape(())
    scale = block / g if reciprocal else block * g  # (R, C/16), one rounding, as the libraries compute it
    values = E2M1_VALUES.to(packed.device)[unpack_e2m1(packed).long()]  # (R, C), exact
    return (values.view(R, -1, NVFP4_GROUP) * scale.unsqueeze(-1)).view(R, C)


__all__ = ["INPUT_SCALE", "SCALE", "SCALE_2", "WEIGHT", "decode_nvfp4"]
