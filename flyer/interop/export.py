"""Checkpoints out: a Hugging Face model directory transformers loads, from any flyer model.

``flyer export PATH --out DIR [--dtype bf16|fp32|fp8|int4|nvfp4] [--max-shard-size 5GB]`` writes
``config.json`` (``flyer.interop.export_config``: ``deepseek_v3`` for MLA with the sigmoid + bias gate,
``deepseek_v32`` for that with
DeepSeek Sparse Attention's indexer, ``glm_moe_dsa`` (GLM-5) for that with ``indexer_types`` (shared
selections; a model read from GLM-5 lists them), ``deepseek_v2`` for the softmax gate, ``llama`` / ``qwen2`` /
``qwen3`` for dense GQA, ``longcat_flash`` for MLA with zero experts or the shortcut MoE, ``mistral4`` for
MLA with the softmax gate renormalised or Llama 4's query temperature
(its routed experts fused, as transformers writes them), ``qwen3_moe`` for GQA with head norms and softmax-routed
experts, ``mixtral``
for GQA with them in every layer and no head norms, ``glm4_moe`` for GQA with partial rotary or
DeepseekV3's sigmoid router, its MTP modules kept), safetensors (one
file, or shards plus ``model.safetensors.index.json`` past the shard size), ``tokenizer.json`` with its
``tokenizer_config.json`` and a ``generation_config.json`` (a tiktoken tokenizer's files instead of the
tokenizer.json, Kimi's ``tiktoken.model`` and remote code, as they are and ``auto_map`` kept:
``flyer.data.tokenizer_copy``). MTP modules are written as DeepSeek's
checkpoints store them (decoder layer ``n_layers + k`` with copies of the embedding and head; DeepSeek-V4's as
its ``mtp.k.*``, which transformers' DeepseekV4 skips on load: the summary notes it; LongCat-Flash's one as its
``model.mtp.*`` with a copy of the embedding, which transformers' LongcatFlash skips);
Llama, Qwen2, Qwen3(-MoE) and Mixtral have no MTP module, so a GQA model's is left out (the summary says so); a
GQA model with routed experts exports as Mixtral or Qwen3-MoE where that computes it, else is refused.
``--dtype fp8`` writes DeepSeek's FP8 format: linear weights as float8_e4m3fn plus
``weight_scale_inv`` 128x128 block scales (flyer's ``quantize_blocks``; an FP8 source keeps its own
codes and scales); DeepSeek-V4 its published one (``v4_quant``: E4M3 with UE8M0 ``.scale`` blocks, routed
experts FP4, the rest BF16/FP32), a source in that format keeping its own. ``--dtype int4`` writes a DeepseekV3
model as Moonshot released Kimi K2-Thinking: its routed experts compressed-tensors' pack-quantized INT4 (groups
of 32 inputs, BF16 scales: ``int4_pack.quantize_int4``, bit for bit the library's own compression), the rest
BF16, with Kimi's ``quantization_config`` (``hf_config_quant.kimi_int4_config``). ``--dtype nvfp4`` writes every
linear layer (attention, dense and expert projections; not the head, routers or DSA's indexer head weights)
compressed-tensors' NVFP4 (``nvfp4_pack``: W4A16, bit for bit the library's own compression), the rest BF16; a
fused expert stack (Mistral 4's) stays BF16, as the library leaves parameters that are no Linear. A checkpoint
directory is
streamed: each tensor is read, converted and written
before the next (the model is never loaded), into a fresh directory beside
``--out`` that is renamed to it when complete: ``--out`` must be new or empty, nothing is
overwritten, and a failure leaves nothing behind. From an HF directory, or a run fine-tuned from
one (which carries them), its tokenizer and generation settings (chat template, special tokens,
EOS ids, sampling defaults) are carried through.

A run trained with FP4 QAT (``flyer train --fp4-experts``) exports the model it trained: its routed experts as
their FP4 values (``flyer.fp8.fp4.fp4_round_trip`` of the FP32 masters), exact in BF16 and FP32; DeepSeek-V4's FP8
format encodes the masters with the same rule (the same values, its FP4 codes); another FP8 export holds them as
E4M3 codes under power-of-two block scales (exact, ``held_e4m3_blocks``), not amax / 448 ones. ``--masters`` writes
the FP32 masters instead (to train on elsewhere), in BF16 or FP32.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import sys
from pathlib import Path
from typing import Callable

import torch

from flyer import kernels
from flyer.config import ModelConfig, parse_size
from flyer.data.chat_template import DEFAULT_CHAT_TEMPLATE
from flyer.data.tokenizer_copy import builds, read_tokenizer_files
from flyer.errors import CheckpointError, FieldError
from flyer.fp8.quant import TILE, quantize_blocks
from flyer.infer.weights import FP8, held_scale
from flyer.interop.export_config import eos_token_id, exported, hf_config, hf_model_type
from flyer.interop.hf import (INDEX, SCALE_SUFFIX, SINGLE, check_finite, fp8_scales, is_hf_model_dir, is_wrapped,
                              read_fp8_scales, read_hf_config, rope_half_layout, weight_files)
from flyer.interop.hf_names import LONGCAT_MTP_EMBED, Slot, hf_names, permute_rope, v4_name
from flyer.interop.hf_config import HALF_ROPE_MODEL_TYPES
from flyer.interop.hf_config_quant import KIMI_GROUP_SIZE
from flyer.interop.hf_tokenizer import TextTokenizer, read_json as _read_json
from flyer.interop.compressed import G_IDX, ZERO
from flyer.interop.int4_pack import PACKED, SCALE, SHAPE, dequantize_int4, packed_items
from flyer.interop.nvfp4_pack import nvfp4_items
from flyer.interop.load import settings_dir
from flyer.interop.streamed import StreamedCheckpoint
from flyer.interop.tensorfile import TensorFile, header, write_tensors
from flyer.interop.v4_quant import (dequantize_fp4_e2m1, dequantize_ue8m0_blocks, held_e4m3_blocks,
                                    published_format, quantize_fp4_e2m1, quantized_items, stored_format)
from flyer.model.transformer import Transformer
from flyer.train.checkpoint import fsync_path, settings_names

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp8": torch.float8_e4m3fn,
          "int4": torch.int32,  # int4: the routed experts' packed codes (the rest BF16)
          "nvfp4": torch.uint8}  # nvfp4: every linear's E2M1 codes, two a byte (the rest BF16)
# weights DeepSeek keeps in high precision in its FP8 checkpoints: embeddings, head, router, norms, and the DSA
# indexer's head weights (transformers computes them in FP32)
_NOT_FP8 = re.compile(r"(embed_tokens|lm_head|shared_head\.head|mlp\.gate|block_sparse_moe\.gate|router\.classifier|"
                      r"norm|weights_proj)\.weight$|\.bias$|_bias$")
# and in DeepSeek's FP8 format the MTP layer's eh_proj in its layout (model.layers.N): DeepSeek-V3's release keeps it
# in BF16 (vLLM's and SGLang's MTP loaders build it as a plain linear, with no scale to read); LongCat-Flash's FP8
# release quantizes its model.mtp one
_BF16_IN_FP8 = re.compile(r"^model\.layers\.\d+\.eh_proj\.weight$")


# what DeepSeek's checkpoints store in FP32 whatever the rest: the routers' correction biases, and DeepSeek-V4's
# attention sinks, compressor position biases and hyper-connection maps; LongCat-Flash's router (transformers keeps
# its classifier in FP32)
_KEEP_FP32 = re.compile(r"e_score_correction_bias$|ffn\.gate\.bias$|attn_sink$|\.ape$|hc_(attn|ffn|head)_\w+$|"
                        r"router\.classifier\.weight$")


Item = tuple[str, tuple[int, ...], torch.dtype, Callable[[], torch.Tensor]]
# HF name -> a source checkpoint's own quantized weight: (make codes, make weight_scale_inv) for FP8 blocks,
# (make (weight_packed, weight_scale, weight_shape),) for INT4
Codes = dict[str, tuple[Callable[[], torch.Tensor], ...]]
Read = Callable[[Slot], torch.Tensor]  # a flyer tensor, or one expert of a stack (slot.expert), in flyer's layout


def tensor_items(model: Transformer, dtype: str, codes: Codes | None = None) -> list[Item]:
    """(HF name, shape, dtype, make) of every tensor of ``model`` to write, in the model's order;
    ``make`` converts one tensor when called. FP8: quantizable weights and their
    ``weight_scale_inv`` (DeepSeek-V4: ``.scale``, ``v4_quant.quantized_items``), taken from ``codes``
    where it has them (else quantized)."""
    state = model.state_dict()

    def read(slot: Slot) -> torch.Tensor:
        t = state[slot.key] if slot.expert is None else state[slot.key][slot.expert]
        scale = held_scale(model, slot.key, slot.expert) if t.dtype == FP8 else None
        # a weight held as FP8 codes (flyer.infer.weights): its values, each code times its block's scale
        return t if scale is None else kernels.dequantize_held(t, scale)
    return _items(model.cfg, state, read, dtype, codes)


def _items(cfg: ModelConfig, state: dict[str, torch.Tensor], read: Read, dtype: str,
           codes: Codes | None, pow2: bool = False) -> list[Item]:
    """``tensor_items`` of a model whose state (``state``: its shapes, on any device, meta
    included) ``read`` gives one tensor at a time; ``pow2``: FP8 blocks quantized here take power-of-two scales
    (a source under ``scale_fmt`` "ue8m0": ``_source_scale_fmt``)."""
    cfg = exported(cfg)
    rope_half = hf_model_type(cfg) in HALF_ROPE_MODEL_TYPES
    items: list[Item] = []
    for name, slot in hf_names(cfg, rope_half, fused=hf_model_type(cfg) == "mistral4").items():
        shape = tuple(state[slot.key].shape[1:] if slot.expert is not None else state[slot.key].shape)
        if slot.fused:  # transformers' fused expert stacks: the parts concatenated on dim 1
            shape = (shape[0], sum(state[k].shape[1] for k in slot.fused), *shape[2:])

        def get(slot=slot) -> torch.Tensor:
            if slot.fused:
                return torch.cat([read(Slot(k)).detach().cpu() for k in slot.fused], dim=1)
            t = read(Slot(slot.key, slot.expert)).detach().cpu()  # no upcast: one converted copy of one tensor
            if slot.scale != 1.0:  # a scale folded in on the way in (LongCat-Flash's MLA) taken out, in FP32
                t = t.float() / slot.scale
            return t if slot.rope_rows is None else permute_rope(t, slot.rope_rows, inverse=True)
        v4 = published_format(name) if dtype == "fp8" and cfg.attn == "hybrid" else "plain"
        if v4 != "plain":  # DeepSeek-V4's format: E4M3 or FP4 codes with UE8M0 scales
            items += quantized_items(name, shape, v4, get, (codes or {}).get(name))
            continue
        if dtype == "int4" and slot.expert is not None:  # a routed expert (hf_config: DeepseekV3's, unfused)
            own = (codes or {}).get(name)
            items += packed_items(name, shape, get, KIMI_GROUP_SIZE, own=own and own[0])
            continue
        if dtype == "nvfp4" and len(shape) == 2 and not _NOT_FP8.search(name):  # nvfp4_pack.NVFP4_IGNORE's rest
            items += nvfp4_items(name, shape, get)
            continue
        if dtype == "fp8" and cfg.attn != "hybrid" and len(shape) == 2 and not _NOT_FP8.search(name) \
                and not _BF16_IN_FP8.match(name):
            rows_b, cols_b = -(-shape[0] // 128), -(-shape[1] // 128)
            own = (codes or {}).get(name) or _blocks_once(get, shape[1], pow2)
            items.append((name, shape, torch.float8_e4m3fn, own[0]))
            items.append((name + SCALE_SUFFIX, (rows_b, cols_b), torch.float32, own[1]))
            continue
        stored = state[slot.key].dtype
        keep = (stored if not stored.is_floating_point  # DeepSeek-V4's hash table: int64
                else torch.float32 if _KEEP_FP32.search(name) or dtype == "fp32" else torch.bfloat16)
        items.append((name, shape, keep, lambda get=get, keep=keep: get().to(keep)))
        if cfg.attn != "hybrid" and slot.key.startswith("mtp.") and slot.key.endswith(".enorm.weight"):
            pre = name[:-len("enorm.weight")]  # DeepSeek's V3 MTP layers carry the shared embedding and head too
            wdt = torch.float32 if dtype == "fp32" else torch.bfloat16
            copies = ((pre + "embed_tokens.weight", "embed.weight"), (pre + "shared_head.head.weight", "head.weight"))
            if cfg.shortcut_moe:  # LongCat-Flash's MTP module carries the embedding alone
                copies = ((LONGCAT_MTP_EMBED, "embed.weight"),)
            for copy_name, key in copies:
                items.append((copy_name, tuple(state[key].shape), wdt,
                              lambda key=key, wdt=wdt: read(Slot(key)).detach().cpu().to(wdt)))
    return items


def write_weights(items: list[Item], out: Path, max_shard_bytes: int) -> list[str]:
    """Shards of at most ``max_shard_bytes`` (a bigger tensor gets its own), with an index when more
    than one; returns the file names written."""
    def nbytes(it: Item) -> int:
        return torch.Size(it[1]).numel() * it[2].itemsize
    shards: list[list[Item]] = [[]]
    size = 0
    for it in items:
        if shards[-1] and size + nbytes(it) > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(it)
        size += nbytes(it)
    if len(shards) == 1:
        write_tensors(out / SINGLE, shards[0])
        return [SINGLE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    total = 0
    for fname, shard in zip(names, shards):
        total += write_tensors(out / fname, shard)
    weight_map = {it[0]: fname for fname, shard in zip(names, shards) for it in shard}
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return names


# the two JSON settings files are merged with flyer's fields (``_json_with``); the others transformers may write
# beside tokenizer.json (``settings_names``: chat templates, named ones too) are carried from a source as they are
_MERGED = ("tokenizer_config.json", "generation_config.json")


def _shard_limit(max_shard_size: str | int) -> int:
    limit = parse_size(max_shard_size, "max_shard_size") if isinstance(max_shard_size, str) else int(max_shard_size)
    if limit <= 0:
        raise FieldError("max_shard_size", f"must be positive (got {max_shard_size!r})")
    return limit


def _check_out(out: Path) -> None:
    """``out`` is new or an empty directory: an export never writes over anything (a run, a checkpoint,
    an older export whose index and shards would outlive the new files)."""
    try:
        if out.exists() and not out.is_dir():
            raise FieldError("out", f"{out} is a file, not a directory")
        if out.is_dir() and any(out.iterdir()):
            raise FieldError("out", f"{out} exists and is not empty (export writes a new directory)")
    except OSError as e:
        raise FieldError("out", f"{out}: {e.strerror or e}") from None


def _json_with(source: Path | None, name: str, ours: dict) -> dict:
    """The source directory's ``name`` with flyer's fields added where it has none (its chat template,
    special tokens, list of EOS ids and sampling defaults are the model's, not flyer's to change)."""
    theirs = _read_json(source / name) if source is not None and (source / name).is_file() else {}
    return {**{k: v for k, v in ours.items() if v is not None}, **theirs}


def export_model(model: Transformer, tok: TextTokenizer, out: str | Path, dtype: str = "bf16",
                 max_shard_size: str | int = "5GB", source: str | Path | None = None,
                 codes: Codes | None = None) -> dict:
    """Write ``model`` with its tokenizer as a new Hugging Face directory ``out`` (absent or empty;
    else ``FieldError``); returns a summary. ``source``: the directory whose tokenizer and generation
    settings are carried through (``flyer.interop.load.settings_dir``: the HF directory ``model``
    was read from, or a run's step directory carrying them); ``codes``: its FP8 blocks (``tensor_items``).
    Written into a fresh directory beside ``out`` and renamed to it when complete: an error or an
    interrupt leaves nothing behind, and a failed write is a ``FieldError`` naming ``out``. ``dtype``: one of
    ``DTYPES``, or ``torch.bfloat16`` / ``torch.float32`` for theirs (as ``load_pretrained`` takes them)."""
    dtype = {torch.bfloat16: "bf16", torch.float32: "fp32"}.get(dtype, dtype)
    if tok is None:
        raise TypeError("tok: the tokenizer to write beside the weights (load_pretrained's third value; an exported "
                        "directory is what AutoTokenizer loads too)")
    return _export(model.cfg, tok, lambda: tensor_items(model, dtype, codes), out, dtype, max_shard_size, source)


def _blocks_once(get: Callable[[], torch.Tensor], cols: int, pow2: bool) -> tuple[Callable[[], torch.Tensor], ...]:
    """(make codes, make weight_scale_inv) of ``get()``'s 128x128 blocks, read and quantized once for both: the
    codes are written first, their scales next, and only that one weight's are kept between the two."""
    kept: list = []

    def quantized():
        if not kept:
            kept.append(quantize_blocks(get(), pow2_scales=pow2))
        return kept[0]

    def scale() -> torch.Tensor:
        q = quantized()
        kept.clear()
        return q.scale
    return (lambda: quantized().data[:, :cols]), scale


def _export(cfg: ModelConfig, tok: TextTokenizer, items: Callable[[], list[Item]], out: str | Path, dtype: str,
            max_shard_size: str | int, source: Path | None, scale_fmt: str | None = None) -> dict:
    if dtype not in DTYPES:
        raise FieldError("dtype", f"must be one of {', '.join(DTYPES)} (got {dtype!r})")
    limit = _shard_limit(max_shard_size)
    config = hf_config(cfg, tok, dtype)  # fails before anything is written
    if scale_fmt is not None:
        config["quantization_config"]["scale_fmt"] = scale_fmt
    out, source = Path(out), source and Path(source)
    _check_out(out)
    tmp = out.parent / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.partial"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        files = write_weights(items(), tmp, limit)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        gen = _json_with(source, "generation_config.json",
                         {"bos_token_id": tok.bos_id(), "eos_token_id": eos_token_id(tok)})
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        # a tiktoken source (Kimi's): its files as they are, read by its remote code (trust_remote_code) and by
        # flyer with its cut of long runs, which a tokenizer.json cannot hold (flyer.data.tokenizer_copy)
        tiktoken = read_tokenizer_files(source, CheckpointError) if source is not None else {}
        for name, data in tiktoken.items():
            (tmp / name).write_bytes(data)
        if not tiktoken:
            (tmp / "tokenizer.json").write_text(_tokenizer_json(tok))
        tc = _json_with(source, "tokenizer_config.json", {
            "tokenizer_class": None if tiktoken else "PreTrainedTokenizerFast", "model_max_length": cfg.max_seq_len,
            "eos_token": tok.token(tok.eos_id()), "bos_token": tok.token(tok.bos_id())})
        if isinstance(tc.get("auto_map"), (dict, list)) and not tiktoken:  # a remote-code tokenizer whose export
            # is the tokenizer.json, which transformers reads without running the source's code
            tc = {k: v for k, v in tc.items() if k != "auto_map"} | {"tokenizer_class": "PreTrainedTokenizerFast"}
        (tmp / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))
        if tiktoken and not builds(tmp, tok.tok, CheckpointError):
            raise CheckpointError(f"{source}: its {', '.join(tiktoken)} do not build the tokenizer exported with "
                                  "the model (changed since it was read?)")
        if source is None:  # flyer's own tokenizer (or a --tokenizer file): the template it trained and serves with
            (tmp / "chat_template.jinja").write_text(DEFAULT_CHAT_TEMPLATE)
        for name in settings_names(source) if source is not None else ():
            if name not in _MERGED:
                (tmp / name).parent.mkdir(exist_ok=True)
                shutil.copyfile(source / name, tmp / name)
        for f in tmp.rglob("*"):  # on disk before the directory is renamed into place
            fsync_path(f)
        os.rename(tmp, out)  # onto an empty directory too; one that filled meanwhile fails: ENOTEMPTY
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # disk full, no permission, a path through a file
            raise FieldError("out", f"{out}: cannot write it ({e.strerror or e})") from None
        raise
    with contextlib.suppress(OSError):  # the export is complete; this only hurries the rename to disk
        fsync_path(out.parent)
    summary = {"out": str(out), "model_type": config["model_type"], "dtype": dtype, "files": files}
    if exported(cfg).mtp_depth < cfg.mtp_depth:
        summary["left_out"] = f"the MTP module ({cfg.mtp_depth} deep): {config['model_type']} has none"
    elif config["model_type"] == "deepseek_v4" and cfg.mtp_depth:
        summary["note"] = (f"the MTP module ({cfg.mtp_depth} deep) is written as DeepSeek's mtp.k.* tensors: "
                           "transformers' DeepseekV4 skips them (it has no MTP), DeepSeek's inference runs them")
    elif config["model_type"] == "longcat_flash" and cfg.mtp_depth:
        summary["note"] = ("the MTP module is written as LongCat-Flash's model.mtp.* tensors: transformers' "
                           "LongcatFlash skips them, SGLang and vLLM run them")
    return summary


