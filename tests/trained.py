"""A tiny model trained for a few seconds, shared by the decoding and serving tests."""

from __future__ import annotations

import copy

import torch

from flyer.config import preset
from flyer.model.transformer import Transformer


# (vocab, steps) -> (parameters and buffers, RNG state after training)
_TRAINED: dict[tuple[int, int], tuple[dict[str, torch.Tensor], torch.Tensor]] = {}


def counting_model(vocab: int = 64, steps: int = 40) -> Transformer:
    """A tiny model trained on arithmetic progressions mod ``vocab``: its main head and MTP module
    both learn the pattern (drafts mostly accepted), and its greedy tokens have clear margins, so
    FP32 rounding differences between batch mixes do not flip them. Eval mode, FP32. Trained once per process (a test
    process runs many files that use it): a fresh model holding its parameters and buffers (the routers' counts
    too), the RNG left as training leaves it."""
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=vocab))
    if (vocab, steps) not in _TRAINED:
        _TRAINED[vocab, steps] = _train(model, vocab, steps), torch.get_rng_state()
    tensors, rng = _TRAINED[vocab, steps]
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            t.copy_(tensors[name])
    torch.set_rng_state(rng)
    return model.eval()


def _train(model: Transformer, vocab: int, steps: int) -> dict[str, torch.Tensor]:
    """``model``'s parameters and buffers after training a copy of it in FP64, rounded to FP32. Trained in FP32, the
    weights came out up to 0.05 apart on two CPU kinds (MKL's and ATen's kernels round differently per ISA, and
    training amplifies that), so tests that rely on the margins of one machine's model failed on another; trained
    in FP64 they agree to an FP32 ulp."""
    model64 = copy.deepcopy(model).double()
    opt = torch.optim.AdamW(model64.parameters(), lr=3e-3)
    for _ in range(steps):
        seq = (torch.randint(0, vocab, (16, 1)) + torch.randint(1, 4, (16, 1)) * torch.arange(25)) % vocab
        loss = model64.compute_loss(seq[:, :-1], seq[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    values = dict([*model64.named_parameters(), *model64.named_buffers()])
    return {n: values[n].detach().to(t.dtype) for n, t in [*model.named_parameters(), *model.named_buffers()]}
