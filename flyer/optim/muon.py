"""Muon, DeepSeek-V4's optimizer (DeepSeek-V4 paper, section 2.4, Algorithm 1), with AdamW for the
parameters it leaves out: one ``torch.optim.Optimizer`` whose parameter groups say which rule
updates them (``muon: True`` or ``False``), so ``ZeroRedundancyOptimizer(optimizer_class=Muon)``
can shard it like AdamW.

Per Muon matrix W (n x m) and step, with gradient G, learning rate eta, weight decay lambda:

    M <- mu M + G;  O' = HybridNewtonSchulz(mu M + G) (Nesterov);  O = O' sqrt(max(n, m)) gamma;
    W <- W (1 - eta lambda) - eta O

mu = 0.95, gamma = 0.18 (section 4.2.2: the update's RMS scaled to 0.18, so AdamW's learning rate
and weight decay are reused: an orthogonal n x m matrix with min(n, m) unit singular values has RMS
1 / sqrt(max(n, m))). The hybrid Newton-Schulz normalises by the Frobenius norm and runs 8
iterations with (a, b, c) = (3.4445, -4.7750, 2.0315), then 2 with (2, -1.5, 0.5) (eq. 28).

Where flyer chooses:
- the momentum buffer is the exponential average B = mu B + (1 - mu) G = (1 - mu) M and the update
  input (1 - mu) G + mu B = (1 - mu)(G + mu M): Newton-Schulz divides by the Frobenius norm first,
  so the update is the paper's (as ``torch.optim.Muon`` does; the buffer stays in the gradients' range);
- Newton-Schulz runs in FP32 (``ns_dtype``): the paper runs it with BF16 matrix multiplications
  (section 3.5.1), which a CPU does not multiply in hardware; ``ns_dtype="bfloat16"`` is the paper's;
- each parameter is orthogonalised on its own (an expert stack (E, out, in) as E matrices, batched, and so
  DeepSeek-V4's grouped ``wo_a`` (G L, K): block-diagonal, G maps of L x K, each its own matrix),
  never batched with other parameters of its shape as the paper's kernels do: a parameter's update
  then depends on nothing else, so ZeRO-1's owners (whole parameters) step it bit for bit alike;
- the routing (``muon_param_ids``) names its own choices.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.optim.adamw import adamw

from flyer.model.hybrid import Compressor, HybridAttention
from flyer.model.hyper import HyperConnection, HyperHead

OPTIMIZERS = ("adamw", "muon")
NS_FAST = (3.4445, -4.7750, 2.0315)  # Jordan et al.'s quintic: singular values quickly near 1
NS_SETTLE = (2.0, -1.5, 0.5)  # f(1) = 1, f'(1) = 0: singular values settle at 1
V4_SCHEDULE = ((NS_FAST, 8), (NS_SETTLE, 2))  # ((a, b, c), iterations) stages, in order
V4_UPDATE_RMS = 0.18
V4_MOMENTUM = 0.95
NS_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def newton_schulz(m: torch.Tensor, schedule=V4_SCHEDULE, dtype: torch.dtype = torch.float32,
                  eps: float = 1e-7) -> torch.Tensor:
    """Approximately orthogonalise each matrix of ``m`` (..., n, m) (2D, or a batch such as an
    expert stack (E, n, m), each matrix its own): U V^T of its SVD U S V^T.

    The matrix is divided by its Frobenius norm (largest singular value <= 1), transposed when tall
    so that X X^T is the small (min(n, m))^2 side, then each stage ((a, b, c), k) of ``schedule``
    runs k iterations X <- a X + (b A + c A^2) X, A = X X^T (eq. 28), in ``dtype``. Returns the
    result in ``dtype``, the shape of ``m``."""
    x = m.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    addmm = torch.addmm if x.ndim == 2 else torch.baddbmm
    for (a, b, c), k in schedule:
        for _ in range(k):
            gram = x @ x.mT
            x = addmm(x, addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


def muon_param_ids(model: nn.Module) -> dict[int, int]:
    """The ids of the parameters of ``model`` that Muon updates (AdamW updates the others), each with the number
    of row blocks that are matrices of their own: 1, or G for DeepSeek-V4's grouped ``wo_a`` (G L, K), whose
    head group g multiplies rows g L .. (g + 1) L - 1 only (``flyer.model.lowp.grouped_linear``): G maps, like an
    expert stack's E, orthogonalised each on its own.

    The paper (section 2.4): AdamW for the embedding, the prediction head, the static biases and
    gating factors of mHC (flyer's ``HyperConnection`` / ``HyperHead`` ``base`` and ``scale``) and
    every RMSNorm weight; Muon for all other modules. So Muon takes every remaining matrix: the
    attention, MLP, shared and routed experts (an (E, out, in) stack is E matrices), MTP
    projections, mHC's dynamic projections ``fn``, compressor and indexer projections. V3-family
    models get the same rule. What is not a matrix is AdamW's (biases, attention sinks).

    flyer's choices where the paper names no module: the MoE router weight is a matrix of a
    module the paper does not exempt, so Muon (as its rule reads); the compressor's per-slot gate
    bias ``ape`` (ratio, width) is a bias added to the gate, not a map, so AdamW."""
    adamw: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, (nn.Embedding, nn.RMSNorm)) or name == "head":
            adamw.update(id(p) for p in module.parameters(recurse=False))
        elif isinstance(module, (HyperConnection, HyperHead)):
            adamw.update((id(module.base), id(module.scale)))
        elif isinstance(module, Compressor):
            adamw.add(id(module.ape))
    blocks = {id(m.wo_a.weight): m.o_groups for m in model.modules() if isinstance(m, HybridAttention)}
    return {id(p): blocks.get(id(p), 1) for p in model.parameters() if p.ndim >= 2 and id(p) not in adamw}


def optimizer_groups(kind: str, params: list[nn.Parameter], muon_ids: dict[int, int],
                     weight_decay: float) -> list[dict[str, Any]]:
    """The parameter groups of optimizer ``kind`` over ``params`` (empty groups dropped). adamw:
    matrices decay, vectors (norms, biases) do not. muon: the Muon matrices (``muon_ids``, a group per number of
    ``row_blocks``; decaying, as the paper's), then AdamW's matrices (decaying) and vectors (not), each flagged
    ``muon``."""
    if kind == "adamw":
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    else:
        rest = [p for p in params if id(p) not in muon_ids]
        muon = [p for p in params if id(p) in muon_ids]
        groups = [{"params": [p for p in muon if muon_ids[id(p)] == n], "weight_decay": weight_decay, "muon": True,
                   "row_blocks": n} for n in sorted({muon_ids[id(p)] for p in muon})]
        groups += [{"params": [p for p in rest if p.ndim >= 2], "weight_decay": weight_decay, "muon": False},
                   {"params": [p for p in rest if p.ndim < 2], "weight_decay": 0.0, "muon": False}]
    return [g for g in groups if g["params"]]


def state_bytes(kind: str, is_muon: bool, numel: int, element_size: int, step_bytes: int) -> int:
    """Optimizer state bytes of one parameter: Muon's one momentum buffer, or AdamW's two moments
    and its ``step`` scalar (``step_bytes``)."""
    return numel * element_size if kind == "muon" and is_muon else 2 * numel * element_size + step_bytes


class Muon(torch.optim.Optimizer):
    """Muon for the groups flagged ``muon: True`` (``optimizer_groups``), AdamW (PyTorch's own
    update, ``torch.optim.adamw.adamw``, with ``betas``, ``eps`` and ``fused`` as
    ``torch.optim.AdamW``'s) for those flagged False; ``lr`` and ``weight_decay`` are shared, as
    the paper's update rescaling intends. State per parameter: Muon's ``momentum_buffer``;
    AdamW's ``step``, ``exp_avg``, ``exp_avg_sq``.

    momentum, nesterov, ns_schedule (((a, b, c), iterations) stages), update_rms (gamma) and
    ns_dtype ('float32' or 'bfloat16') configure Muon; the defaults are DeepSeek-V4's."""

    def __init__(self, params, lr: float = 2e-3, weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, momentum: float = V4_MOMENTUM, nesterov: bool = True, ns_schedule=V4_SCHEDULE,
                 update_rms: float = V4_UPDATE_RMS, ns_dtype: str = "float32", fused: bool | None = None):
        if ns_dtype not in NS_DTYPES:
            raise ValueError(f"ns_dtype must be one of {', '.join(NS_DTYPES)} (got {ns_dtype!r})")
        defaults = dict(lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, momentum=momentum, nesterov=nesterov,
                        ns_schedule=tuple((tuple(abc), int(k)) for abc, k in ns_schedule), update_rms=update_rms,
                        ns_dtype=ns_dtype, fused=fused)
        super().__init__(params, defaults)
        for g in self.param_groups:
            if not isinstance(g.get("muon"), bool):
                raise ValueError("every Muon parameter group says muon: True or False (optimizer_groups)")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            (self._muon_step if group["muon"] else self._adamw_step)(group)
        return loss

    def _muon_step(self, group: dict[str, Any]) -> None:
        lr, mu, dtype = group["lr"], group["momentum"], NS_DTYPES[group["ns_dtype"]]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - mu)
            update = p.grad.lerp(buf, mu) if group["nesterov"] else buf
            blocks = group.get("row_blocks", 1)  # a grouped wo_a (G L, K): G matrices (L, K)
            if blocks > 1:
                update = update.view(blocks, -1, update.shape[-1])
            ortho = newton_schulz(update, group["ns_schedule"], dtype).view_as(p)
            scale = lr * (group["update_rms"] * math.sqrt(max(update.shape[-2:])))  # RMS gamma, as AdamW's
            p.mul_(1 - lr * group["weight_decay"])
            p.add_(ortho, alpha=-scale)

    def _adamw_step(self, group: dict[str, Any]) -> None:
        fused = bool(group["fused"])
        params, grads, avgs, sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:  # as torch.optim.AdamW keeps them: a fused step counts on the device
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if fused else "cpu")
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            avgs.append(state["exp_avg"])
            sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        beta1, beta2 = group["betas"]
        adamw(params, grads, avgs, sqs, [], steps, fused=fused or None, amsgrad=False, beta1=beta1, beta2=beta2,
              lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)


def optimizer_class(kind: str) -> type[torch.optim.Optimizer]:
    """The optimizer of ``kind`` ('adamw' or 'muon')."""
    return Muon if kind == "muon" else torch.optim.AdamW


__all__ = ["Muon", "NS_FAST", "NS_SETTLE", "OPTIMIZERS", "V4_MOMENTUM", "V4_SCHEDULE", "V4_UPDATE_RMS",
           "muon_param_ids", "newton_schulz", "optimizer_class", "optimizer_groups", "state_bytes"]