def _tokenizer_json(tok: TextTokenizer) -> str:
    """``tok``'s tokenizer.json, encoding as ``tok`` does: a run's own tokenizer (flyer's, or a ``--tokenizer``
    file) encodes without special tokens, so a post-processor that would add them (a BOS the model never saw, which
    transformers and an HF directory's reader add) is left out."""
    text = tok.tok.to_str()
    probe = "a"
    if tok.add_special_tokens or tok.tok.encode(probe).ids == tok.tok.encode(probe, add_special_tokens=False).ids:
        return text
    return json.dumps(json.loads(text) | {"post_processor": None}, ensure_ascii=False)


def _source_scale_fmt(path: Path) -> str | None:
    """The FP8 checkpoint ``path``'s ``quantization_config.scale_fmt`` (DeepSeek-V3.1 / V3.2's "ue8m0": power-of-two
    block scales, and activations quantized so, which serving engines read from it), carried into its export."""
    quant = read_hf_config(path)[1].get("quantization_config") or {}
    return quant.get("scale_fmt")


def _source_codes(path: Path, cfg: ModelConfig, headers: dict[Path, TensorFile]) -> Codes:
    """The E4M3 weights of the FP8 checkpoint ``path`` with their block scales, read as they are (rope rows
    moved from its layout to the export's where every row keeps its 128-row block, and so its scale):
    requantizing their values would not give them back wherever a scale is not amax / 448."""
    files = weight_files(path)
    src_half = rope_half_layout(read_hf_config(path, files)[1])
    out_half = hf_model_type(exported(cfg)) in HALF_ROPE_MODEL_TYPES
    half_rows = hf_names(cfg, True)
    codes: Codes = {}
    for name, f in files.items():
        scale = name + SCALE_SUFFIX
        if scale not in files or name not in half_rows:
            continue
        tf = header(headers, f)
        if tf.dtype(name) != torch.float8_e4m3fn:
            continue
        rows = half_rows[name].rope_rows if src_half != out_half else None
        order = torch.arange(tf.shape(name)[0])
        moved = order if rows is None else permute_rope(order, rows, inverse=out_half)
        if not torch.equal(moved // TILE, order // TILE):
            continue  # quantized again from the exact values
        sf, scale = fp8_scales(tf, name, files, headers)  # checked as loading checks them, before any is written

        def data(tf=tf, name=name, moved=moved) -> torch.Tensor:
            check_finite(t := tf.read(name), tf.path, name)
            return t.view(torch.uint8)[moved].view(torch.float8_e4m3fn)
        codes[name] = (data, lambda sf=sf, scale=scale: read_fp8_scales(sf, scale))
    return codes


def _v4_source_codes(files: dict[str, Path], headers: dict[Path, TensorFile]) -> Codes:
    """The weights of the DeepSeek-V4 checkpoint ``files`` stored as the export stores them (``published_format``)
    with their UE8M0 scales, read as they are; each checked as the loader checks it (its scale's shape, NaN
    scale bytes or codes: a ``CheckpointError`` naming the file and the tensor) as it is written."""
    codes: Codes = {}
    for name, f in files.items():
        kind = stored_format(name, files, header(headers, f).dtype(name))
        if kind == "plain" or published_format(v4_name(name)) != kind:
            continue  # another format: quantized again from its exact values
        scale_name = name.removesuffix(".weight") + ".scale"
        tf, sf = header(headers, f), header(headers, files[scale_name])
        fp8 = kind == "fp8_ue8m0"

        def scale(sf=sf, scale_name=scale_name) -> torch.Tensor:  # UE8M0, or its bytes
            return sf.read(scale_name).view(torch.float8_e8m0fnu)

        def data(tf=tf, name=name, fp8=fp8, scale=scale) -> torch.Tensor:  # FP4: int8, uint8 or float4_e2m1fn_x2
            t = tf.read(name).view(torch.float8_e4m3fn if fp8 else torch.int8)
            try:
                (dequantize_ue8m0_blocks if fp8 else dequantize_fp4_e2m1)(t, scale(), name=name)
            except ValueError as e:
                raise CheckpointError(f"{tf.path}: tensor {name}: {e}") from None
            return t
        codes[v4_name(name)] = (data, scale)
    return codes


def _int4_source_codes(src: StreamedCheckpoint) -> Codes:
    """The routed experts of the pack-quantized INT4 checkpoint ``src`` (Kimi K2-Thinking's, K2.5's) stored as the
    export stores them (groups of 32 inputs, BF16 scales), read as they are, each checked as the loader checks it
    (``dequantize_int4``) when it is written: requantizing their values would not give their codes back wherever a
    scale is not absmax / 7.5 (Kimi's, from quantization-aware training)."""
    codes: Codes = {}
    for name, slot in hf_names(exported(src.cfg), hf_model_type(exported(src.cfg)) in HALF_ROPE_MODEL_TYPES).items():
        if slot.expert is None or (slot.key, slot.expert) not in (src.where or {}):
            continue
        stored = src.where[(slot.key, slot.expert)][0]  # a packed weight: its codes' name
        if not stored.endswith(PACKED):
            continue
        stem = stored.removesuffix(PACKED)
        cols = src.state[slot.key].shape[-1]
        tfs = [header(src.headers, src.files[stem + p]) for p in (PACKED, SCALE, SHAPE)]
        scale = tfs[1].dtype(stem + SCALE), tfs[1].shape(stem + SCALE)[-1:]
        kimi = tfs[0].shape(stem + PACKED)[-1:] == (-(-cols // 8),) and not any(
            stem + p in src.files for p in (ZERO, G_IDX))  # 4-bit codes, symmetric, columns in order
        if scale != (torch.bfloat16, (cols // KIMI_GROUP_SIZE,)) or not kimi:
            continue  # another scheme, group size or scale dtype: quantized again from the exact values

        def make(tfs=tfs, stem=stem) -> tuple[torch.Tensor, ...]:
            parts = [tf.read(stem + p) for tf, p in zip(tfs, (PACKED, SCALE, SHAPE))]
            try:
                dequantize_int4(*parts, name=stem + PACKED)
            except ValueError as e:
                raise CheckpointError(f"{tfs[0].path}: {e}") from None
            return tuple(parts)
        codes[name] = (make,)
    return codes


def _fp4_block_codes(cfg: ModelConfig, read: Read, fp4_keys: set[str]) -> Codes:
    """The routed experts of ``fp4_keys`` (their FP4 values, as ``read`` gives them) as E4M3 codes with FP32
    power-of-two 128x128 block scales (``held_e4m3_blocks``): DeepSeek's FP8 format holding the FP4 values exactly
    (a block it cannot hold is a ``FieldError`` naming the weight: export it in BF16). Each weight is encoded once,
    when its codes are written, and its scale kept until then."""
    codes: Codes = {}
    for name, slot in hf_names(exported(cfg), hf_model_type(exported(cfg)) in HALF_ROPE_MODEL_TYPES).items():
        if slot.key not in fp4_keys or hf_model_type(cfg) == "mistral4":  # fused 3-D stacks: never E4M3
            continue
        pair: list[tuple[torch.Tensor, torch.Tensor]] = []

        def make(i: int, name=name, slot=slot, pair=pair) -> torch.Tensor:
            if not pair:
                try:
                    pair.append(held_e4m3_blocks("fp4", *quantize_fp4_e2m1(read(slot), name=name), name))
                except ValueError as e:
                    raise FieldError("dtype", f"fp8: {e}") from None
            return pair.pop()[1] if i == 1 else pair[0][0]
        codes[name] = (lambda make=make: make(0), lambda make=make: make(1))
    return codes


def _check_special_ids(path, tok, vocab_size: int) -> None:
    """A ``CheckpointError`` for a BOS or EOS id outside the model's vocabulary, or a tokenizer with more tokens than
    it (as ``flyer train --init`` refuses one): written on, the export's readers would stop on a token that can
    never be sampled, begin every prompt with one the embedding has not, or fail on a text that encodes to one."""
    if (n := tok.tok.get_vocab_size(with_added_tokens=True)) > vocab_size:
        raise CheckpointError(f"{path}: its tokenizer has {n} tokens, more than its model's vocab_size {vocab_size}")
    for kind, ids in (("eos", tok.eos_ids()), ("bos", () if tok.bos_id() is None else (tok.bos_id(),))):
        if bad := [i for i in ids if not 0 <= i < vocab_size]:
            raise CheckpointError(f"{path}: its {kind}_token_id {bad[0]} is outside the model's vocabulary "
                                  f"[0, {vocab_size}): fix generation_config.json's or config.json's {kind}_token_id")


def export(path: str | Path, out: str | Path, dtype: str = "bf16", max_shard_size: str | int = "5GB",
           masters: bool = False) -> dict:
    """``export_model`` of the checkpoint at ``path`` (a flyer run or step directory, or an HF
    directory), streamed: each tensor is read, converted and written before the next
    (``StreamedCheckpoint``). An FP8 checkpoint's weights are read as their exact values (code times block
    scale), and export to FP8 with its own codes and scales: export then import is the identity.
    A run trained with FP4 QAT exports its routed experts as their FP4 values in every dtype (module
    docstring), or, with ``masters``, as the FP32 masters (BF16 or FP32 only). The summary's
    ``routed_experts`` says which, for such a run."""
    if dtype not in DTYPES:
        raise FieldError("dtype", f"must be one of {', '.join(DTYPES)} (got {dtype!r})")
    _shard_limit(max_shard_size)
    _check_out(Path(out))  # before the checkpoint is read for nothing
    if masters and is_hf_model_dir(path):
        raise FieldError("masters", f"applies to a flyer run trained with FP4 QAT (--fp4-experts); {path} is a "
                                    "Hugging Face directory")
    src = StreamedCheckpoint(path)
    _check_special_ids(path, src.tok, src.cfg.vocab_size)
    source = settings_dir(path)  # an HF directory, or a run fine-tuned from one: its tokenizer settings
    hybrid = src.cfg.attn == "hybrid"
    codes = None
    if masters and not src.qat:
        raise FieldError("masters", f"applies to a run trained with FP4 QAT (--fp4-experts); {path} was not: its "
                                    "weights are its masters already")
    if masters and dtype in ("fp8", "int4", "nvfp4"):
        raise FieldError("masters", "the FP32 masters need --dtype bf16 or fp32: an FP8, INT4 or NVFP4 export stores "
                                    "the routed experts in FP4 (DeepSeek-V4), E4M3, INT4 or NVFP4, not the masters")
    if masters or (dtype == "fp8" and hybrid):  # V4's FP4 encoder applies the rule to the masters: same values
        src.fp4_keys = set()
    if dtype == "fp8" and src.where is not None and hybrid:  # an HF directory: V4's own format
        codes = _v4_source_codes(src.files, src.headers)
    elif dtype == "fp8" and src.fp8:
        codes = _source_codes(source, src.cfg, src.headers)
    elif dtype == "int4" and src.where is not None:  # a Kimi INT4 source keeps its own codes and scales
        codes = _int4_source_codes(src)
    elif dtype == "fp8" and src.fp4_keys:  # DeepSeek's FP8 format under power-of-two block scales: exact
        codes = _fp4_block_codes(src.cfg, src.read, src.fp4_keys)
    fmt = _source_scale_fmt(source) if dtype == "fp8" and src.fp8 and not hybrid else None
    summary = _export(src.cfg, src.tok, lambda: _items(src.cfg, src.state, src.read, dtype, codes, fmt == "ue8m0"),
                      out, dtype, max_shard_size, source, fmt)
    if src.where is not None and is_wrapped(src.files):  # Kimi K2.5: the text model only, said
        summary["left_out"] = ("the vision-language wrapper's vision tower and projector: flyer reads and writes its "
                               "text model")
    if src.qat:
        summary["routed_experts"] = ("the FP32 masters (--masters)" if masters else
                                     "their FP4 values: the model FP4 QAT (--fp4-experts) trained")
    return summary


def _run(args) -> int:
    try:
        summary = export(args.path, args.out, args.dtype, args.max_shard_size, args.masters)
    except CheckpointError as e:  # what is wrong with the checkpoint read, named as the argument that gave it
        raise FieldError("path", str(e)) from None
    print(json.dumps(summary))
    sys.stdout.flush()
    return 0


PATHS = {"path", "out"}  # paths that may not be empty (flyer.cli)


def register(sub) -> None:
    p = sub.add_parser("export", help="write a checkpoint as a Hugging Face model directory (transformers loads it)")
    p.add_argument("path", help="a flyer run or step directory, or a Hugging Face model directory")
    p.add_argument("--out", required=True, help="the directory to write (new, or empty)")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16",
                   help="bf16 (default), fp32, fp8 (DeepSeek's float8_e4m3fn + 128x128 weight_scale_inv; for "
                        "DeepSeek-V4 its published format: UE8M0 .scale blocks, FP4 routed experts), or int4 "
                        "(Kimi K2-Thinking's: routed experts compressed-tensors pack-quantized INT4 in groups of "
                        "32, the rest BF16; DeepseekV3 models), or nvfp4 (every linear but the head and routers "
                        "compressed-tensors' NVFP4, W4A16, as llm-compressor's NVFP4A16 writes it; the rest BF16)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB or 500MB")
    p.add_argument("--masters", action="store_true",
                   help="a run trained with FP4 QAT (--fp4-experts) exports the model it trained, its routed experts "
                        "as their FP4 values (in every dtype); --masters writes their FP32 master weights instead, "
                        "to train on elsewhere (--dtype bf16 or fp32)")
    p.set_defaults(func=_run)


__all__ = ["export", "export_model", "parse_size", "register", "tensor_items"]
