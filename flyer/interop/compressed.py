"""compressed-tensors' weight-only integer, FP8 and NVFP4 checkpoints (``hf_config_quant.CompressedConfig``: each
quantized module in the scheme of the config group that targets it), decoded as they load, exactly as
compressed-tensors 0.20 decompresses them. NVFP4 ("nvfp4-pack-quantized": ``<stem>.weight_packed`` uint8,
``.weight_scale`` FP8, ``.weight_global_scale``) is ``flyer.interop.nvfp4``'s, FP8 weights ("float-quantized":
``<stem>.weight`` float8_e4m3fn, ``.weight_scale`` per tensor, row or block) ``flyer.interop.fp8_scaled``'s, MXFP4
("mxfp4-pack-quantized": ``.weight_packed`` uint8, ``.weight_scale`` UE8M0 bytes per 32 columns) DeepSeek-V4's
FP4 decoder's (``flyer.interop.v4_quant``); the rest of this docstring is the integer formats'.

A quantized linear ``<stem>`` (R output rows, C input columns; G scales a row: C / group_size, or 1 for strategy
"channel") is stored instead of ``<stem>.weight`` as:

* its codes, b-bit signed integers q in [-2^(b-1), 2^(b-1) - 1] (b: ``num_bits``):
  pack-quantized: ``<stem>.weight_packed`` int32 (R, ceil(C*b/32)), each row a little-endian bit stream (code j
  in bits j*b .. j*b+b-1, the first word's lowest bit first; a code may straddle two words unless b divides 32),
  each code stored unsigned as q + 2^(b-1) (``pack_to_int32``); and ``<stem>.weight_shape`` integer (2,): (R, C);
  naive-quantized / int-quantized: ``<stem>.weight`` int8 (R, C), q itself;
* ``<stem>.weight_scale`` (R, G), float (the model's dtype, as the library writes it);
* asymmetric schemes: ``<stem>.weight_zero_point`` (R, G) integer z in q's range: pack-quantized packs it as the
  codes are but down the rows (``packed_dim=0``: int32 (ceil(R*b/32), G)); int8 (R, G) in the int8 formats;
* actorder "group": ``<stem>.weight_g_idx`` integer (C,), the group of each column (without it column j is in
  group j // group_size).

w[r, j] = (q[r, j] - z[r, g]) * scale[r, g], g = column j's group, as the library's ``dequantize`` computes it: the
difference in the scale's dtype (exact: |q - z| <= 255 fits BF16's and FP16's significands), the product rounded
once to the scale's dtype (computed here in FP32, exact for BF16 / FP16 scales, then rounded once, as PyTorch's
BF16 multiply does), then cast to the model's dtype. transformers loads those values; vLLM's kernels multiply by
them. compressed-tensors 0.20 no longer reads actorder "group" (it refuses the config); its semantics here are
those of its earlier releases and vLLM's (a column's scale and zero point are its g_idx group's).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from flyer.errors import CheckpointError
from flyer.interop.hf_config_quant import (EMBEDDING, LINEAR, MXFP4, NVFP4, NVFP4_GROUP, PACK_QUANTIZED,
                                           PACKED_FORMATS, CompressedConfig, CompressedScheme)
from flyer.interop.fp8_scaled import CODES, decode_fp8, fits, held_fp8, scale_grid, tiles_in_blocks
from flyer.interop.nvfp4 import decode_nvfp4
from flyer.interop.tensorfile import TensorFile, header
from flyer.interop.v4_quant import dequantize_fp4_e2m1

PACKED, SCALE, SHAPE, ZERO, G_IDX = ".weight_packed", ".weight_scale", ".weight_shape", ".weight_zero_point", \
    ".weight_g_idx"
GLOBAL = ".weight_global_scale"  # NVFP4's: the reciprocal of the weight's tensor scale
INPUT_GLOBAL = ".input_global_scale"  # NVFP4 W4A4's activations' global scale: not read (flyer runs it as W4A16)
INPUT_SCALE = ".input_scale"  # static FP8 activations' scale (W8A8): not read (flyer runs it as W8A16)
WEIGHT = ".weight"
WORD_BITS = 32
PARTS = (PACKED, SCALE, SHAPE, ZERO, G_IDX, GLOBAL)  # a stem's tensors besides an int8 format's .weight


def packed_words(count: int, num_bits: int) -> int:
    """int32 words holding ``count`` ``num_bits``-bit codes, densely packed."""
    return -(-count * num_bits // WORD_BITS)


def unpack_int32(packed: torch.Tensor, num_bits: int, count: int) -> torch.Tensor:
    """(R, count) int8 signed codes from ``packed`` (R, >= packed_words(count, num_bits)) int32, each row the dense
    little-endian bit stream of the module docstring (compressed-tensors' ``unpack_from_int32``): 4 and 8 bits as
    bytes on a little-endian host; otherwise shifts, whatever the host's byte order."""
    mask = (1 << num_bits) - 1
    if num_bits in (4, 8) and sys.byteorder == "little":  # a word's bytes in stream order: read as bytes, 15x faster
        # (R, 4W), through a flat view: a transposed (G, 1) counts as contiguous but keeps a stride view refuses
        u8 = packed.contiguous().reshape(-1).view(torch.uint8).view(packed.shape[0], 4 * packed.shape[1])
        if num_bits == 4:  # the low nibble first
            u8 = torch.stack((u8 & 0xF, u8 >> 4), dim=-1).flatten(1)
        # q + 2^(b-1) to q: subtracting the offset is flipping the top bit (two's complement)
        return (u8[:, :count] ^ (1 << (num_bits - 1))).view(torch.int8) if num_bits == 8 else \
            (u8[:, :count].view(torch.int8) - 8)
    if WORD_BITS % num_bits == 0:  # no code straddles two words (b = 1, 2, 4, 8): shifts in int32, 4 bytes a code
        shifts = torch.arange(0, WORD_BITS, num_bits, dtype=torch.int32, device=packed.device)
        codes = ((packed.unsqueeze(-1) >> shifts) & mask).flatten(1)[:, :count]
        return (codes - (1 << (num_bits - 1))).to(torch.int8)
    u = packed.to(torch.int64) & 0xFFFFFFFF  # each word's 32 bits, unsigned
    u = torch.nn.functional.pad(u, (0, 1))  # a last code's missing upper word reads as zeros
    start = torch.arange(count, device=packed.device) * num_bits
    word, shift = start // WORD_BITS, start % WORD_BITS
    # the two words a code may straddle as one 64-bit window: its bits sit at shift .. shift + b - 1 < 40
    window = u[:, word] | (u[:, word + 1] << WORD_BITS)
    return (((window >> shift) & mask) - (1 << (num_bits - 1))).to(torch.int8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None,
               g_idx: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32,
               name: str = "weight") -> torch.Tensor:
    """(R, C) ``out_dtype`` weight (module docstring) from codes ``q`` (R, C) integer, ``scale`` (R, G) float,
    ``zero`` (R, G) integer or None (symmetric), ``g_idx`` (C,) integer group per column or None (column j in group
    j // (C / G), C a multiple of G). Inconsistent shapes or values: ValueError naming ``name``."""
    if q.dim() != 2 or q.dtype.is_floating_point:
        raise ValueError(f"{name}: codes must be a 2-D integer tensor (got {q.dtype} {tuple(q.shape)})")
    R, C = q.shape
    if scale.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64) or scale.dim() != 2 \
            or scale.shape[0] != R or not scale.shape[1]:
        raise ValueError(f"{name}: weight_scale {scale.dtype} {tuple(scale.shape)} is not one float scale per group "
                         f"of a row of a ({R}, {C}) weight")
    G = scale.shape[1]
    if zero is not None and (zero.dtype.is_floating_point or tuple(zero.shape) != (R, G)):
        raise ValueError(f"{name}: weight_zero_point {zero.dtype} {tuple(zero.shape)} is not one integer per scale "
                         f"{(R, G)}")
    compute = torch.promote_types(scale.dtype, torch.float32)
    if g_idx is None:
        if C % G:
            raise ValueError(f"{name}: {C} columns do not split into the scale's {G} groups")
        v = q.to(compute).unflatten(1, (G, -1))  # (R, G, C/G): each group's columns, exact
        s, z = scale.unsqueeze(-1), None if zero is None else zero.unsqueeze(-1)
    else:
        if g_idx.dtype.is_floating_point or tuple(g_idx.shape) != (C,):
            raise ValueError(f"{name}: weight_g_idx {g_idx.dtype} {tuple(g_idx.shape)} is not one integer per column")
        if C and not (0 <= int(g_idx.min()) and int(g_idx.max()) < G):
            raise ValueError(f"{name}: weight_g_idx holds groups outside [0, {G})")
        g = g_idx.long()
        v, s, z = q.to(compute), scale[:, g], None if zero is None else zero[:, g]  # each column's group's
    if z is not None:
        v = v - z.to(compute)
    return (v * s.to(compute)).to(scale.dtype).flatten(1).to(out_dtype)


