"""NVIDIA ModelOpt checkpoints (``hf_config_quant.ModelOptConfig``): the functions ``flyer.interop.hf`` calls for
compressed-tensors' (``flyer.interop.compressed``, same names), for the two algorithms flyer reads. Each quantized
linear keeps its name, ``<stem>.weight`` holding its codes:

* ``quant_algo`` "NVFP4" (``flyer.interop.nvfp4``): ``.weight`` uint8 (R, C/2), ``.weight_scale`` float8_e4m3fn
  (R, C/16), ``.weight_scale_2`` float32 (), which marks a quantized weight;
* ``quant_algo`` "FP8" (``flyer.interop.fp8_scaled``): ``.weight`` float8_e4m3fn (R, C), ``.weight_scale`` float32
  (), one scale per tensor, which marks it.

``.input_scale`` (the activations' scale, for W4A4 / W8A8 on FP4 / FP8 tensor cores) is not read: flyer computes
with the decoded weights and unquantized activations. Modules ``exclude_modules`` lists are stored unquantized.
"""

from __future__ import annotations

from pathlib import Path

import torch

from flyer.errors import CheckpointError
from flyer.interop.fp8_scaled import CODES, decode_fp8, fits, held_fp8
from flyer.interop.hf_config_quant import NVFP4_GROUP, ModelOptConfig
from flyer.interop.nvfp4 import INPUT_SCALE, SCALE, SCALE_2, WEIGHT, decode_nvfp4
from flyer.interop.tensorfile import TensorFile, header

PARTS = (SCALE, SCALE_2, INPUT_SCALE)  # a quantized <stem>.weight's companions


def _marker(config: ModelOptConfig) -> str:
    """The companion whose presence says a ``<stem>.weight`` is quantized."""
    return SCALE_2 if config.algo == "NVFP4" else SCALE


def compressed_stem(name: str, files, config: ModelOptConfig) -> str | None:
    """``<stem>`` when tensor ``name`` is one of a quantized weight's tensors (its codes ``<stem>.weight``, or a
    companion) in the checkpoint's ``files``: a ``<stem>.weight_scale_2`` (NVFP4) or ``<stem>.weight_scale`` (FP8)
    marks the quantized ones."""
    for suffix in (WEIGHT, *PARTS):
        if name.endswith(suffix):
            stem = name.removesuffix(suffix)
            return stem if stem + WEIGHT in files and stem + _marker(config) in files else None
    return None


def codes_name(stem: str, files) -> str:
    return stem + WEIGHT


def check_unquantized(name: str, path, config: ModelOptConfig) -> None:
    """A weight stored unquantized: nothing to check (ModelOpt quantizes the linears its exclusions leave, and
    which modules were linears in the exporter's model is not in their names)."""


def _quantized(name: str, files, headers, config: ModelOptConfig) -> tuple[str, TensorFile]:
    stem, tf = name.removesuffix(WEIGHT), header(headers, files[name])
    if config.excluded(stem):
        raise CheckpointError(f"{tf.path}: tensor {name} is quantized, but quantization_config's exclude_modules "
                              f"lists {stem} as unquantized")
    return stem, tf


def compressed_shape(name: str, files: dict[str, Path], headers: dict[Path, TensorFile],
                     config: ModelOptConfig) -> tuple[int, int]:
    """The (R, C) weight the codes ``name`` decode to, from its tensors' headers; a shape or dtype off the
    algorithm's layout, or a module ``exclude_modules`` lists: ``CheckpointError`` naming the tensor."""
    stem, tf = _quantized(name, files, headers, config)
    codes, dtype = tf.shape(name), tf.dtype(name)
    scale_tf = header(headers, files[stem + SCALE]) if stem + SCALE in files else None
    scale = None if scale_tf is None else scale_tf.shape(stem + SCALE)
    if config.algo == "FP8":
        if scale is None or dtype != CODES or len(codes) != 2 or not fits(scale, (1, 1)):
            raise CheckpointError(f"{tf.path}: quantized tensor {name} {dtype} {tuple(codes)} and its "
                                  f"{stem + SCALE} {scale} are not an FP8 weight (float8_e4m3fn codes, one scale)")
        return codes[0], codes[1]
    if scale is None or dtype != torch.uint8 or len(codes) != 2 \
            or scale != (codes[0], 2 * codes[1] // NVFP4_GROUP) or 2 * codes[1] % NVFP4_GROUP:
        raise CheckpointError(f"{tf.path}: quantized tensor {name} {dtype} {tuple(codes)} and its "
                              f"{stem + SCALE} are not an NVFP4 weight (uint8 codes two a byte, one scale per "
                              f"{NVFP4_GROUP} columns)")
    return codes[0], 2 * codes[1]


def read_compressed(tf: TensorFile, name: str, files: dict[str, Path], headers: dict[Path, TensorFile],
                    config: ModelOptConfig, out_dtype: torch.dtype) -> torch.Tensor:
    """The decoded weight of the codes ``name`` (``decode_nvfp4`` or ``decode_fp8``), in ``out_dtype``: one weight
    in memory at a time."""
    stem, tf = _quantized(name, files, headers, config)
    read = lambda part: header(headers, files[stem + part]).read(stem + part)  # noqa: E731
    codes = tf.read(name)
    if config.algo == "FP8":
        return decode_fp8(codes, read(SCALE), tuple(codes.shape) if codes.dim() == 2 else (1, 1), name).to(out_dtype)
    return decode_nvfp4(codes, read(SCALE), read(SCALE_2), False, name).to(out_dtype)


def held_codes(tf: TensorFile, name: str, files: dict[str, Path], headers: dict[Path, TensorFile],
               config: ModelOptConfig) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(E4M3 codes, FP32 128x128 tile scales, each the tensor's scale) of an FP8 weight ``name``, which a model
    holding FP8 keeps as they are; None for NVFP4 (decoded, then held anew)."""
    stem, tf = _quantized(name, files, headers, config)
    if config.algo != "FP8":
        return None
    codes = tf.read(name)
    block = tuple(codes.shape) if codes.dim() == 2 else (1, 1)
    return codes, held_fp8(codes, header(headers, files[stem + SCALE]).read(stem + SCALE), block, name)


__all__ = ["PARTS", "check_unquantized", "codes_name", "compressed_shape", "compressed_stem", "held_codes",
           "read_compressed"]
