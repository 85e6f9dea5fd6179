"""Next-token selection: greedy (temperature 0), temperature, min-p, top-k and nucleus (top-p) sampling, and
OpenAI's logit bias and frequency / presence penalties (and vLLM's repetition penalty) on the logits before either,
in vLLM's order: bias, penalties, temperature, min-p, top-k, top-p.

``probabilities`` is the distribution ``sample`` draws from; speculative sampling needs it for
both the draft and the target, so it is a function of its own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from flyer import kernels
from flyer.errors import FieldError
from flyer.infer.attention import FP32_TINY


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p
    top_k: int = 0  # keep the k most likely tokens (those tied with the k-th too); 0: all
    min_p: float = 0.0  # drop the tokens less likely than min_p times the most likely one

    def __post_init__(self) -> None:
        if not 0 <= self.temperature < math.inf:
            raise FieldError("temperature", f"must be finite and >= 0 (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            raise FieldError("top_p", f"must be in (0, 1] (got {self.top_p})")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise FieldError("top_k", f"must be an integer >= 0, 0 for all tokens (got {self.top_k!r})")
        if not 0 <= self.min_p <= 1:
            raise FieldError("min_p", f"must be in [0, 1] (got {self.min_p})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def probabilities(logits_BV: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """(B, V) FP32 distribution after temperature, min-p, top-k and top-p, each on what the one before kept,
    renormalised, as vLLM's sampler applies them (greedy: one-hot on the argmax)."""
    logits = logits_BV.float()
    if params.greedy:
        return torch.zeros_like(logits).scatter_(-1, kernels.argmax(logits).unsqueeze(-1), 1.0)
    # the max subtracted first and the temperature kept at FP32's smallest normal or more: a
    # temperature that rounds to 0 or overflows the logits in FP32 then gives greedy's limit, not NaNs
    top = logits.amax(-1, keepdim=True)
    probs = ((logits - top) / max(params.temperature, FP32_TINY)).softmax(-1)
    if params.min_p > 0:  # the most likely token always stays (its probability is the max)
        probs = probs.masked_fill(probs < params.min_p * probs.amax(-1, keepdim=True), 0.0)
    if 0 < params.top_k < probs.shape[-1]:
        probs = probs.masked_fill(probs < probs.topk(params.top_k, -1).values[..., -1:], 0.0)
    if params.min_p > 0 or params.top_k:
        probs = probs / probs.sum(-1, keepdim=True)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        # drop a token when the mass before it already reaches top_p; the top token always stays
        # (a top_p that rounds to 0 in FP32 would drop it too)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= params.top_p
        drop[..., 0] = False
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(logits_BV: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B,) int64 next tokens."""
    if params.greedy:
        return kernels.argmax(logits_BV)
    return torch.multinomial(probabilities(logits_BV, params), 1, generator=generator).squeeze(-1)


def draw_rows(probs_BV: torch.Tensor, generators: Sequence[torch.Generator] | None,
              rows: Sequence[int]) -> torch.Tensor:
    """(B,) int64: a token from each row's distribution (B, V), row i by its sequence's own generator
    ``generators[rows[i]]`` (so a sequence's draws do not depend on the others in the batch), or by torch's global
    one for the batch (``generators`` None)."""
    if generators is None:
        return torch.multinomial(probs_BV, 1).squeeze(-1)
    return torch.cat([torch.multinomial(probs_BV[i:i + 1], 1, generator=generators[b]).view(1)
                      for i, b in enumerate(rows)])


def sample_rows(logits_BV: torch.Tensor, params: SamplingParams, generators: Sequence[torch.Generator] | None,
                rows: Sequence[int]) -> torch.Tensor:
    """``sample`` with each row's own generator (``draw_rows``)."""
    if params.greedy:
        return kernels.argmax(logits_BV)
    return draw_rows(probabilities(logits_BV, params), generators, rows)


def adjust_logits(logits_V: torch.Tensor, generated: Sequence[int], bias: Sequence[tuple[int, float]] = (),
                  frequency: float = 0.0, presence: float = 0.0, repetition: float = 1.0,
                  prompt: Sequence[int] | torch.Tensor = ()) -> torch.Tensor:
    """One position's logits (V,) adjusted in place as OpenAI's API defines it (and returned): each
    ``bias`` (token, value) added, then a token in the prompt or the output divided by ``repetition`` where its
    logit is positive, multiplied where negative (vLLM's and transformers' repetition penalty), then a token
    generated c times before this position (``generated``: the output so far, not the prompt) lowered by
    c * frequency + (c > 0) * presence. ``prompt``: its ids, or a (V,) bool tensor marking them (``prompt_seen``:
    built once a request, where its ids would be gathered again at every token)."""
    if bias:
        ids, vals = zip(*bias)
        logits_V[list(ids)] += torch.tensor(vals, dtype=logits_V.dtype, device=logits_V.device)
    if repetition != 1.0:
        seen = prompt.clone() if isinstance(prompt, torch.Tensor) else prompt_seen(prompt, logits_V.shape[0],
                                                                                   logits_V.device)
        seen[list(generated)] = True
        logits_V.copy_(torch.where(seen, torch.where(logits_V > 0, logits_V / repetition, logits_V * repetition),
                                   logits_V))
        # a penalty near 0 overflows a positive logit to +inf, whose softmax is NaN: FP32's largest stands in (the
        # sampler's limit is then that token, as the overflow means)
        logits_V.clamp_(max=torch.finfo(logits_V.dtype).max)
    if generated and (frequency or presence):
        ids, counts = torch.tensor(list(generated), device=logits_V.device).unique(return_counts=True)
        logits_V[ids] -= counts.to(logits_V.dtype) * frequency + presence
    return logits_V


def prompt_seen(prompt: Sequence[int], vocab: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(vocab,) bool: True at the ids in ``prompt`` (``adjust_logits``' repetition penalty)."""
    seen = torch.zeros(vocab, dtype=torch.bool, device=device)
    seen[list(prompt)] = True
    return seen


class LogitAdjustments:
    """For options that carry OpenAI's logit adjustments as fields ``logit_bias`` ((token, value)
    pairs), ``frequency_penalty`` and ``presence_penalty`` (flyer serve's requests, ``flyer
    generate``'s config): whether there are any, their ranges, and applying them."""

    logit_bias: tuple[tuple[int, float], ...]
    frequency_penalty: float
    presence_penalty: float
    repetition_penalty: float = 1.0

    @property
    def adjusts(self) -> bool:
        return bool(self.logit_bias or self.frequency_penalty or self.presence_penalty
                    or self.repetition_penalty != 1.0)

    def check_adjustments(self, vocab_size: int | None = None) -> None:
        """``FieldError`` naming the first adjustment outside OpenAI's ranges: penalties in [-2, 2],
        bias values in [-100, 100], biased token ids in [0, ``vocab_size``) (when it is given)."""
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise FieldError(name, f"must be in [-2, 2] (got {getattr(self, name)})")
        if not 0 < self.repetition_penalty < math.inf:
            raise FieldError("repetition_penalty", f"must be finite and > 0 (got {self.repetition_penalty})")
        for t, b in self.logit_bias:
            if vocab_size is not None and not 0 <= t < vocab_size:
                raise FieldError("logit_bias", f"token ids must be in [0, {vocab_size}) (got {t})")
            if not -100 <= b <= 100:
                raise FieldError("logit_bias", f"values must be in [-100, 100] (got {b} for token {t})")

    def adjust(self, logits_V: torch.Tensor, generated: Sequence[int],
               prompt: Sequence[int] | torch.Tensor = ()) -> torch.Tensor:
        """``adjust_logits`` with these adjustments."""
        return adjust_logits(logits_V, generated, self.logit_bias, self.frequency_penalty, self.presence_penalty,
                             self.repetition_penalty, prompt)
