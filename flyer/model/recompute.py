"""DeepSeek-V3's recomputation of the MLA up-projections (report, section 3.2.3): backward recomputes each MLA
layer's latent RMSNorms, its up-projections (``wq_b``, ``wkv_b``; ``wq`` without a query LoRA) and RoPE from the
latents instead of keeping their outputs, the per-head queries, keys and values; the attention core is not run
again (its output and log-sum-exp are kept). Per token and layer that drops ``H (2 qk + v)`` saved elements
(``flyer.cluster.costs``), the largest part of an MLA layer's activations, for one more pass of the two
up-projection GEMMs in backward. The gradients are the same bit for bit: the recomputed ops see the same inputs.

``torch.utils.checkpoint`` with a selective policy (``create_selective_checkpoint_contexts``) does it: the fused
attention ops' outputs are saved, everything else in the region recomputed. A masked attention that takes SDPA's
math path (no fused kernel) is recomputed whole. A DSA layer (``index_topk``) recomputes the same region around its
masked attention, its selection's mask (made without autograd) kept as the region's input; past
``flyer.model.dsa_chunks.dsa_gathers``' length its gathered chunks recompute in backward already; it recomputes
nothing while its indexer trains (``--indexer-train``: L_I reads the attention's queries and keys) nor on packed
rows, whose documents run the layer a group at a time (a region each would cast the weights once per group).

A pipeline schedule that splits backward into its input and weight gradients (zero-bubble, DualPipeV) runs a
region's backward more than once (its weight pass once per parameter group), which a selective checkpoint refuses
(the first consumes its saved outputs), and a plain one would pay by recomputing the region each time: ``flyer
train`` refuses the pair. The recomputation runs under autocast as the forward did (``torch.utils.checkpoint``)
and under flyer's own switches as they were then (``flyer.runtime.carried``), wherever the backward runs."""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from flyer.runtime import carried

MODES = ("none", "mla")

_aten = torch.ops.aten
# SDPA's fused kernels (CPU flash, CUDA flash / memory-efficient / cuDNN): their outputs are what backward reads
_KEPT = {op.default for op in (_aten._scaled_dot_product_flash_attention_for_cpu,
                               _aten._scaled_dot_product_flash_attention,
                               _aten._scaled_dot_product_efficient_attention,
                               _aten._scaled_dot_product_cudnn_attention)}


def _policy(_ctx, op, *_args, **_kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _KEPT else CheckpointPolicy.PREFER_RECOMPUTE


def recomputed(fn, *args, selective: bool = True):
    """``fn(*args)``, its intermediates recomputed in backward under the switches of this forward (``selective``:
    but the fused attention's outputs, which are kept). A weight one region uses must not be cast by autocast
    before it in the same forward: the forward would find the cast cached and the recomputation would make it,
    which a selective checkpoint refuses as ops that differ."""
    kept = {"context_fn": functools.partial(create_selective_checkpoint_contexts, _policy)} if selective else {}
    return checkpoint(carried(fn), *args, use_reentrant=False, **kept)


def recomputed_if_recorded(fn, *args):
    """``fn(*args)``, its intermediates recomputed in backward (``recomputed``, not selective: an elementwise region
    whose inputs are kept anyway) when autograd records it; a plain call otherwise (no gradient, or no input that
    needs one: decoding, a frozen block), where a checkpoint would only cost time."""
    if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return recomputed(fn, *args, selective=False)
    return fn(*args)


def set_recompute(model: nn.Module, mode: str) -> int:
    """Turn recomputation ``mode`` (one of ``MODES``) on in ``model``'s MLA layers; returns how many take it."""
    if mode not in MODES:
        raise ValueError(f"recompute must be one of {', '.join(MODES)} (got {mode!r})")
    # the modules that can: ``flyer.model.attention.MLA``, which imports this module
    layers = [m for m in model.modules() if hasattr(m, "recompute") and hasattr(m, "index_topk")]
    for m in layers:
        m.recompute = mode == "mla"
    return len(layers)


def recompute_line(model: nn.Module) -> str:
    """What ``set_recompute`` turned on in ``model`` (this pipeline rank's layers), for the run's log."""
    on = [m for m in model.modules() if getattr(m, "recompute", False) is True]
    if not on:
        return "recompute: this model has no MLA layer: nothing is"
    training = sum(m.index_train != "off" for m in on)  # L_I reads the queries and keys: kept
    keep = f"{training} DSA layers training their indexers keep theirs (L_I reads the queries and keys)"
    if training == len(on):
        return f"recompute: none: {keep}"
    return (f"recompute: {len(on) - training} MLA layers' latent norms and up-projections in backward"
            + (f"; {keep}" if training else ""))
