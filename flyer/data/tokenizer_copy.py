"""A tiktoken tokenizer's files carried as they are: what a flyer checkpoint of a run fine-tuned from a Kimi
directory, and an export of either, hold instead of a ``tokenizer.json``. A ``tokenizer.json`` cannot carry Kimi's
cut of long runs (``flyer.data.presplit``), and transformers and vLLM read such a directory through its remote
code (trust_remote_code), so the copy is the source's ``tiktoken.model``, remote-code modules and settings, byte
for byte, checked to build the tokenizer that was copied (its cut included) before it is used.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from tokenizers import Tokenizer

from flyer.data.presplit import presplit_of
from flyer.data.tiktoken_file import TIKTOKEN_FILE, tokenizer_files
from flyer.data.tokenizer import load_tokenizer, tokenizer_file


def read_tokenizer_files(root: str | Path, error: type[ValueError]) -> dict[str, bytes]:
    """The files the tokenizer of the directory ``root`` is made of beside tokenizer_config.json (name -> bytes,
    ``tiktoken_file.tokenizer_files``) where it is a tiktoken one (``tokenizer_file``: no tokenizer.json); {} for a
    ``tokenizer.json``, which a copy writes from the tokenizer itself. An unreadable one: ``error`` naming it."""
    root = Path(root)
    if tokenizer_file(root).name != TIKTOKEN_FILE:
        return {}
    out = {}
    for name in tokenizer_files(root, error):
        try:
            out[name] = (root / name).read_bytes()
        except OSError as e:
            raise error(f"{root / name}: cannot read ({e.strerror or e})") from None
    return out


def builds(root: str | Path, tok: Tokenizer, error: type[ValueError]) -> bool:
    """Whether the tokenizer flyer reads from the directory ``root`` encodes as ``tok``: the same tokenizer.json,
    and the same cut where ``tok`` has one (a tokenizer read back from a data cache's tokenizer.json has none)."""
    got = load_tokenizer(tokenizer_file(root), error)
    return got.to_str() == tok.to_str() and presplit_of(tok) in (None, presplit_of(got))


def files_build(files: dict[str, bytes], tok: Tokenizer, error: type[ValueError]) -> bool:
    """``builds`` for the files ``files`` (name -> bytes: ``read_tokenizer_files``' and tokenizer_config.json),
    written into a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="flyer-tokenizer-") as d:
        for name, data in files.items():
            (Path(d) / name).write_bytes(data)
        return builds(d, tok, error)


__all__ = ["builds", "files_build", "read_tokenizer_files"]