def fp8_block(scheme: CompressedScheme, rows: int, cols: int) -> tuple[int, int]:
    """The (rows, columns) block of an (R, C) FP8 weight of ``scheme`` one scale covers (``scheme.fp8``'s 0: the
    whole dimension)."""
    return scheme.fp8[0] or rows, scheme.fp8[1] or cols


def module_classes(module: str) -> tuple[str, ...]:
    """The class names (``hf_config_quant.LINEAR`` or ``EMBEDDING``) compressed-tensors matched a quantized module
    of the checkpoint by: the library quantizes only linears and embeddings, and a checkpoint's embedding is its
    ``embed_tokens`` (routed experts are stored one linear each, as the library quantized them)."""
    return EMBEDDING if module.rpartition(".")[2] == "embed_tokens" else LINEAR


def compressed_stem(name: str, files, config: CompressedConfig) -> str | None:
    """``<stem>`` when tensor ``name`` is one of a quantized weight's tensors in the checkpoint's ``files`` (its codes
    ``codes_name`` or a companion; module docstring): the codes of a format ``config``'s groups use and a
    ``<stem>.weight_scale`` beside them, whichever group its module is in (``compressed_shape`` checks it); else
    None."""
    int8 = bool(config.formats - set(PACKED_FORMATS))  # else a .weight beside a .weight_scale is no int8 codes
    for suffix in (*PARTS, INPUT_GLOBAL, INPUT_SCALE, WEIGHT) if int8 else (*PARTS, INPUT_GLOBAL):
        if name.endswith(suffix):
            stem = name.removesuffix(suffix)
            codes = stem + PACKED in files or (int8 and stem + WEIGHT in files)
            return stem if codes and stem + SCALE in files else None
    return None


