"""Hugging Face / DeepSeek checkpoints in: names, RoPE layouts, the FP8 block format, loading.

A Hugging Face model directory holds ``config.json``, ``model.safetensors`` (or shards
``model-*.safetensors`` with ``model.safetensors.index.json``), ``tokenizer.json`` and optionally
``tokenizer_config.json`` / ``generation_config.json`` (read by ``flyer.interop.hf_tokenizer``). Which HF tensor
each flyer tensor is, and the RoPE rows permuted on the way: ``flyer.interop.hf_names``.

DeepSeek's FP8 format stores a linear weight as ``float8_e4m3fn`` plus ``weight_scale_inv``,
one FP32 scale per 128x128 block (w = data * scale_inv); it is dequantized on import, or, into a
model holding its weights in FP8 (``flyer.infer.weights.empty_held``), kept as its codes and scales.
compressed-tensors' integer weights (Kimi-K2-Thinking's, K2.5's INT4 experts; llm-compressor's GPTQ / AWQ / RTN
schemes) are read as ``<stem>.weight`` from its codes, scales and zero points, dequantized on import
(``flyer.interop.compressed``), as are its FP8 and NVFP4 weights and ModelOpt's (``flyer.interop.modelopt``).
"""

from __future__ import annotations

import math
import os
import re
import warnings
from pathlib import Path
from typing import Callable

import torch

from flyer import kernels
from flyer.config import ModelConfig
from flyer.errors import CheckpointError, ConfigError
from flyer.fp8.quant import TILE
from flyer.infer.weights import FP8, empty_held, held_scale, write_fp8_codes, write_weight
from flyer.interop.hf_config import DSA_MODEL_TYPES, HALF_ROPE_MODEL_TYPES, from_hf_config, model_type, text_config
from flyer.interop import compressed, modelopt
from flyer.interop.compressed import PACKED
from flyer.interop.hf_config_quant import CompressedConfig, ModelOptConfig, compressed_scheme, modelopt_config
from flyer.interop.hf_names import (LONGCAT_MTP, LONGCAT_MTP_EMBED, MTP_COPIES, V4_MTP_COPIES, Slot,
                                    has_fused_experts, hf_names, meta_model, permute_rope, v4_name)
from flyer.interop.hf_tokenizer import TextTokenizer, load_tokenizer, read_json as _read_json
from flyer.interop.tensorfile import TensorFile, header
from flyer.interop.v4_quant import dequantize_fp4_e2m1, dequantize_ue8m0_blocks, held_e4m3_blocks, stored_format
from flyer.model.attention import Indexer
from flyer.model.init import allocate
from flyer.model.moe import Gate
from flyer.model.transformer import Transformer
from flyer.train.checkpoint import WEIGHTS_FILE as SINGLE, WEIGHTS_INDEX as INDEX, is_training_step, weight_files

MODELOPT_CONFIG = "hf_quant_config.json"  # ModelOpt's own quantization file beside config.json
SCALE_SUFFIX = "_scale_inv"  # DeepSeek FP8: <linear>.weight_scale_inv beside <linear>.weight


def is_hf_model_dir(path: str | Path) -> bool:
    """A directory with a ``config.json`` and safetensors weights (and no flyer manifest, nor the training state of
    a flyer step: one whose manifest was lost is said to be so, not read as an HF directory of flyer's keys)."""
    p = Path(path)
    flyer_step = (p / "manifest.json").is_file() or is_training_step(p)
    return (p / "config.json").is_file() and not flyer_step and (
        (p / INDEX).is_file() or (p / SINGLE).is_file())


