"""Data pipeline: corpus -> byte-level BPE -> checksummed token shards -> random-access batches.

``prepare_data`` builds (or reuses) everything; ``BatchSampler`` draws training batches that
are a pure function of (seed, batch number); ``eval_batches`` gives fixed validation windows.
"""

from flyer.data.corpus import Document, clean_markdown, default_corpus_dir, find_documents, split_documents
from flyer.data.prepare import PreparedData, prepare_data, unigram_cross_entropy
from flyer.data.sampler import BatchSampler, eval_batches, eval_batches_bytes
from flyer.data.shards import ShardWriter, TokenShards, write_shard
from flyer.data.tokenizer import EOS_TOKEN, load_tokenizer, train_bpe
from flyer.errors import DataError

__all__ = [
    "BatchSampler", "DataError", "Document", "EOS_TOKEN", "PreparedData", "ShardWriter", "TokenShards",
    "clean_markdown", "default_corpus_dir", "eval_batches", "eval_batches_bytes", "find_documents", "load_tokenizer",
    "prepare_data", "split_documents", "train_bpe", "unigram_cross_entropy", "write_shard",
]