def codes_name(stem: str, files) -> str:
    """The tensor of ``files`` holding the quantized ``stem``'s codes: ``<stem>.weight_packed`` or, int8 formats,
    ``<stem>.weight``."""
    return stem + (PACKED if stem + PACKED in files else WEIGHT)


def scheme_of(name: str, stem: str, config: CompressedConfig, path) -> CompressedScheme:
    """The scheme of the quantized ``stem`` (codes ``name``, in file ``path``): its group's (``config.scheme_of``);
    a module ``ignore`` lists, that no group targets, or stored in another format: ``CheckpointError`` naming the
    tensor."""
    classes = module_classes(stem)
    if config.ignores(stem, classes):
        raise CheckpointError(f"{path}: tensor {name} is quantized, but quantization_config's ignore lists "
                              f"{stem} as unquantized")
    found = config.scheme_of(stem, classes)
    if found is None:
        raise CheckpointError(f"{path}: tensor {name} is quantized, but no group of quantization_config's "
                              f"config_groups targets {stem}")
    group, scheme = found
    if (name == stem + PACKED) != (scheme.format in PACKED_FORMATS):
        raise CheckpointError(f"{path}: quantized tensor {name} is not stored in the format of "
                              f"config_groups.{group} ({scheme.format})")
    return scheme


