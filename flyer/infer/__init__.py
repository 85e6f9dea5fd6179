"""Inference: absorbed-MLA decoding against a latent KV cache, MTP speculative decoding and an
on-disk prefix cache.

    cache_fp8.py, indexer_fp8.py  FP8 rows of the latent and DSA index caches
    cache.py         preallocated per-layer caches: MLA latents + rope keys (absorbed), per-head
                     K/V (naive MLA, GQA) for comparison
    attention.py     cached attention: absorbed MLA, naive MLA, GQA (the training path is the oracle)
    hybrid_fp8.py, hybrid_index_fp4.py  V4's FP8 entries and FP4 index keys
    hybrid_cache.py  DeepSeek-V4's cache (window rings, compressor states, entries) and its attention
    decoder.py       the model run incrementally against a cache, per-row positions; finished
                     rows leave the batch
    sampling.py      greedy, temperature, top-p / top-k / min-p, logit bias, penalties
    prefix_cache.py  on-disk block cache keyed by token-prefix hashes (LRU, locked, checksummed)
    prefix_cache_hybrid.py  DeepSeek-V4's blocks (compressed entries) and boundary snapshots on that cache
    speculative.py   MTP draft + one-pass verify (greedy-identical; rejection sampling otherwise)
    generate.py      prefill + decode loop, batched prompts, EOS, prefix-cache glue
    weights.py       weights held in BF16 or FP8 for inference
    cli.py           ``flyer generate``

Each module imports only those listed above it.
"""

from flyer.infer.cache import KVCache, LatentCache, make_cache
from flyer.infer.decoder import Decoder
from flyer.infer.generate import GenerationConfig, GenerationResult, generate
from flyer.infer.prefix_cache import PrefixCache

__all__ = ["Decoder", "GenerationConfig", "GenerationResult", "KVCache", "LatentCache", "PrefixCache",
           "generate", "make_cache"]
