"""Direct Preference Optimization (Rafailov et al. 2023, the sigmoid loss): ``flyer train --init PATH --data
prefs.jsonl --dpo`` (pairs: ``flyer.data.pref_data``).

For each pair, the summed log-probability of the chosen completion's trained tokens and of the rejected one's under
the policy (pc, pr: the model trained) and under a frozen reference (rc, rr: a second copy of the init weights, in
eval mode, no gradients, at the run's precision); loss = -logsigmoid(beta ((pc - rc) - (pr - rr))), its mean over
the job's pairs (every replica draws as many pairs, so the mean of the replicas' means). The rewards are
beta (pc - rc) and beta (pr - rr); accuracy the share of pairs whose chosen reward is the larger, margin their mean
difference.

MTP modules are not trained (their parameters are frozen: the DPO loss is the main head's alone); the sequence
balance loss is added as SFT adds it and the routers' bias update runs on the policy's routed tokens (padding not
counted), so a DPO step balances experts as an SFT step does.

The reference drops its MTP modules, and under ``--precision bf16`` holds its GEMM weights in BF16 (``hold_reference``):
autocast rounds every FP32 GEMM weight to BF16 before it multiplies, and the reference never trains (no master copy), so
it computes the same bits in half those weights' memory. Under fp8 it stays FP32: the FP8 recipe quantizes each weight's
128x128 blocks from its FP32 values, and BF16-rounded values would quantize to other codes and scales.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flyer.config import ModelConfig
from flyer.data.chat_data import IGNORE_INDEX
from flyer.fp8.fp4 import fp4_experts
from flyer.infer.weights import KEEP
from flyer.model.counts import forward_flops_per_token, training_flops_per_token
from flyer.model.experts import Experts
from flyer.model.moe import counting_only, moe_layers
from flyer.model.transformer import Transformer
from flyer.train.batches import positions_run
from flyer.train.metrics import StepSums

DPO_FIELDS = ("dpo_loss", "rewards_chosen", "rewards_rejected", "reward_accuracy", "reward_margin")


def completion_logprobs(model: nn.Module, x_BT: torch.Tensor, y_BT: torch.Tensor) -> torch.Tensor:
    """(B,) FP32: row b's summed log-probability of its targets ``y_BT[b, t]`` (those not ``IGNORE_INDEX``) after
    ``x_BT[b, :t + 1]`` (padding, ids < 0, fed as token 0), under ``model``'s main head. Only the trained positions'
    logits are made ((N, V), FP32, as ``Transformer.forward``'s)."""
    keep = y_BT != IGNORE_INDEX
    h = model.norm(model.hidden(x_BT.clamp(min=0)))[keep]  # (N, D), row-major: rows' positions in order
    logp = torch.log_softmax(model.head(h).float(), dim=-1).gather(1, y_BT[keep][:, None])[:, 0]
    rows = keep.nonzero()[:, 0]
    return torch.zeros(x_BT.shape[0], dtype=torch.float32, device=x_BT.device).index_add(0, rows, logp)


def dpo_terms(policy_B: torch.Tensor, reference_B: torch.Tensor,
              beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss per pair (P,), chosen rewards (P,), rejected rewards (P,)) of rows' summed log-probabilities (B = 2P,
    row 2p pair p's chosen, 2p + 1 its rejected) under the policy and the reference."""
    chosen = beta * (policy_B[0::2] - reference_B[0::2])
    rejected = beta * (policy_B[1::2] - reference_B[1::2])
    return -F.logsigmoid(chosen - rejected), chosen, rejected


def dpo_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """FLOPs per row position of a DPO step at row width ``seq_len``: the policy's forward and backward
    (``training_flops_per_token``; main model only: DPO runs no MTP module) and the frozen reference's forward
    (``forward_flops_per_token``). The head is counted at every position, though only the trained ones' logits are
    made."""
    return training_flops_per_token(cfg, seq_len) + forward_flops_per_token(cfg, seq_len)


def freeze_mtp(model: nn.Module) -> None:
    """Freeze ``model``'s MTP modules' own parameters (not those they share with the main model: embedding, head),
    so neither their gradients (none) nor the optimizer (weight decay) move them during DPO."""
    main = {id(p) for name, p in model.named_parameters() if not name.startswith("mtp.")}
    for p in getattr(model, "mtp", nn.ModuleList()).parameters():
        if id(p) not in main:
            p.requires_grad_(False)


@torch.no_grad()
def hold_reference(model: nn.Module, precision: str) -> None:
    """The frozen reference ``model`` as DPO holds it, in place: without its MTP modules, and under ``precision`` 'bf16'
    with its GEMM weights in BF16 (any other precision: left as built). Held: the linear layers' weights (not their
    biases) and the routed experts' stacks, each of which autocast rounds to BF16 before its GEMM, so the reference's
    outputs under autocast keep their bits. Left FP32: the embedding (a gather, not cast: with tied embeddings the head
    too), the norms, the routers (they compute in FP32, ``flyer.model.moe.Gate``), ``KEEP``'s weights
    (``flyer.infer.weights``: computed in FP32 or multiplied outside their layer), the FP4-QAT experts (quantized from
    their FP32 values) and every other tensor."""
    model.mtp = nn.ModuleList()  # never run: the DPO loss is the main head's (dsv3's: 11.6B parameters)
    if precision != "bf16":
        return
    embed = model.embed.weight
    for name, m in model.named_modules():
        if type(m) is Experts and m.weight_quant is None:
            attrs = ("w1", "w2", "w3")
        elif isinstance(m, nn.Linear) and m.weight is not embed and name.rsplit(".", 1)[-1] not in KEEP:
            attrs = ("weight",)
        else:
            continue
        for attr in attrs:
            setattr(m, attr, nn.Parameter(getattr(m, attr).to(torch.bfloat16), requires_grad=False))


def reference_bytes(cfg: ModelConfig, precision: str, fp4: bool = False) -> int:
    """The bytes of the frozen reference's parameters as ``hold_reference`` holds them at ``precision`` (one process:
    DPO runs without expert or pipeline parallelism), counted on a model built on the meta device. ``fp4``: its
    routed experts are FP4-QAT's (``flyer.fp8.fp4.fp4_experts``), so held FP32."""
    with torch.device("meta"):
        model = Transformer(cfg)
    if fp4:
        fp4_experts(model)
    hold_reference(model, precision)
    return sum(p.numel() * p.element_size() for p in model.parameters())


class DpoObjective:
    """The DPO loss of a policy against ``reference`` (frozen here: eval mode, no gradients), ``beta`` its
    temperature. ``step`` trains on micro-batches of pairs, ``evaluate`` gives the validation loss."""

    def __init__(self, reference: nn.Module, beta: float):
        self.reference = reference.eval().requires_grad_(False)
        self.beta = beta

    def _pairs(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device):
        """(loss per pair, chosen rewards, rejected rewards, balance loss or None) of one batch of rows (on the host,
        moved to ``device`` here: whether any is padded is known without waiting for the device)."""
        valid = None if bool((x >= 0).all()) else (x >= 0).to(device)
        x, y = x.to(device), y.to(device)
        with torch.no_grad():
            reference = completion_logprobs(self.reference, x, y)
        for m in moe_layers(model):
            m.aux_loss = None  # set again by this forward's routed layers (MTP's run none)
        with counting_only(model, valid):  # padding moves no routing statistic
            policy = completion_logprobs(model, x, y)
        aux = [m.aux_loss for m in moe_layers(model) if m.aux_loss is not None] if model.training else []
        return (*dpo_terms(policy, reference, self.beta), torch.stack(aux).sum() if aux else None)

    def step(self, model: nn.Module, batches, mesh, autocast, flops_per_token) -> dict[str, float]:
        """Forward and backward of ``batches`` (``grad_accum`` micro-batches of pairs, as ``batches.draw`` gives
        them), gradients synced; the job's loss (DPO plus the balance loss), ``DPO_FIELDS`` and aux_loss (means over
        the job's pairs), and its ``tokens`` and ``flops`` (``flops_per_token`` of each row width: the trainer's
        ``dpo_flops_per_token``, the policy's training and the reference's forward)."""
        n = len(batches)
        sums = StepSums("loss", "aux_loss", *DPO_FIELDS)
        device = next(model.parameters()).device
        for x, y, _ in batches:
            with autocast():
                losses, chosen, rejected, aux = self._pairs(model, x, y, device)
            loss = losses.mean() / n
            if aux is not None:
                loss = loss + aux / n
                sums.add("aux_loss", aux, 1 / n)
            loss.backward()
            sums.add("loss", loss)
            for field, value in zip(DPO_FIELDS, (losses, chosen, rejected, (chosen > rejected).float(),
                                                 chosen - rejected)):
                sums.add(field, value.mean(), 1 / n)
        mesh.sync_gradients(model)
        tokens, flops = positions_run(batches, flops_per_token)
        sums = mesh.mean({**sums.floats(), "tokens": tokens, "flops": flops})
        return {**sums, "tokens": sums["tokens"] * mesh.world, "flops": sums["flops"] * mesh.world}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, eval_data, mesh, autocast) -> float:
        """The DPO loss's mean over the validation pairs (``pair_eval_batches``), averaged over ranks."""
        model.eval()
        device = next(model.parameters()).device
        total, count = 0.0, 0
        for x, y in eval_data:
            with autocast():
                losses = self._pairs(model, x, y, device)[0]
            total, count = total + float(losses.sum()), count + len(losses)
        model.train()
        return mesh.mean({"v": total / count})["v"]