def check_unquantized(name: str, path, config: CompressedConfig) -> None:
    """A 2-D ``<module>.weight`` stored unquantized: ``CheckpointError`` naming it when a group of ``config`` targets
    ``module`` by its name (exactly or "re:") and ``ignore`` does not list it. Not by a class name: which modules
    were linears in the exporter's model is not in their names (a router, a ``gate``, is one in some families and
    not in DeepSeek's; a wrapper's ``language_model.lm_head`` is one whose published ``ignore`` says "lm_head");
    nor a ``gate`` by name ("re:.*mlp.*" takes DeepSeek's router, which the library leaves as it is)."""
    module = name.removesuffix(WEIGHT)
    if not name.endswith(WEIGHT) or module.rpartition(".")[2] == "gate" or config.ignores(module,
                                                                                          module_classes(module)):
        return
    found = config.scheme_of(module, classes=())
    if found is not None:
        raise CheckpointError(f"{path}: tensor {name} is not quantized, but quantization_config's "
                              f"config_groups.{found[0]} targets {module}")


def _parts(stem: str, scheme: CompressedScheme) -> tuple[str, ...]:
    """The companions of ``stem``'s codes the scheme stores (module docstring; NVFP4: ``flyer.interop.nvfp4``)."""
    if scheme.format == NVFP4:
        return SCALE, GLOBAL
    if scheme.fp8 is not None or scheme.format == MXFP4:
        return (SCALE,)
    return (SCALE, *((SHAPE,) if scheme.format == PACK_QUANTIZED else ()), *(() if scheme.symmetric else (ZERO,)),
            *((G_IDX,) if scheme.g_idx else ()))


