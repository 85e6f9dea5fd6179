"""What shapes a serving step's logits before a token is chosen: each row's logit bias and penalties, then its
grammar's mask. The step's logits come in ``Engine._forward``'s order: one row per plain decoding request, k + 1 per
request verifying k drafts, one per prompt ending this step."""

from __future__ import annotations

import torch

from flyer.serve.grammar import GrammarMasks
from flyer.serve.request import Request
from flyer.serve.speculation import Drafted


def adjust(logits: torch.Tensor, plain: list[Request], drafted: list[Drafted], ending: list[Request]) -> None:
    """Each row's logit bias and penalties on its rows of the step's logits. The row verifying after drafts d[:j]
    counts them as generated: its logits choose a token only when they are."""
    owners = [(r, ()) for r in plain]
    for rows, _, drafts, *_ in drafted:
        owners += [(r, tuple(d[:j])) for r, d in zip(rows, drafts) for j in range(len(d) + 1)]
    owners += [(r, ()) for r in ending]
    for row, (r, extra) in enumerate(owners):
        if r.opts.adjusts:
            prompt = r.prompt_seen(logits.shape[-1], logits.device) if r.opts.repetition_penalty != 1 else ()
            r.opts.adjust(logits[row], [*r.tokens[len(r.prompt):], *extra], prompt)


def mask(grammars: GrammarMasks, logits: torch.Tensor, plain: list[Request], drafted: list[Drafted],
         ending: list[Request]) -> None:
    """The tokens each grammar row's grammar forbids set to -inf on its rows of the step's logits (after
    ``adjust``; a row verifying drafts with the bitmasks its drafting filled), so both its argmax and its sample
    are allowed; the logprobs reported are this masked distribution's, the one the token was chosen from (as
    OpenAI reports them)."""
    rows, given, at = [(i, r.matcher) for i, r in enumerate(plain) if r.matcher is not None], [], len(plain)
    for _, _, drafts, _, allowed in drafted:
        for d, a in zip(drafts, allowed):
            given += [] if a is None else [(at, a)]
            at += len(d) + 1
    grammars.mask(logits, rows + [(at + i, r.matcher) for i, r in enumerate(ending) if r.matcher], given)
