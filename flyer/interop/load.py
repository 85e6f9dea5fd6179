"""One entry point for every checkpoint flyer takes: a flyer run, a flyer step directory, or a
Hugging Face model directory, told apart by what the directory holds."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from flyer.config import ModelConfig
from flyer.errors import CheckpointError
from flyer.interop.hf import TextTokenizer, is_hf_model_dir, load_hf, read_hf_config, weight_files
from flyer.model.transformer import Transformer
from flyer.train.checkpoint import load_for_inference, resolve_checkpoint_path


def load_pretrained(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    fp8_source: dict | None = None) -> tuple[Transformer, ModelConfig, TextTokenizer]:
    """(model in eval mode, config, tokenizer with its EOS) from ``path``. ``dtype``: parameter dtype
    of an HF import (default: the checkpoint's); flyer checkpoints load as saved. ``fp8_source``:
    filled with an FP8 HF checkpoint's own codes and scales (``flyer.interop.hf.load_hf_weights``)."""
    if is_hf_model_dir(path):
        return load_hf(path, device, dtype, fp8_source)
    model, cfg, tok = load_for_inference(path, device=device)
    return model, cfg, TextTokenizer(tok)


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


__all__ = ["init_source", "load_init_weights", "load_pretrained"]