def compressed_shape(name: str, files: dict[str, Path], headers: dict[Path, TensorFile],
                     config: CompressedConfig) -> tuple[int, int]:
    """The (R, C) weight the codes ``name`` (``codes_name``) decode to, from the headers of its tensors (and, for a
    packed weight of strategy "channel" without g_idx, its 2-integer weight_shape: the packed words give C only to
    within 32 / b); a missing or unexpected companion, a shape off its group's scheme, or a module no group
    quantizes (``scheme_of``): ``CheckpointError`` naming the tensor."""
    stem, tf = name.removesuffix(PACKED if name.endswith(PACKED) else WEIGHT), header(headers, files[name])
    scheme = scheme_of(name, stem, config, tf.path)
    parts = _parts(stem, scheme)
    for part in PARTS:
        if (stem + part in files) != (part in parts) and stem + part != name:
            problem = "has no" if part in parts else "has a"
            raise CheckpointError(f"{tf.path}: quantized tensor {name} {problem} {stem + part} (quantization_config: "
                                  f"{scheme.num_bits}-bit, {'' if scheme.symmetric else 'a'}symmetric, "
                                  f"{'actorder group' if scheme.g_idx else 'no actorder group'})")
    shape = lambda part: header(headers, files[stem + part]).shape(stem + part)  # noqa: E731
    codes, scale = tf.shape(name), shape(SCALE)
    if scheme.format == NVFP4:  # (R, C/2) bytes, (R, C/16) FP8 scales, one global scale
        rows, cols = (codes[0], 2 * codes[1]) if len(codes) == 2 else (-1, -1)
        if tf.dtype(name) != torch.uint8 or cols < 0 or cols % NVFP4_GROUP or math.prod(shape(GLOBAL)) != 1 \
                or tuple(scale) != (rows, cols // NVFP4_GROUP):
            raise CheckpointError(f"{tf.path}: quantized tensor {name} {tf.dtype(name)} {tuple(codes)} and its scale "
                                  f"{tuple(scale)} are not an NVFP4 weight (uint8 codes two a byte, a scale per "
                                  f"{NVFP4_GROUP} columns, one global scale)")
        return rows, cols
    if scheme.format == MXFP4:  # (R, C/2) bytes, (R, C/32) UE8M0 exponents
        rows, cols = (codes[0], 2 * codes[1]) if len(codes) == 2 else (-1, -1)
        if tf.dtype(name) != torch.uint8 or cols < 0 or cols % scheme.group_size \
                or tuple(scale) != (rows, cols // scheme.group_size):
            raise CheckpointError(f"{tf.path}: quantized tensor {name} {tf.dtype(name)} {tuple(codes)} and its scale "
                                  f"{tuple(scale)} are not an MXFP4 weight (uint8 codes two a byte, a UE8M0 scale per "
                                  f"{scheme.group_size} columns)")
        return rows, cols
    if scheme.fp8 is not None:  # (R, C) E4M3 codes, a scale per tensor, row or block
        rows, cols = codes if len(codes) == 2 else (-1, -1)
        block = fp8_block(scheme, rows, cols)
        if tf.dtype(name) != CODES or rows < 0 or not fits(scale, scale_grid(rows, cols, block)):
            what = {(0, 0): "the tensor", (1, 0): "row"}.get(scheme.fp8, f"{block[0]}x{block[1]} block")
            raise CheckpointError(f"{tf.path}: quantized tensor {name} {tf.dtype(name)} {tuple(codes)} and its scale "
                                  f"{tuple(scale)} are not an FP8 weight (float8_e4m3fn codes, a scale per {what})")
        return rows, cols
    rows = codes[0] if len(codes) == 2 else -1
    if scheme.g_idx:
        cols = shape(G_IDX)[0] if len(shape(G_IDX)) == 1 else -1
    elif scheme.group_size is not None:
        cols = scale[-1] * scheme.group_size
    elif scheme.format == PACK_QUANTIZED:
        size = header(headers, files[stem + SHAPE]).read(stem + SHAPE).reshape(-1).tolist()
        cols = int(size[1]) if len(size) == 2 else -1
    else:
        cols = codes[1] if len(codes) == 2 else -1
    groups = 1 if scheme.group_size is None else -(-cols // scheme.group_size)
    width = packed_words(cols, scheme.num_bits) if scheme.format == PACK_QUANTIZED else cols
    zero = (packed_words(rows, scheme.num_bits) if scheme.format == PACK_QUANTIZED else rows, groups)
    if (cols < 0 or tuple(codes) != (rows, width) or tuple(scale) != (rows, groups)
            or (not scheme.symmetric and tuple(shape(ZERO)) != zero)):
        what = "channels" if scheme.group_size is None else f"groups of {scheme.group_size} columns"
        raise CheckpointError(f"{tf.path}: quantized tensor {name} {tuple(codes)} and its scale {tuple(scale)} are not "
                              f"a {scheme.num_bits}-bit weight in {what} (quantization_config)")
    return rows, cols


def read_compressed(tf: TensorFile, name: str, files: dict[str, Path], headers: dict[Path, TensorFile],
                    config: CompressedConfig, out_dtype: torch.dtype) -> torch.Tensor:
    """The dequantized weight of the codes ``name`` (``dequantize``) in its group's scheme, its companions read from
    their files: one weight in memory at a time."""
    stem = name.removesuffix(PACKED if name.endswith(PACKED) else WEIGHT)
    scheme = scheme_of(name, stem, config, tf.path)
    read = {p: header(headers, files[stem + p]).read(stem + p) for p in _parts(stem, scheme)}
    codes, zero = tf.read(name), read.get(ZERO)
    if scheme.format == NVFP4:
        return decode_nvfp4(codes, read[SCALE], read[GLOBAL], True, name).to(out_dtype)
    if scheme.format == MXFP4:  # DeepSeek-V4's FP4 experts' layout, its scales the exponents' uint8 bytes: exact
        return dequantize_fp4_e2m1(codes, read[SCALE], out_dtype, name)
    if scheme.fp8 is not None:
        return decode_fp8(codes, read[SCALE], fp8_block(scheme, *(codes.shape if codes.dim() == 2 else (1, 1))),
                          name).to(out_dtype)
    if scheme.format == PACK_QUANTIZED:
        for t, what in ((codes, "codes"), (zero, "zero points")):
            if t is not None and t.dtype != torch.int32:
                raise ValueError(f"{name}: packed {what} must be int32 (got {t.dtype})")
        size = read[SHAPE].reshape(-1).tolist()
        if read[SHAPE].dtype.is_floating_point or len(size) != 2 or size[0] != codes.shape[0] \
                or packed_words(size[1], scheme.num_bits) != codes.shape[1]:
            raise ValueError(f"{name}: weight_shape {size} does not match the packed codes {tuple(codes.shape)} "
                             f"({scheme.num_bits}-bit)")
        if G_IDX in read and read[G_IDX].numel() != size[1]:  # the words agree on a few widths: g_idx says which
            raise ValueError(f"{name}: weight_shape {size} does not match weight_g_idx's {read[G_IDX].numel()} "
                             f"columns")
        codes = unpack_int32(codes, scheme.num_bits, int(size[1]))
        if zero is not None:  # packed down the rows: its transpose's rows are the stream
            zero = unpack_int32(zero.T, scheme.num_bits, codes.shape[0]).T
    elif codes.dtype != torch.int8:
        raise ValueError(f"{name}: {scheme.format} codes must be int8 (got {codes.dtype})")
    else:  # int8-stored codes of fewer bits: in the bits' range, as the packed ones are by construction
        lo, hi = -(1 << scheme.num_bits - 1), (1 << scheme.num_bits - 1) - 1
        for t, what in ((codes, "codes"), (zero, "zero points")):
            m = torch.aminmax(t) if scheme.num_bits < 8 and t is not None and t.numel() else None
            if m is not None and not lo <= m.min <= m.max <= hi:
                raise ValueError(f"{name}: {scheme.num_bits}-bit {what} lie outside [{lo}, {hi}]")
    return dequantize(codes, read[SCALE], zero, read.get(G_IDX), out_dtype, name)


def held_codes(tf: TensorFile, name: str, files: dict[str, Path], headers: dict[Path, TensorFile],
               config: CompressedConfig) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(E4M3 codes, FP32 128x128 tile scales) of an FP8 weight ``name`` whose codes a model holding FP8 keeps as they
    are (``fp8_scaled.held_fp8``); None for other weights (decoded, then held anew)."""
    if name.endswith(PACKED):
        return None
    stem = name.removesuffix(WEIGHT)
    scheme = scheme_of(name, stem, config, tf.path)
    if scheme.fp8 is None:
        return None
    shape = tf.shape(name)
    block = fp8_block(scheme, *(shape if len(shape) == 2 else (1, 1)))
    if len(shape) == 2 and not tiles_in_blocks(shape, block):  # decided from the header: the codes are read once
        return None
    codes = tf.read(name)
    scale = held_fp8(codes, header(headers, files[stem + SCALE]).read(stem + SCALE), block, name)
    return None if scale is None else (codes, scale)


__all__ = ["GLOBAL", "G_IDX", "INPUT_GLOBAL", "INPUT_SCALE", "PACKED", "PARTS", "SCALE", "SHAPE", "WEIGHT", "ZERO",
           "check_unquantized", "codes_name", "compressed_shape", "compressed_stem", "dequantize", "fp8_block",
           "held_codes", "module_classes", "packed_words", "read_compressed", "scheme_of", "unpack_int32"]
