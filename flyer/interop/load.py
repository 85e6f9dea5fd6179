"""One entry point for every checkpoint flyer takes: a flyer run, a flyer step directory, or a
Hugging Face model directory, told apart by what the directory holds."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from flyer.config import ModelConfig
from flyer.errors import CheckpointError
from flyer.infer.weights import empty_held, hold_weights
from flyer.interop.hf import (SCALE_SUFFIX, Slot, TextTokenizer, build_empty, checkpoint_dtype, fill_tensor,
                              is_hf_model_dir, load_hf, read_hf_config, weight_files)
from flyer.interop.tensorfile import TensorFile
from flyer.model.transformer import Transformer
from flyer.train.checkpoint import check_model_weights, inference_checkpoint, resolve_checkpoint_path


def load_pretrained(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    held: torch.dtype | None = None) -> tuple[Transformer, ModelConfig, TextTokenizer]:
    """(model in eval mode, config, tokenizer with its EOS) from ``path``. ``dtype``: parameter dtype
    of an HF import (default: the checkpoint's); a flyer run loads in FP32, as it trains. ``held``: an FP32
    model whose GEMM weights are held in BF16 or FP8 (``flyer.infer.weights``), written as held
    tensor by tensor: the FP32 weights are never in memory."""
    if is_hf_model_dir(path):
        return load_hf(path, device, dtype, held)
    ckpt, cfg, tok = inference_checkpoint(path)
    model = empty_held(cfg, held or torch.float32, device)
    tf = TensorFile(ckpt / "model.safetensors")
    check_model_weights(model, {k: tf.shape(k) for k in tf.names()}, f"checkpoint {ckpt}")
    state, files = model.state_dict(), dict.fromkeys(tf.names(), tf.path)
    for k in tf.names():  # one tensor at a time: loading takes the model's memory, not twice it
        fill_tensor(model, state[k], tf, k, Slot(k), files, {tf.path: tf})
    return model, cfg, TextTokenizer(tok)


def loaded_bytes(path: str | Path, dtype: torch.dtype | None = None, held: torch.dtype | None = None) -> int:
    """Bytes of the model ``load_pretrained(path, dtype=dtype, held=held)`` allocates (its parameters
    and buffers), counted on the meta device from the checkpoint's config before anything is read:
    what ``require_memory`` checks first."""
    if is_hf_model_dir(path):
        files = weight_files(Path(path))
        cfg, dtype = read_hf_config(path, list(files))[0], dtype or checkpoint_dtype(files)
    else:
        cfg, dtype = init_source(path)[0], torch.float32
    model = build_empty(cfg, "meta", dtype)
    hold_weights(model, held or torch.float32)
    unique = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in unique.values())


def stored_weight_dtype(path: str | Path) -> str:
    """How the checkpoint at ``path`` stores its GEMM weights, as a ``--weight-dtype``: "fp8" for
    DeepSeek's FP8 format (E4M3 with block scales), else "bf16" or "fp32" by its embedding's dtype."""
    if is_hf_model_dir(path):
        files = weight_files(Path(path))
        scaled = [n[:-len(SCALE_SUFFIX)] for n in files if n.endswith(SCALE_SUFFIX)]
        if scaled and TensorFile(files[scaled[0]]).dtype(scaled[0]) == torch.float8_e4m3fn:
            return "fp8"
        return "bf16" if checkpoint_dtype(files) == torch.bfloat16 else "fp32"
    tf = TensorFile(inference_checkpoint(path)[0] / "model.safetensors")
    return "bf16" if tf.dtype("embed.weight") == torch.bfloat16 else "fp32"


def init_source(path: str | Path) -> tuple[ModelConfig, Path]:
    """(model config, its tokenizer.json) of a checkpoint to fine-tune from (``flyer train --init``)."""
    if is_hf_model_dir(path):
        return read_hf_config(path, list(weight_files(Path(path))))[0], Path(path) / "tokenizer.json"
    ckpt = resolve_checkpoint_path(path)
    try:
        cfg = ModelConfig.from_dict(json.loads((ckpt / "config.json").read_text()))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {ckpt}: bad config.json ({e})") from None
    return cfg, ckpt / "tokenizer.json"


@torch.no_grad()
def load_init_weights(model: Transformer, path: str | Path, mesh) -> None:
    """Fill ``model`` (this rank's slice under expert parallelism) with the weights of ``path``."""
    source = load_pretrained(path, "cpu", torch.float32)[0]
    mesh.load_full_state_dict(model, source.state_dict())


__all__ = ["init_source", "load_init_weights", "load_pretrained", "loaded_bytes", "stored_weight_dtype"]
