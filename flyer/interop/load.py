"""One entry point for every checkpoint flyer takes: a flyer run, a flyer step directory, or a
Hugging Face model directory, told apart by what the directory holds.

A run trained with FP4 QAT (``flyer train --fp4-experts``) checkpoints the FP32 masters of its routed experts, but
trained and evaluated the model whose experts are their FP4 values (``flyer.fp8.fp4``). Loaded for inference
(``load_pretrained``) each routed expert stack goes through the FP4 round trip once, as it is read, so inference
runs that model; held in BF16 or FP8 it stays exact (``fp4_expert_values``). ``--init`` reads the masters: training
goes on from them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch import nn

from flyer.config import ModelConfig, resolve_device
from flyer.data.tokenizer import tokenizer_file
from flyer.data.tokenizer_copy import read_tokenizer_files
from flyer.errors import CheckpointError
from flyer.fp8.fp4 import fp4_round_trip
from flyer.infer.weights import FP8, WEIGHT_DTYPES, empty_held, held_scale, hold_weights, write_fp8_codes
from flyer.interop import compressed, modelopt
from flyer.interop.compressed import SCALE
from flyer.interop.fp8_scaled import tiles_in_blocks
from flyer.interop.hf import (SCALE_SUFFIX, build_empty, checkpoint_dtype, fill_tensor, hf_weight_map,
                              is_hf_model_dir, load_hf, load_hf_weights, quant_scheme, read_hf_config,
                              rope_half_layout, tile_keeping_order, unquantized_weights, weight_files)
from flyer.interop.hf_config_quant import MXFP4, NVFP4, CompressedConfig, ModelOptConfig
from flyer.interop.hf_names import Slot
from flyer.interop.hf_tokenizer import TextTokenizer, load_tokenizer, read_json as _read_json
from flyer.interop.tensorfile import TensorFile, header
from flyer.interop.v4_quant import held_e4m3_blocks, quantize_fp4_e2m1, stored_format
from flyer.model.experts import Experts
from flyer.model.transformer import Transformer
from flyer.train.checkpoint import (check_model_weights, inference_checkpoint, resolve_checkpoint_path, settings_names,
                                   trained_fp4_experts)


def load_pretrained(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    held: torch.dtype | None = None) -> tuple[Transformer, ModelConfig, TextTokenizer]:
    """(model in eval mode, config, tokenizer with its EOS) from ``path``. ``dtype``: parameter dtype
    of an HF import (default: the checkpoint's); a flyer run loads in FP32, as it trains. ``held``: an FP32
    model whose GEMM weights are held in BF16 or FP8 (``flyer.infer.weights``), written as held
    tensor by tensor: the FP32 weights are never in memory. A run trained with FP4 QAT (``fp4_trained``)
    loads its routed experts as their FP4 values, the model it trained (module docstring). ``device``: a
    ``torch.device`` or its name (``auto``, ``cpu``, ``cuda:N``: ``flyer.config.resolve_device``); ``dtype`` / ``held``:
    a ``torch.dtype`` or its name (``bf16``, ``bfloat16``, ``fp32``, ...)."""
    if not Path(path).exists():
        raise CheckpointError(f"{path}: does not exist")
    device = resolve_device(device) if isinstance(device, str) else device
    dtype, held = _dtype(dtype, "dtype"), _dtype(held, "held")
    if is_hf_model_dir(path):
        return load_hf(path, device, dtype, held)
    ckpt, cfg, tok = inference_checkpoint(path)
    text_tok = run_tokenizer(ckpt, tok)  # a bad settings file fails before the weights are read
    model = empty_held(cfg, held or torch.float32, device)
    _fill_from_run(model, ckpt, fp4=trained_fp4_experts(ckpt))
    return model, cfg, text_tok


def _dtype(value, field: str) -> torch.dtype | None:
    """``value`` as a ``torch.dtype``: None, a dtype, flyer's name of one (``WEIGHT_DTYPES``: "fp8" for ``held`` only)
    or torch's ("bfloat16"); ``TypeError`` naming ``field`` for anything else, and for a dtype the model cannot
    compute in (``dtype``: a float of 16 bits or more; ``held``: ``WEIGHT_DTYPES``' only; an E4M3 ``dtype`` would
    cast the weights without their scales)."""
    if value is None:
        return value
    short = {k: v for k, v in WEIGHT_DTYPES.items() if field == "held" or v != FP8}
    named = short.get(value, getattr(torch, value, None)) if isinstance(value, str) else value
    if isinstance(named, torch.dtype) and (named in WEIGHT_DTYPES.values() if field == "held" else
                                           named.is_floating_point and named.itemsize > 1):
        return named
    raise TypeError(f"{field}: a torch.dtype or one of {', '.join(sorted(short))} or torch's name of one "
                    f"(got {value!r})")


def fp4_trained(path: str | Path) -> bool:
    """Whether ``load_pretrained(path)`` loads routed experts as their FP4 values: a flyer run (or step directory)
    whose checkpoint trained them with FP4 QAT (``flyer.train.checkpoint.trained_fp4_experts``); never an HF
    directory (DeepSeek-V4's stores the FP4 codes themselves)."""
    return not is_hf_model_dir(path) and trained_fp4_experts(resolve_checkpoint_path(path))


def expert_stack_keys(model: nn.Module) -> set[str]:
    """State-dict keys of ``model``'s routed expert stacks (``Experts``' w1, w2, w3): what FP4 QAT quantizes."""
    return {f"{name}.{w}" for name, m in model.named_modules() if isinstance(m, Experts) for w in ("w1", "w2", "w3")}


@torch.no_grad()
def fp4_expert_values(model: nn.Module, key: str, dest: torch.Tensor, master: torch.Tensor) -> None:
    """Write the FP4 values of the routed expert stack ``master`` (E, N, K) FP32, the values FP4 QAT's forward
    multiplies by (``fp4_round_trip``), into ``dest``, ``model``'s parameter ``key`` as it is held. FP32 and BF16
    hold them exactly (a code of E2M1 has 2 significant bits, and its UE8M0 scale's range, 2**-127 to 2**127, is
    within BF16's, subnormals included). FP8 (``HeldFP8Experts``): E4M3 codes under a power-of-two scale per
    128x128 block (``held_e4m3_blocks`` of the FP4 encoding, which is the round trip's), exact, or a ValueError
    naming the weight where a block's group scales span more binades than E4M3 holds; never amax / 448 blocks,
    which round about half of the FP4 values again (tests/test_fp4_inference.py)."""
    scale = held_scale(model, key) if dest.dtype == FP8 else None
    if scale is None:
        dest.copy_(fp4_round_trip(master))
        return
    for e in range(master.shape[0]):
        name = f"{key}[{e}]"
        write_fp8_codes(dest[e], scale[e], *held_e4m3_blocks("fp4", *quantize_fp4_e2m1(master[e], name=name), name))


def _carries_settings(ckpt: Path) -> bool:
    return bool(settings_names(ckpt))


def settings_dir(path: str | Path) -> Path | None:
    """The directory whose tokenizer_config.json, generation_config.json and chat template describe the
    checkpoint at ``path``: an HF directory itself; a flyer run or step directory's (resolved) step
    directory when it carries them (fine-tuned from an HF directory: ``settings_names``); else None
    (flyer's own tokenizer: its named EOS, the default chat template). A path holding no valid
    checkpoint: ``CheckpointError``."""
    if is_hf_model_dir(path):
        return Path(path)
    ckpt = resolve_checkpoint_path(path)
    return ckpt if _carries_settings(ckpt) else None


def read_settings(path: str | Path) -> dict[str, bytes]:
    """The settings files (``settings_names``) the directory ``path`` (HF, or a flyer step directory) has, name -> its
    bytes as they are, for a run to carry, and a tiktoken tokenizer's files (``read_tokenizer_files``: Kimi's
    tiktoken.model and remote code, which a tokenizer.json cannot stand in for). A JSON one that is not a JSON
    object is a one-line ``CheckpointError`` naming it (as a reader of it would give), so a run refuses it when it
    starts."""
    found = {}
    for name in settings_names(Path(path)):
        f = Path(path) / name
        if f.suffix == ".json":
            _read_json(f)
        try:
            found[name] = f.read_bytes()
        except OSError as e:
            raise CheckpointError(f"{f}: cannot read ({e.strerror or e})") from None
    return found | read_tokenizer_files(path, CheckpointError)


def run_tokenizer(ckpt: Path, tok: Tokenizer) -> TextTokenizer:
    """The tokenizer of the flyer step directory ``ckpt``, whose tokenizer.json is ``tok``. One that
    carries an HF directory's settings reads as that directory does (``flyer.interop.hf_tokenizer.load_tokenizer``:
    its BOS, its EOS ids from generation_config.json or tokenizer_config.json, special tokens added);
    flyer's own: the named EOS, no special tokens."""
    if not _carries_settings(ckpt):
        return TextTokenizer(tok)
    read_settings(ckpt)  # each carried JSON file checked, whether or not the tokenizer reads it
    return load_tokenizer(ckpt, {})  # the step's config.json is flyer's model config, not the HF one


def _fill_from_run(model: nn.Module, ckpt: Path, stacks: dict[str, tuple[int, int]] | None = None,
                   fp4: bool = False) -> None:
    """Fill ``model`` from the flyer checkpoint ``ckpt``'s weights one tensor at a time (loading takes
    the model's memory, not twice it), their names and shapes checked against the whole model's.
    A model holding part of it (a pipeline rank's stages) skips the rest; ``stacks``: the rows
    (experts) of each expert stack it holds, read alone. ``fp4``: routed expert stacks as their FP4 values
    (``fp4_expert_values``), each read in FP32 first (and checked as any tensor is)."""
    files, headers = run_weights(ckpt, model.cfg)
    state = model.state_dict()
    quantized = expert_stack_keys(model) if fp4 else set()
    for k, path in files.items():
        if k not in state:
            continue
        rows = (stacks or {}).get(k)
        if k not in quantized:
            fill_tensor(model, state[k], headers[path], k, Slot(k), files, headers, rows)
            continue
        master = torch.empty(state[k].shape, dtype=torch.float32, device="cpu")
        fill_tensor(None, master, headers[path], k, Slot(k), files, headers, rows)
        try:
            fp4_expert_values(model, k, state[k], master)
        except ValueError as e:  # FP8 cannot hold a block
            raise CheckpointError(f"{path}: tensor {k}: {e}") from None


def run_weights(ckpt: Path, cfg: ModelConfig) -> tuple[dict[str, Path], dict[Path, TensorFile]]:
    """The weights of flyer checkpoint ``ckpt`` (its one file, or its ranks' parts): tensor name -> file, and each
    file's header; their names and shapes checked against the whole model's (``cfg``)."""
    files = weight_files(ckpt)
    headers = {path: TensorFile(path) for path in sorted(set(files.values()))}
    with torch.device("meta"):
        whole = Transformer(cfg)
    check_model_weights(whole, {k: headers[path].shape(k) for k, path in files.items()}, f"checkpoint {ckpt}")
    return files, headers


def loaded_bytes(path: str | Path, dtype: torch.dtype | None = None, held: torch.dtype | None = None) -> int:
    """Bytes of the model ``load_pretrained(path, dtype=dtype, held=held)`` allocates (its parameters
    and buffers), counted on the meta device from the checkpoint's config before anything is read:
    what ``require_memory`` checks first."""
    as_stored = {}
    if is_hf_model_dir(path):
        files = weight_files(Path(path))
        (cfg, raw), dtype = read_hf_config(path, files), dtype or checkpoint_dtype(files)
        if held == FP8:  # what an FP8 checkpoint stores unquantized is held as stored (load_hf)
            as_stored = unquantized_weights(cfg, path, rope_half_layout(raw), files)
    else:
        cfg, dtype = init_source(path)[0], torch.float32
    model = build_empty(cfg, "meta", dtype)
    hold_weights(model, held or torch.float32, as_stored)
    unique = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in unique.values())


def stored_weight_dtype(path: str | Path) -> str:
    """The smallest ``--weight-dtype`` that holds the checkpoint at ``path``'s GEMM weights losslessly, decided from
    its config and tensor headers (no tensor is read):

    * "fp8" for DeepSeek's FP8 formats, V3's (E4M3 with FP32 ``weight_scale_inv`` blocks) and V4's (``<stem>.scale``
      beside an E4M3 weight, or an FP4 expert's: ``stored_format``), both held exactly as FP8;
    * a compressed-tensors or ModelOpt checkpoint (``quant_scheme``), by its held quantized weights: "fp8" when each
      is FP8 whose codes a model holding FP8 keeps (``_kept_as_codes``: a scale per tensor, as ModelOpt's, or blocks
      of multiples of 128), each held as code x scale in FP32 (exact; the decoding rounds it to a BF16 scale's
      dtype, as compressed-tensors does); else "bf16" when each decodes to BF16 values (``_bf16_exact``: integer or
      FP8 codes, per channel or in other blocks, with BF16 scales; MXFP4, E2M1 x a power of two) and the embedding
      is BF16; else "fp32" (FP16 or FP32 scales; NVFP4, E2M1 x E4M3 / an FP32 global scale). MXFP4 is never "fp8":
      its groups would fit E4M3 blocks only where their scales span few binades (as V4's FP4 experts are held), and
      this load path decodes and quantizes them anew;
    * else "bf16" or "fp32" by its embedding's dtype."""
    if is_hf_model_dir(path):
        files = weight_files(Path(path))
        scaled = [n[:-len(SCALE_SUFFIX)] for n in files if n.endswith(SCALE_SUFFIX)]
        if scaled and TensorFile(files[scaled[0]]).dtype(scaled[0]) == torch.float8_e4m3fn:
            return "fp8"
        v4 = next((w for w in (n.removesuffix(".scale") + ".weight" for n in files if n.endswith(".scale"))
                   if w in files), None)
        if v4 and stored_format(v4, files, TensorFile(files[v4]).dtype(v4)) != "plain":
            return "fp8"
        plain = "bf16" if checkpoint_dtype(files) == torch.bfloat16 else "fp32"
        scheme = quant_scheme(Path(path))
        if scheme is None:
            return plain
        kept, bf16 = _quantized_weights(Path(path), files, scheme)
        return "fp8" if kept else "bf16" if bf16 and plain == "bf16" else "fp32"
    ckpt = inference_checkpoint(path)[0]
    files = weight_files(ckpt)  # the embedding's file alone is read: loading checks every name and shape
    if "embed.weight" not in files:
        raise CheckpointError(f"checkpoint {ckpt}: its weights have no embed.weight")
    return "bf16" if TensorFile(files["embed.weight"]).dtype("embed.weight") == torch.bfloat16 else "fp32"


def _quantized_weights(path: Path, files: dict[str, Path],
                       scheme: CompressedConfig | ModelOptConfig) -> tuple[bool, bool]:
    """(every quantized GEMM weight of the checkpoint ``path`` is held FP8 as its own codes, every one's decoded
    value is exact in BF16), from its headers (``stored_weight_dtype``); a quantized weight the model does not hold
    (an embedding: FP32 in a model holding its weights) counts for neither, and with none held nothing is FP8."""
    cfg, raw = read_hf_config(path, files)
    model = build_empty(cfg, "meta", torch.float32)
    hold_weights(model, torch.bfloat16)
    held = {k for k, v in model.state_dict().items() if v.dtype == torch.bfloat16}
    codec = modelopt if isinstance(scheme, ModelOptConfig) else compressed
    headers: dict[Path, TensorFile] = {}
    kept, bf16, found = True, True, False
    for name, slot in hf_weight_map(cfg, path, rope_half_layout(raw), files, headers).items():
        stem = codec.compressed_stem(name, files, scheme)
        if stem is None or not held & set(slot.fused or (slot.key,)):
            continue
        shape = codec.compressed_shape(name, files, headers, scheme)
        scale = header(headers, files[stem + SCALE]).dtype(stem + SCALE)
        if isinstance(scheme, ModelOptConfig):
            fmt, block = scheme.algo, shape if scheme.algo == "FP8" else None
        else:
            s = compressed.scheme_of(name, stem, scheme, files[name])
            fmt, block = s.format, None if s.fp8 is None else compressed.fp8_block(s, *shape)
        found = True
        kept = kept and block is not None and _kept_as_codes(shape, block, slot)
        bf16 = bf16 and slot.scale == 1.0 and _bf16_exact(fmt, scale)
    return kept and found, bf16


def _kept_as_codes(shape: tuple[int, int], block: tuple[int, int], slot: Slot) -> bool:
    """Whether ``fill_tensor`` writes an FP8 weight of ``shape`` with a scale per ``block`` into its ``slot`` held as
    FP8 as its own codes (``hf._hold_codes``), rather than decoding and quantizing it anew."""
    return tiles_in_blocks(shape, block) and slot.scale == 1.0 and not slot.fused \
        and tile_keeping_order(shape[0], slot) is not None


def _bf16_exact(fmt: str, scale: torch.dtype) -> bool:
    """Whether every value a quantized weight of format ``fmt`` (compressed-tensors' ``format``, or ModelOpt's
    ``quant_algo``) with scales of dtype ``scale`` decodes to is a BF16 value (``stored_weight_dtype``)."""
    if fmt in (NVFP4, "NVFP4"):  # code x (E4M3 block / FP32 global), rounded in FP32
        return False
    # MXFP4's values are BF16 ones whatever its UE8M0 scales; integer and E4M3 codes x a scale are rounded to the
    # scale's dtype (compressed.dequantize, fp8_scaled.decode_fp8)
    return fmt == MXFP4 or scale == torch.bfloat16


def init_source(path: str | Path) -> tuple[ModelConfig, Path]:
    """(model config, its tokenizer file) of a checkpoint to fine-tune from (``flyer train --init``): a
    tokenizer.json, or the tiktoken.model of an HF directory or checkpoint that has only that (``tokenizer_file``:
    Kimi's, or a run fine-tuned from it)."""
    if is_hf_model_dir(path):
        return read_hf_config(path, weight_files(Path(path)))[0], tokenizer_file(path)
    ckpt = resolve_checkpoint_path(path)
    try:
        cfg = ModelConfig.from_dict(json.loads((ckpt / "config.json").read_text()))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {ckpt}: bad config.json ({e})") from None
    return cfg, tokenizer_file(ckpt)


@torch.no_grad()
def load_init_weights(model: nn.Module, path: str | Path) -> None:
    """Fill ``model`` with the weights of ``path``: a ``Transformer``, or what one rank holds of it
    (its slice of each expert stack under expert parallelism, its stages' modules under
    pipelining), tensor by tensor. A rank reads only the tensors, and the experts, it holds."""
    state = model.state_dict()
    local = {f"{name}.{w}": (m.first, m.first + m.n_local) for name, m in model.named_modules()
             if isinstance(m, Experts) for w in ("w1", "w2", "w3")}
    if not is_hf_model_dir(path):  # a run trained with FP4 QAT: its masters, which training goes on from
        _fill_from_run(model, resolve_checkpoint_path(path), local)
        return

    def place(slot: Slot) -> Slot | None:
        if slot.key not in state:
            return None
        if slot.key not in local or slot.fused:  # a fused stack: its rank's rows taken as it is read (fill_fused)
            return slot
        lo, hi = local[slot.key]
        return Slot(slot.key, slot.expert - lo, slot.rope_rows) if lo <= slot.expert < hi else None
    files = weight_files(Path(path))
    load_hf_weights(model, path, rope_half_layout(read_hf_config(path, files)[1]), files, place)



def init_weight_files(init: str | Path) -> list[list]:
    """A fingerprint of the weights ``load_init_weights`` reads from ``init`` (an HF directory's safetensors, or a
    flyer run's model.safetensors): [file, size in bytes, modification time in ns] of each file, resolved (an HF
    cache's links, a run's newest checkpoint), sorted. A DPO run records its frozen reference's. Read from the file
    system alone: cheap at any size (hashing the bytes would read the weights a second time), and changed by any
    rewrite of a file, which safetensors headers (names, shapes, offsets) are not when the shapes stay. A copy that
    keeps the bytes but not the times reads as changed: refused, the safe side."""
    if is_hf_model_dir(init):
        files = set(weight_files(Path(init)).values())
    else:
        files = set(weight_files(resolve_checkpoint_path(init)).values())
    out = []
    for f in sorted(str(Path(f).resolve()) for f in files):
        st = os.stat(f)
        out.append([f, st.st_size, st.st_mtime_ns])
    return out


__all__ = ["expert_stack_keys", "fp4_expert_values", "fp4_trained", "init_source", "init_weight_files",
           "load_init_weights", "load_pretrained", "loaded_bytes", "read_settings", "run_tokenizer", "settings_dir",
           "stored_weight_dtype"]
