"""The run's data and samplers (``prepare_run_data``, ``samplers``), and what a training step counts of its
micro-batches: each (x, y, documents) as drawn (``draw``: documents None but for packed chat rows,
``flyer.data.chat_pack``), the positions it runs and their training FLOPs (``positions_run``), and the targets each
depth trains (``targets``: 0 the next token, k MTP module k's, within a packed row's documents). The trainer weighs
each micro-batch's mean losses by these counts' shares of the job's."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from flyer.data import BatchSampler, eval_batches, prepare_data
from flyer.data.chat_data import IGNORE_INDEX, ChatData, chat_tokenizer, is_chat_data, prepare_chat
from flyer.data.chat_sampler import ChatSampler, chat_eval_batches
from flyer.data.chat_pack import PackedChatSampler, document_lengths, packed_eval_batches
from flyer.data.pref_data import PairSampler, PrefSplit, pair_eval_batches, prepare_prefs
from flyer.data.presplit import tokenizer_key
from flyer.data.shards import TokenShards
from flyer.model.documents import depth_targets, query_count

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


def draw(sampler, n: int) -> list[Batch]:
    """``n`` micro-batches of ``sampler``: (x, y, packed rows' document ids or None)."""
    return [(b[0], b[1], b[2] if len(b) > 2 else None) for b in (sampler.next_batch() for _ in range(n))]


def positions_run(batches: list[Batch], flops_per_token: Callable[[int], float],
                  width: int | None = None) -> tuple[float, float]:
    """(positions run, their training FLOPs) of ``batches``: a row's width each (attention's FLOPs at that width, or
    at ``width``: a pipeline's rows are its stages' shape), packed rows their conversations' positions (attention at
    each one's own length)."""
    tokens = flops = 0.0
    for x, _, d in batches:
        if d is None:
            tokens += x.numel()
            flops += x.numel() * flops_per_token(width or x.shape[1])
        else:
            lengths = document_lengths(d)
            tokens += sum(lengths)
            flops += sum(n * flops_per_token(n) for n in lengths)
    return tokens, flops


def targets(y: torch.Tensor, documents: torch.Tensor | None, mtp_depth: int) -> list[int]:
    """The trained targets (not ``IGNORE_INDEX``) of depth 0 (next token) to ``mtp_depth`` (``depth_targets``)."""
    return [int((depth_targets(y, documents, k) != IGNORE_INDEX).sum()) for k in range(mtp_depth + 1)]


def queries(x: torch.Tensor, documents: torch.Tensor | None, mtp_depth: int) -> list[int]:
    """The real queries (``query_count``; padding ids < 0) of depth 0 to ``mtp_depth``: what the DSA indexers' L_I
    averages over."""
    return [query_count(x >= 0, documents, k) for k in range(mtp_depth + 1)]


def sequences(batch: Batch) -> int:
    """The sequences a balance loss averages over: rows, or a packed batch's documents."""
    x, _, d = batch
    return x.shape[0] if d is None else len(document_lengths(d))


def counts(batch: Batch, mtp_depth: int) -> dict[str, float]:
    """What a step weighs ``batch``'s mean losses by: depth k's ``targets`` under "k", its ``queries`` under "qk",
    its ``sequences`` under "seqs" (floats: the trainer averages them over the replicas)."""
    x, y, d = batch
    out = {str(k): float(n) for k, n in enumerate(targets(y, d, mtp_depth))}
    out.update({f"q{k}": float(n) for k, n in enumerate(queries(x, d, mtp_depth))})
    out["seqs"] = float(sequences(batch))
    return out


def prepare_run_data(tc, cache: Path, vocab: int, init_tok):
    """The run's data ``tc.data``, tokenized: DPO's preference pairs (``flyer.data.pref_data``), conversations (a
    chat .jsonl: the loss on the assistant's tokens, ``flyer.data.chat_data``) or text documents (``vocab``: flyer's
    own BPE's size, ``init_tok``: ``--init``'s tokenizer)."""
    if tc.dpo:
        return prepare_prefs(tc.data, *chat_tokenizer(tc.init, tc.tokenizer), tc.chat_template_kwargs)
    if is_chat_data(tc.data):
        return prepare_chat(tc.data, cache, *chat_tokenizer(tc.init, tc.tokenizer), tc.chat_template_kwargs)
    return prepare_data(tc.data, cache, vocab_size=vocab, tokenizer=init_tok or tc.tokenizer, fim_rate=tc.fim_rate,
                        seed=tc.seed)


def data_fingerprint(split) -> str:
    """The content of a training split as a digest, which a resumed run's data must match (the sampler's counts
    match data of the same size: another tokenizer's ids, conversations in another order): token shards by their
    checksums, conversations and pairs by their ids, masks and bounds."""
    h = hashlib.blake2b(digest_size=16)
    if isinstance(split, TokenShards):
        for c in split.checksums():
            h.update(c)
        return h.hexdigest()
    samples = split.samples if isinstance(split, PrefSplit) else split
    for a in (samples.ids, samples.mask, samples.offsets):
        h.update(memoryview(np.ascontiguousarray(a)).cast("B"))
    return h.hexdigest()


def run_fingerprints(data) -> dict[str, str]:
    """What a run trains on, as a checkpoint records it (``flyer.train.config.check_resumed_run``): digests of its
    tokenizer (how it encodes: ``tokenizer_key``) and of its training split (``data_fingerprint``; chat data: the key
    of its cache)."""
    # chat data: its cache's key, a digest of the file's bytes, the tokenizer and the template, which make the
    # split (hashing the split itself would read every token at each start)
    digest = data.cache_dir.name if isinstance(data, ChatData) else data_fingerprint(data.train)
    return {"tokenizer": hashlib.blake2b(tokenizer_key(data.tokenizer), digest_size=16).hexdigest(), "data": digest}


def samplers(tc, data, dp_rank: int, dp: int):
    """(the training sampler of data-parallel replica ``dp_rank`` of ``dp``, the validation batches) of ``data``, every
    stage of a replica's pipeline drawing the same; deterministic on resume. Pretraining windows: each replica its own
    random stream (seed, replica); conversations and pairs: the replicas share one stream of epochs
    (``ChatSampler``), so each trains once an epoch across them."""
    chat = is_chat_data(tc.data)
    sampler, batches = (ChatSampler, chat_eval_batches) if chat else (BatchSampler, eval_batches)
    kwargs = {"trim": tc.pp == 1} if chat else {}  # chat rows as wide as their batch needs; a pipeline's: seq_len
    if tc.pack:  # several conversations per seq_len-wide row (flyer.data.chat_pack)
        (sampler, batches), kwargs = (PackedChatSampler, packed_eval_batches), {}
    if tc.dpo:  # preference pairs, two rows each (flyer.data.pref_data)
        (sampler, batches), kwargs = (PairSampler, pair_eval_batches), {}
    evals = batches(data.val, tc.batch_size, tc.seq_len, tc.eval_batches, **kwargs)
    if chat:
        kwargs |= {"replica": dp_rank, "replicas": dp}
    seed = tc.seed * 1000 + (0 if chat else dp_rank)
    return sampler(data.train, tc.batch_size, tc.seq_len, seed=seed, **kwargs), evals
