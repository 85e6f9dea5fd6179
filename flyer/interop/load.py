"""One entry point for every checkpoint flyer takes: a flyer run, a flyer step directory, or a
Hugging Face model directory, told apart by what the directory holds."""

from __future__ import annotations

from pathlib import Path

import torch

from flyer.config import ModelConfig
from flyer.interop.hf import TextTokenizer, is_hf_model_dir, load_hf
from flyer.model.transformer import Transformer
from flyer.train.checkpoint import load_for_inference


def load_pretrained(path: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> tuple[Transformer, ModelConfig, TextTokenizer]:
    """(model in eval mode, config, tokenizer with its EOS) from ``path``. ``dtype``: parameter dtype
    of an HF import (default: the checkpoint's); flyer checkpoints load as saved."""
    if is_hf_model_dir(path):
        return load_hf(path, device, dtype)
    model, cfg, tok = load_for_inference(path, device=device)
    return model, cfg, TextTokenizer(tok)


__all__ = ["load_pretrained"]
