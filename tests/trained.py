"""A tiny model trained for a few seconds, shared by the decoding and serving tests."""

from __future__ import annotations

import torch

from flyer.config import preset
from flyer.model.transformer import Transformer


# (vocab, steps) -> (parameters and buffers, RNG state after training)
_TRAINED: dict[tuple[int, int], tuple[dict[str, torch.Tensor], torch.Tensor]] = {}


def counting_model(vocab: int = 64, steps: int = 40) -> Transformer:
    """A tiny model trained on arithmetic progressions mod ``vocab``: its main head and MTP module
    both learn the pattern (drafts mostly accepted), and its greedy tokens have clear margins, so
    FP32 rounding differences between batch mixes do not flip them. Eval mode. Trained once per process (a test
    process runs many files that use it): a fresh model holding its parameters and buffers (the routers' counts
    too), the RNG left as training leaves it."""
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=vocab))
    if (vocab, steps) in _TRAINED:
        tensors, rng = _TRAINED[vocab, steps]
        with torch.no_grad():
            for name, t in [*model.named_parameters(), *model.named_buffers()]:
                t.copy_(tensors[name])
        torch.set_rng_state(rng)
        return model.eval()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        seq = (torch.randint(0, vocab, (16, 1)) + torch.randint(1, 4, (16, 1)) * torch.arange(25)) % vocab
        loss = model.compute_loss(seq[:, :-1], seq[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    _TRAINED[vocab, steps] = ({n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]},
                              torch.get_rng_state())
    return model.eval()