def dequantize_fp8_blocks(data: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """(R, C) float32 from DeepSeek's FP8 weight ``data`` (R, C) and ``weight_scale_inv``
    (ceil(R/128), ceil(C/128)): each element times its 128x128 block's scale (the values the held-weight
    kernels compute with)."""
    return kernels.dequantize_held(data, scale_inv.float())


def read_hf_config(path: str | Path, files: dict[str, Path] | None = None) -> tuple[ModelConfig, dict]:
    """(flyer config, raw config.json) of an HF directory (a wrapper's: its text model's, ``text_config``).
    ``files``: the checkpoint's tensors (``weight_files``); MTP modules they lack (transformers'
    ``save_pretrained`` drops them) are not built, and tied embeddings beside a head of other values are read
    untied (``distinct_head``)."""
    path = Path(path)
    raw = text_config(_read_json(path / "config.json"), str(path / "config.json"))
    fields = from_hf_config(raw, str(path / "config.json"))
    names = None if files is None else list(files)
    if fields.get("tie_embeddings") and files is not None and distinct_head(files):
        fields["tie_embeddings"] = False
        warnings.warn(f"{path / 'config.json'} ties the embeddings, but the checkpoint's lm_head.weight differs "
                      f"from its embedding: read untied, as transformers reads it")
    # the MTP layers the files hold: V4's mtp.k.*, V3's (a negative depth is refused by the validation below)
    if names is not None and fields.get("mtp_depth", 0) > 0:
        v4, longcat = fields.get("attn") == "hybrid", fields.get("shortcut_moe", False)  # LongCat: model.mtp.*
        pattern = (r"mtp\.(\d+)\..+" if v4 else r"model\.mtp\.layers\.(\d+)\.eh_proj\.weight" if longcat
                   else r"model\.layers\.(\d+)\.eh_proj\.weight")
        names = [text_name(n) or "" for n in names] if is_wrapped(names) else names
        have = {int(m.group(1)) for n in names if (m := re.fullmatch(pattern, n))}
        first = 0 if v4 or longcat else fields["n_layers"]
        fields["mtp_depth"] = next(k for k in range(fields["mtp_depth"] + 1) if first + k not in have)
    try:
        return ModelConfig.from_dict(fields), raw
    except ConfigError as e:
        raise ConfigError(f"{path / 'config.json'}: {e}") from None


def distinct_head(files: dict[str, Path]) -> bool:
    """Whether the checkpoint holds an ``lm_head.weight`` beside its embedding of other values (read a block of rows
    at a time): transformers then leaves a config's tied embeddings untied, "both are present in the checkpoints
    with different values" (``PreTrainedModel.tie_weights``)."""
    own = {text_name(n): n for n in files} if is_wrapped(files) else {n: n for n in files}
    head, embed = own.get("lm_head.weight"), own.get("model.embed_tokens.weight")
    if head is None or embed is None:
        return False
    seen = tuple((str(files[n]), (st := os.stat(files[n])).st_mtime_ns, st.st_size) for n in (head, embed))
    if seen not in _DISTINCT:  # a load reads the config more than once: the tensors are compared once
        th, te = TensorFile(files[head]), TensorFile(files[embed])
        rows = th.shape(head)[0] if th.shape(head) else 0
        step = max(1, (64 << 20) // max(1, math.prod(th.shape(head)[1:]) * 4))  # 64 MiB of FP32 a read
        # values, as transformers compares them in the model's dtype: a BF16 and an FP32 copy of one matrix tie
        _DISTINCT[seen] = th.shape(head) != te.shape(embed) or any(
            not torch.equal(th.read(head, (lo, min(rows, lo + step))).float(),
                            te.read(embed, (lo, min(rows, lo + step))).float()) for lo in range(0, rows, step))
    return _DISTINCT[seen]


_DISTINCT: dict[tuple, bool] = {}  # ``distinct_head``'s answers, by the two files' paths, times and sizes


# a vision-language wrapper's text model (Kimi K2.5): its tensors under "language_model.", the decoder layers as
# the published files name them ("layers") or as transformers' save_pretrained writes them back ("blocks": it
# reverses the vision tower's blocks -> layers renaming on every name)
_WRAPPED = re.compile(r"language_model\.(?:(model\.)(?:blocks|layers)(\..+)|(.+))")


def is_wrapped(names) -> bool:
    """Whether a checkpoint's tensor ``names`` are a vision-language wrapper's (its text model under
    ``language_model.``)."""
    return any(n.startswith("language_model.") for n in names)


def text_name(name: str) -> str | None:
    """A wrapper's tensor ``name`` as its text model's own (``model.layers.i...``, ``lm_head.weight``), or None
    for the rest of the wrapper (vision tower, projector), which flyer does not read: it serves the text model."""
    m = _WRAPPED.fullmatch(name)
    if m is None:
        return None
    return f"{m.group(1)}layers{m.group(2)}" if m.group(1) else m.group(3)


def rope_half_layout(raw: dict) -> bool:
    """Whether a checkpoint's rope rows are in rotate-half layout."""
    raw = text_config(raw)
    mt = model_type(raw)
    if raw.get("model_type") in DSA_MODEL_TYPES:  # transformers' DeepseekV32 / GlmMoeDsa MLA: interleaved pairs
        return False
    if mt in ("deepseek_v3", "mistral4"):  # Mistral4's MLA is DeepseekV3's, rope_interleave included
        return raw.get("rope_interleave", True) is False
    return mt in HALF_ROPE_MODEL_TYPES  # DeepseekV2 rotates interleaved pairs (complex multiply)


def _ignored(name: str, cfg: ModelConfig) -> bool:
    if cfg.attn == "hybrid":  # scales go with their weights; MTP layers past mtp_depth are not built
        m = re.match(r"mtp\.(\d+)\.", name)
        return name.endswith(".scale") or (m is not None and (int(m.group(1)) >= cfg.mtp_depth
                                                               or name.startswith(V4_MTP_COPIES, m.end())))
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if m and int(m.group(1)) >= cfg.n_layers and m.group(2) in MTP_COPIES:
        return True
    if cfg.tie_embeddings and name == "lm_head.weight":
        return True
    if cfg.shortcut_moe and name.startswith(LONGCAT_MTP) and (cfg.mtp_depth == 0 or name == LONGCAT_MTP_EMBED):
        return True  # LongCat-Flash's MTP module when not built; its copy of the embedding always (shared)
    return name.endswith(("rotary_emb.inv_freq", SCALE_SUFFIX))


def hf_weight_map(cfg: ModelConfig, path: str | Path, rope_half: bool, files: dict[str, Path] | None = None,
                  headers: dict[Path, TensorFile] | None = None) -> dict[str, Slot]:
    """Every tensor of the directory's safetensors a model of ``cfg`` takes, by HF name, with its
    ``Slot``, checked from the files' headers alone before anything is read: a missing shard or
    tensor, a tensor the config does not expect or of the wrong shape is a ``CheckpointError``
    naming the file and the tensor. (Tensors flyer does not keep, such as DeepSeek's copies of
    the embedding and head beside each MTP layer, are left out.) ``headers``: the files' parsed
    headers, kept for reading them next."""
    path = Path(path)
    files = files if files is not None else weight_files(path)
    slots = hf_names(cfg, rope_half, has_fused_experts(files))
    state = meta_model(cfg).state_dict()
    headers = {} if headers is None else headers
    found: dict[str, Slot] = {}
    canonical = v4_name if cfg.attn == "hybrid" else text_name if is_wrapped(files) else str
    scheme = quant_scheme(path)  # compressed-tensors' or ModelOpt's quantized weights (``_codec``)
    codec = _codec(scheme)
    for name, f in files.items():
        stem = codec.compressed_stem(name, files, scheme) if scheme else None  # its codes read as <stem>.weight
        if stem is not None and name != codec.codes_name(stem, files):
            continue  # its scale, shape, zero point, g_idx: read with its codes
        own = name if stem is None else stem + ".weight"
        if canonical(own) is None or _ignored(canonical(own), cfg):  # None: a wrapper's vision tower, projector
            continue
        tf = header(headers, f)
        if name not in tf.entries:
            raise CheckpointError(f"{f}: tensor {name} is listed in the index but not in the file")
        slot = slots.get(canonical(own))
        if slot is None and stem is None and math.prod(tf.shape(name)) == 0:
            continue  # a zero-width module transformers saves (DeepseekV3's shared MLP at n_shared_experts 0)
        if slot is None:
            raise CheckpointError(f"{f}: tensor {name} is not expected by the config "
                                  f"(a different architecture or size?)")
        dest = state[slot.key] if slot.expert is None else state[slot.key][slot.expert]
        if slot.fused:
            dest = torch.cat([state[k] for k in slot.fused], dim=1)  # meta: a shape, no memory
        shape = tf.shape(name) if stem is None else codec.compressed_shape(name, files, headers, scheme)
        if scheme is not None and stem is None and len(shape) == 2:  # a weight its config_groups quantize: refused
            codec.check_unquantized(name, tf.path, scheme)
        kind = stored_format(name, files, tf.dtype(name))
        if kind == "fp4":  # DeepSeek-V4's experts: two values a byte
            shape = (*shape[:-1], 2 * shape[-1])
        if stem is None and kind == "plain" and dest.is_floating_point() \
                and not tf.dtype(name).is_floating_point:  # read as plain, its integers would be the values
            beside = f" (beside {name + SCALE_SUFFIX}: DeepSeek's FP8 codes are float8_e4m3fn)" \
                if name + SCALE_SUFFIX in files else ""
            raise CheckpointError(f"{f}: tensor {name} is stored as {tf.dtype(name)}{beside}, not as a weight's "
                                  f"floating point")
        if shape != tuple(dest.shape):
            held_as = "" if stem is None else f" (a {shape} weight)"  # quantized: the weight it decodes to
            raise CheckpointError(f"{f}: tensor {name} has shape {tf.shape(name)}{held_as}, "
                                  f"the config expects {tuple(dest.shape)}")
        found[name] = slot
    missing = sorted(set(slots) - {canonical(n.removesuffix(PACKED) + ".weight" if n.endswith(PACKED) else n)
                                   for n in found})
    if missing:
        raise CheckpointError(f"{path}: missing tensor {missing[0]}" + (f" (and {len(missing) - 1} more)"
                                                                         if len(missing) > 1 else ""))
    return found


def load_hf_weights(model: Transformer, path: str | Path, rope_half: bool,
                    files: dict[str, Path] | None = None,
                    place: Callable[[Slot], Slot | None] | None = None) -> None:
    """Fill ``model`` (any device; its parameters' dtypes are kept) from the directory's safetensors,
    one tensor at a time, after ``hf_weight_map`` has checked them. Into a model holding its weights
    (``flyer.infer.weights.empty_held``) each tensor is written as held: an E4M3 weight held as FP8
    keeps the file's own codes and block scales, anything else is rounded (or quantized) as held.
    ``place``: where a tensor's slot is in ``model`` when that holds part of the model (a rank's
    experts and stages), None for a tensor it does not hold (not read)."""
    files = files if files is not None else weight_files(Path(path))
    state = model.state_dict()
    headers: dict[Path, TensorFile] = {}
    scheme = quant_scheme(Path(path))
    for name, slot in hf_weight_map(model.cfg, path, rope_half, files, headers).items():
        if place is not None and (slot := place(slot)) is None:
            continue
        tf = header(headers, files[name])
        if slot.fused:
            fill_fused(model, tf, name, slot, files, headers, scheme)
            continue
        dest = state[slot.key] if slot.expert is None else state[slot.key][slot.expert]
        fill_tensor(model, dest, tf, name, slot, files, headers, scheme=scheme)


@torch.no_grad()
def fill_fused(model: Transformer, tf: TensorFile, name: str, slot: Slot, files: dict[str, Path],
               headers: dict[Path, TensorFile], scheme: CompressedConfig | ModelOptConfig | None = None) -> None:
    """Write the fused tensor ``name`` (``Slot.fused``: the stacks it concatenates on dim 1) into ``model``'s
    stacks, one expert at a time as ``fill_tensor`` reads any tensor, each part written as its stack is held: a
    rank holding experts ``first ..`` of the stacks (``Experts.first``, expert parallelism) reads only its
    experts, and no more than one expert's rows are in memory (a real Mistral 4 layer's stack is GBs)."""
    state = model.state_dict()
    parts = [state[k] for k in slot.fused]
    first = getattr(model.get_submodule(slot.key.rpartition(".")[0]), "first", 0)
    sizes = [p.shape[1] for p in parts]
    # FP8 held from an FP8 stack (transformers' fine-grained FP8 save): each part's codes are whole 128-row tiles
    # of the file's, kept with their scales as a per-expert tensor's are (its values requantized would move)
    codes_kept = (parts[0].dtype == FP8 and scheme is None and tf.dtype(name) == torch.float8_e4m3fn
                  and all(n % TILE == 0 for n in sizes[:-1]))
    tiles = [-(-n // TILE) for n in sizes]
    one = torch.empty((1, *tf.shape(name)[1:]), dtype=torch.float32 if parts[0].dtype == FP8 else parts[0].dtype)
    for e in range(len(parts[0])):
        rows = (first + e, first + e + 1)
        if codes_kept:
            codes, scale = fp8_blocks(tf, name, files, headers, rows)
            for key, dest, c, sc in zip(slot.fused, parts, codes[0].split(sizes), scale[0].split(tiles)):
                try:
                    write_fp8_codes(dest[e], held_scale(model, key, e), c, sc)
                except ValueError as err:  # NaN codes
                    raise CheckpointError(f"{tf.path}: tensor {name}: {err}") from None
            continue
        fill_tensor(None, one, tf, name, Slot(name), files, headers, rows=rows, scheme=scheme)
        for key, dest, value in zip(slot.fused, parts, one[0].split(sizes, dim=0)):
            if dest.dtype == FP8:  # held FP8: each expert with its own block scales
                write_weight(dest[e], value, held_scale(model, key, e))
            else:
                dest[e].copy_(value)


def fp8_blocks(tf: TensorFile, name: str, files: dict[str, Path], headers: dict[Path, TensorFile],
               rows: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, FP32 scales) of the FP8 weight ``name`` and its ``weight_scale_inv`` 128x128 block scales, both over
    ``rows`` of their first dimension when given (an expert stack's: (E, R, C) codes, (E, ceil(R/128), ceil(C/128))
    scales); ``CheckpointError`` when the scales are missing, of another shape, not finite or negative
    (``fp8_scales``, ``read_fp8_scales``). (A NaN code is refused in the values it dequantizes to, or as held.)"""
    sf, scale_name = fp8_scales(tf, name, files, headers)
    return tf.read(name, rows), read_fp8_scales(sf, scale_name, rows)


def fp8_scales(tf: TensorFile, name: str, files: dict[str, Path], headers: dict[Path, TensorFile]
               ) -> tuple[TensorFile, str]:
    """(file, name) of the FP8 weight ``name``'s ``weight_scale_inv``, checked from the headers: present, floating
    point, one per 128x128 block (``CheckpointError`` naming the file and tensor otherwise)."""
    scale_name = name + SCALE_SUFFIX
    if scale_name not in files:
        raise CheckpointError(f"{tf.path}: FP8 tensor {name} has no {scale_name}")
    sf = header(headers, files[scale_name])
    shape = tf.shape(name)
    blocks = (*shape[:-2], *(-(-n // TILE) for n in shape[-2:]))
    if sf.shape(scale_name) != blocks:
        raise CheckpointError(f"{sf.path}: tensor {scale_name} has shape {sf.shape(scale_name)}, "
                              f"128x128 blocks of {name} need {blocks}")
    if not sf.dtype(scale_name).is_floating_point:
        raise CheckpointError(f"{sf.path}: tensor {scale_name} is stored as {sf.dtype(scale_name)}: block scales are "
                              f"floating point")
    return sf, scale_name


def read_fp8_scales(sf: TensorFile, scale_name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """The FP32 block scales ``scale_name`` (over ``rows``); ``CheckpointError`` for one not finite or negative
    (a block's sign flipped: no quantizer writes one)."""
    scale = sf.read(scale_name, rows).float()
    check_finite(scale, sf.path, scale_name)
    if scale.numel() and scale.min() < 0:
        raise CheckpointError(f"{sf.path}: tensor {scale_name} holds negative block scales")
    return scale


@torch.no_grad()
def fill_tensor(model: Transformer, dest: torch.Tensor, tf: TensorFile, name: str, slot: Slot,
                files: dict[str, Path], headers: dict[Path, TensorFile], rows: tuple[int, int] | None = None,
                scheme: CompressedConfig | ModelOptConfig | None = None) -> None:
    """Write tensor ``name`` of ``tf`` into ``dest``, the parameter (or expert slice) ``slot`` names:
    FP8 dequantized with its block scales, or, held as FP8 codes, its codes and scales as they are
    (rope rows permuted as the values are) where the permutation keeps every row in its 128-row
    block (DeepSeek-V4's FP8 and FP4: ``held_e4m3_blocks``, exact or refused); rope rows permuted;
    read straight into the parameter when the dtypes agree; else
    written as the model holds it (``write_weight``). NaN or inf (values, codes, scales):
    ``CheckpointError``. ``rows``: only those of the tensor's first dimension (one expert of a
    stack: ``fill_fused``). ``scheme``: the checkpoint's compressed-tensors or ModelOpt weights (``quant_scheme``),
    decoded (``_codec``), or, FP8 held as FP8, kept as their codes where each 128x128 tile has one scale."""
    held = held_scale(model, slot.key, slot.expert) if dest.dtype == FP8 else None  # FP8 codes, held
    try:
        kind = stored_format(name, files, tf.dtype(name))  # "<name>.scale" beside it: DeepSeek-V4's only
        if scheme is None and name.endswith(PACKED):  # its bit width and layout are the config's
            raise CheckpointError(f"{tf.path}: tensor {name} is packed, but no quantization_config says how")
        if scheme is not None and _codec(scheme).compressed_stem(name, files, scheme) is not None:  # decoded, then
            kept = _codec(scheme).held_codes(tf, name, files, headers, scheme) if held is not None \
                and slot.scale == 1.0 else None  # FP8 codes whose tiles each have one scale: held as they are
            if kept is not None and _hold_codes(dest, held, *kept, slot):
                return
            t = _codec(scheme).read_compressed(tf, name, files, headers, scheme,  # as plain
                                               torch.float32 if dest.dtype == FP8 else dest.dtype)
            if rows is not None or t.shape != dest.shape:
                raise CheckpointError(f"{tf.path}: quantized tensor {name} holds a {tuple(t.shape)} weight, "
                                      f"{tuple(dest.shape)} expected")
        elif kind != "plain":  # DeepSeek-V4's FP8 (UE8M0 block scales) and FP4 (experts) weights
            scale_name = name.removesuffix(".weight") + ".scale"
            sf = header(headers, files[scale_name])
            data, scale = tf.read(name), sf.read(scale_name)
            if held is not None and slot.scale == 1.0:  # E4M3 codes and power-of-two block scales: exact values
                order = None if slot.rope_rows is None else permute_rope(torch.arange(len(dest)), slot.rope_rows)
                write_fp8_codes(dest, held, *held_e4m3_blocks(kind, data, scale, name, order))
                return
            decode = dequantize_ue8m0_blocks if kind == "fp8_ue8m0" else dequantize_fp4_e2m1
            t = decode(data, scale, name=name)
        elif tf.dtype(name) in (torch.float8_e4m3fn, torch.float8_e5m2):
            # DeepSeek's FP8 (128x128 blocks, ``weight_scale_inv``), or transformers' fine-grained FP8 save of fused
            # expert stacks (``gate_up_proj_scale_inv``: a stack of such blocks, read ``rows`` at a time)
            codes, scale = fp8_blocks(tf, name, files, headers, rows)
            if codes.dtype == torch.float8_e4m3fn and held is not None and slot.scale == 1.0 \
                    and _hold_codes(dest, held, codes, scale, slot):
                return
            t = dequantize_fp8_blocks(codes, scale) if codes.dim() == 2 else torch.stack(
                [dequantize_fp8_blocks(c, sc) for c, sc in zip(codes, scale)])
        elif (slot.rope_rows is None and slot.scale == 1.0 and tf.dtype(name) == dest.dtype and dest.is_contiguous()
              and dest.is_cpu):
            check_finite(tf.read_into(name, dest, rows), tf.path, name)
            return
        else:
            t = tf.read(name, rows)
        check_finite(t, tf.path, name)
        if slot.scale != 1.0:  # folded in FP32, rounded once to the destination's dtype
            t = t.float() * slot.scale
        write_weight(dest, t if slot.rope_rows is None else permute_rope(t, slot.rope_rows), held)
    except CheckpointError:
        raise
    except ValueError as e:  # NaN codes, read or quantized
        raise CheckpointError(f"{tf.path}: tensor {name}: {e}") from None


def _hold_codes(dest: torch.Tensor, held: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, slot: Slot) -> bool:
    """Write E4M3 ``codes`` and their FP32 128x128 block ``scale`` into the held ``dest`` / ``held`` as they are,
    rope rows permuted, when that keeps every row in its block (and so its scale); False (nothing written) if not."""
    moved = tile_keeping_order(codes.shape[0], slot)
    if moved is None:
        return False
    write_fp8_codes(dest, held, codes.view(torch.uint8)[moved].view(codes.dtype), scale)
    return True


def tile_keeping_order(rows: int, slot: Slot) -> torch.Tensor | None:
    """The order ``slot``'s rope permutation takes a weight's ``rows`` rows in, when it keeps every row in its 128-row
    tile (so FP8 codes keep their tile's scale); None when it moves one out."""
    order = torch.arange(rows)
    moved = order if slot.rope_rows is None else permute_rope(order, slot.rope_rows)
    return moved if torch.equal(moved // TILE, order // TILE) else None


def unquantized_weights(cfg: ModelConfig, path: str | Path, rope_half: bool,
                        files: dict[str, Path]) -> dict[str, torch.dtype]:
    """{state-dict key: dtype} of the tensors a checkpoint with FP8 (or V4's FP4) weights stores unquantized, for
    a model holding FP8 to hold them as stored (``empty_held``'s ``as_stored``: V4's BF16 compressors) rather
    than quantize them (FP32 for an expert module whose other stacks are stored quantized); {} for a checkpoint
    without FP8 weights (held FP8 then quantizes every GEMM weight)."""
    headers: dict[Path, TensorFile] = {}
    kinds = {n: (d, stored_format(n, files, d)) for n in files for d in [header(headers, files[n]).dtype(n)]}
    if all(d != FP8 and kind == "plain" for d, kind in kinds.values()):
        return {}
    out: dict[str, torch.dtype] = {}
    quantized: set[str] = set()  # the modules with a weight stored quantized
    for name, slot in hf_weight_map(cfg, path, rope_half, files, headers).items():
        d, kind = kinds[name]
        for key in slot.fused or (slot.key,):  # an expert stack stored in two dtypes: the wider
            if d != FP8 and kind == "plain":
                out[key] = d if out.get(key, d) == d else torch.float32
            else:
                quantized.add(key.rpartition(".")[0])
    # an expert module's stacks are held alike: with one stored quantized beside one stored plain (transformers' FP8
    # save quantizes only stacks of whole tiles), all in FP32, which BF16 would round the quantized one's values to
    return {k: torch.float32 if k.rpartition(".")[0] in quantized else d for k, d in out.items()}


# a one-byte float's code is NaN or infinite where these bits are all set: E4M3FN's NaN (it has no infinity),
# E5M2's exponent of ones (infinities and NaNs), UE8M0's NaN
_NON_FINITE_BITS = {torch.float8_e4m3fn: 0x7F, torch.float8_e5m2: 0x7C, torch.float8_e8m0fnu: 0xFF}


def check_finite(t: torch.Tensor, path: Path, name: str) -> None:
    """NaN or inf in a weight or scale is a corrupt checkpoint: refused as read, on every load path
    (the held kernels would compute with it silently)."""
    if not t.is_floating_point() or t.numel() == 0:
        return
    flat = t.reshape(-1)
    if flat.element_size() > 1:
        # one pass and no temporary: aminmax propagates NaN and returns any inf (isfinite().all() took 45x
        # as long on BF16, half of an export's time)
        lo, hi = torch.aminmax(flat)
        finite = math.isfinite(lo.item()) and math.isfinite(hi.item())
    else:  # FP8 has no aminmax nor isfinite: the bits of its non-finite codes, in slices (a small temporary; 4x as
        # fast as isfinite in FP16)
        bits, mask = flat.view(torch.uint8), _NON_FINITE_BITS[flat.dtype]
        finite = not any(bool(((bits[i:i + (1 << 24)] & mask) == mask).any()) for i in range(0, flat.numel(), 1 << 24))
    if not finite:
        raise CheckpointError(f"{path}: tensor {name} holds non-finite values (NaN or inf)")


def build_empty(cfg: ModelConfig, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> Transformer:
    """An uninitialised model in ``dtype`` on ``device`` (routers and their biases stay FP32, and the DSA
    indexer's head weights, as transformers keeps them)."""
    model = meta_model(cfg).to(dtype)
    for m in model.modules():
        if isinstance(m, Gate):
            m.float()
        if isinstance(m, Indexer):
            m.weights_proj.float()
    for name, p in model.named_parameters():  # DeepSeek-V4 stores and computes these in FP32
        if re.search(r"attn_sink$|\.ape$|(^|\.)hc_(attn|ffn|head)\.", name):
            p.data = p.data.float()
    return allocate(model, device)


def checkpoint_dtype(files: dict[str, Path]) -> torch.dtype:
    """The floating dtype the checkpoint stores (FP8 checkpoints: bfloat16, as DeepSeek's)."""
    for name, f in files.items():
        if name.endswith("embed_tokens.weight") or name == "embed.weight":  # DeepSeek-V4's hub name
            dt = TensorFile(f).dtype(name)
            return torch.bfloat16 if dt.itemsize == 1 else dt
    return torch.float32


def quant_scheme(path: Path) -> CompressedConfig | ModelOptConfig | None:
    """The quantized weights' schemes of the HF directory ``path``'s (text) config, None when it has none
    (``hf_config_quant.compressed_scheme``); a ModelOpt export whose config.json does not say it, from its
    hf_quant_config.json (NVIDIA's first FP4 releases)."""
    d = text_config(_read_json(path / "config.json"))
    extra = path / MODELOPT_CONFIG
    if d.get("quantization_config") is None and extra.is_file():
        q = _read_json(extra).get("quantization")
        if not isinstance(q, dict):
            raise ConfigError(f"{extra}: field 'quantization': expected ModelOpt's quantization object")
        return modelopt_config(q, str(extra), "quantization")
    return compressed_scheme(d)


def _codec(scheme: CompressedConfig | ModelOptConfig | None):
    """The module decoding ``scheme``'s quantized weights, each with the same functions: ModelOpt's NVFP4 or FP8
    (``flyer.interop.modelopt``) or compressed-tensors' integer, FP8 and NVFP4 ones (``flyer.interop.compressed``)."""
    return modelopt if isinstance(scheme, ModelOptConfig) else compressed


def load_hf(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
            held: torch.dtype | None = None) -> tuple[Transformer, ModelConfig, TextTokenizer]:
    """(model in eval mode, config, tokenizer) from a Hugging Face model directory. ``dtype``: the
    parameters' dtype (default: the checkpoint's; FP8 weights are dequantized to it); ``held``
    (with an FP32 ``dtype``): the GEMM weights held in BF16 or FP8 as they load
    (``flyer.infer.weights.empty_held``)."""
    path = Path(path)
    files = weight_files(path)
    cfg, raw = read_hf_config(path, files)
    tok = load_tokenizer(path, raw)
    dtype = dtype or checkpoint_dtype(files)
    if held not in (None, torch.float32) and dtype != torch.float32:
        raise ValueError(f"weights held in {held} compute in FP32 (dtype is {dtype})")
    model = build_empty(cfg, device, dtype) if held in (None, torch.float32) else \
        empty_held(cfg, held, device, unquantized_weights(cfg, path, rope_half_layout(raw), files))
    load_hf_weights(model, path, rope_half_layout(raw), files)
    return model.eval(), cfg, tok


__all__ = ["INDEX", "SINGLE", "TextTokenizer", "build_empty", "check_finite", "dequantize_fp8_blocks", "distinct_head",
           "fill_fused", "fill_tensor", "fp8_scales", "hf_weight_map", "is_hf_model_dir", "is_wrapped", "load_hf",
           "load_hf_weights", "load_tokenizer", "quant_scheme", "read_fp8_scales", "read_hf_config", "rope_half_layout",
           "text_name", "unquantized_weights", "weight_files"]
