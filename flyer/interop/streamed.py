"""A checkpoint read one tensor at a time, as ``flyer export`` reads it: a flyer run (or step directory) or a
Hugging Face directory, in flyer's names and layout, never the whole model in memory."""

from __future__ import annotations

from pathlib import Path

import torch

from flyer.fp8.fp4 import fp4_round_trip
from flyer.interop.hf import (build_empty, checkpoint_dtype, fill_tensor, hf_weight_map, is_hf_model_dir,
                              quant_scheme, read_hf_config, rope_half_layout, weight_files)
from flyer.interop.hf_names import Slot
from flyer.interop.hf_tokenizer import load_tokenizer
from flyer.interop.load import expert_stack_keys, run_tokenizer, run_weights, stored_weight_dtype
from flyer.interop.tensorfile import TensorFile, header
from flyer.train.checkpoint import inference_checkpoint, trained_fp4_experts


class StreamedCheckpoint:
    """The weights of a checkpoint directory (a flyer run or step directory, or an HF directory),
    read one at a time as ``load_pretrained`` fills its model: flyer's names, dtypes and rope layout,
    an FP8 checkpoint's weights dequantized to FP32 (its exact values). An export from it holds one
    tensor at a time, never the model: a 671B checkpoint exports on a machine that could not load it.
    ``qat``: a run trained with FP4 QAT (``trained_fp4_experts``); ``fp4_keys``: the routed expert stacks
    ``read`` gives as their FP4 values (those of such a run; set it empty to read the masters)."""

    def __init__(self, path: str | Path):
        path = Path(path)
        self.headers: dict[Path, TensorFile] = {}
        self.qat, self.fp4_keys, self.scheme = False, set(), None
        if is_hf_model_dir(path):
            self.files = weight_files(path)
            self.cfg, raw = read_hf_config(path, self.files)
            self.tok = load_tokenizer(path, raw)
            self.fp8 = stored_weight_dtype(path) == "fp8"
            self.scheme = quant_scheme(path)  # compressed-tensors' integer weights, decoded as read
            # checked from the headers before a byte is written
            names = hf_weight_map(self.cfg, path, rope_half_layout(raw), self.files, self.headers)
            self.where: dict[tuple[str, int | None], tuple[str, Slot]] | None = {
                (k, s.expert): (n, s) for n, s in names.items() for k in s.fused or (s.key,)}
            dtype = torch.float32 if self.fp8 else checkpoint_dtype(self.files)
        else:
            ckpt, self.cfg, tok = inference_checkpoint(path)
            self.tok, self.fp8, self.where = run_tokenizer(ckpt, tok), False, None  # a run from HF: its settings
            dtype = torch.float32  # a run loads in FP32
            self.files, self.headers = run_weights(ckpt, self.cfg)
            self.qat = trained_fp4_experts(ckpt)
        meta = build_empty(self.cfg, "meta", dtype)
        self.state = meta.state_dict()
        if self.qat:
            self.fp4_keys = expert_stack_keys(meta)

    def read(self, slot: Slot) -> torch.Tensor:
        """The tensor (or one expert of a stack) ``slot`` names, in flyer's layout."""
        key = slot.key
        meta = self.state[key] if slot.expert is None else self.state[key][slot.expert]
        if self.where is None:  # a flyer run: its own names; an expert is a row of its stack
            rows = None if slot.expert is None else (slot.expert, slot.expert + 1)
            dest = torch.empty((1, *meta.shape) if rows else meta.shape, dtype=meta.dtype)
            fill_tensor(None, dest, self.headers[self.files[key]], key, Slot(key), self.files, self.headers, rows)
            dest = dest[0] if rows else dest
            return fp4_round_trip(dest) if key in self.fp4_keys else dest  # QAT: what training multiplied by
        if key == "head.weight" and self.cfg.tie_embeddings:  # the file holds the embedding only
            key = "embed.weight"
        if (key, slot.expert) not in self.where:  # one expert of a stack the file holds whole (fused)
            return self.read(Slot(key))[slot.expert]
        name, src = self.where[(key, slot.expert)]
        if src.fused:  # the whole fused tensor read, this stack's part of it returned
            tf = header(self.headers, self.files[name])
            whole = torch.empty(tf.shape(name), dtype=meta.dtype)
            fill_tensor(None, whole, tf, name, Slot(name), self.files, self.headers, scheme=self.scheme)
            sizes = [self.state[k].shape[1] for k in src.fused]
            return whole.split(sizes, dim=1)[src.fused.index(key)].contiguous()
        dest = torch.empty(meta.shape, dtype=meta.dtype)
        fill_tensor(None, dest, header(self.headers, self.files[name]), name, src, self.files, self.headers,
                    scheme=self.scheme)
        return dest


__all__ = ["StreamedCheckpoint"]
