"""A tiktoken-format tokenizer directory as a ``tokenizers.Tokenizer``: Moonshot's Kimi K2 / K2-Thinking / K2.5 ship
``tiktoken.model`` (one ``base64(token bytes) rank`` per line), their special tokens in tokenizer_config.json's
``added_tokens_decoder`` (ids from the end of the ranks on, ``<|reserved_token_{id}|>`` in the gaps) and the
pre-tokenizer regex as ``pat_str`` in the remote-code tokenizer (``tokenization_kimi.py``, named by the config's
``auto_map``). Built as transformers' ``TikTokenConverter`` builds it (byte-level BPE, merges derived from the
ranks, ``ignore_merges``), it encodes as ``tiktoken.Encoding`` does and as transformers' tokenizer of the
directory, and saves as a ``tokenizer.json`` transformers loads without remote code.

Kimi's remote ``encode`` also cuts the text into pieces before tiktoken sees them (400,000-character chunks, and
runs of over 25,000 whitespace / non-whitespace characters: ``flyer.data.presplit``), encoding each alone. Where
the remote class defines that cut (``_split_whitespaces_or_nonwhitespaces``, its limits read from the module's
``TIKTOKEN_MAX_ENCODE_CHARS`` / ``MAX_NO_WHITESPACES_CHARS``), the tokenizer records it (``presplit_of``) and
flyer's encoders (``TextTokenizer.encode_ids``, the pretraining and chat data builds) cut as Kimi does, so ids
match on such runs too. A ``tokenizer.json`` cannot carry the cut (one saved from the tokenizer encodes a long
run whole, as transformers' converter of the directory does): a flyer checkpoint or ``flyer export`` of a model
with such a tokenizer carries the directory's files instead (``tokenizer_files``, ``flyer.data.tokenizer_copy``).

The data layer owns this (not ``flyer.interop``) because ``flyer.data.tokenizer.load_tokenizer`` is the one guard
every reader of a tokenizer goes through, and layers import downward only.
"""

from __future__ import annotations

import ast
import base64
import binascii
import itertools
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from flyer.data.presplit import PreSplit, set_presplit
from flyer.parse import json_loads

TIKTOKEN_FILE = "tiktoken.model"  # transformers' TIKTOKEN_LEGACY_NAME
# transformers' TikTokenConverter default, which it uses for every tiktoken file (it reads no pattern from the
# directory): flyer's choice for a directory that names none
DEFAULT_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                   r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
_MAX_LINE = 4096  # bytes: a token's base64 and its rank; real vocabularies' longest lines are ~200
_MAX_SOURCE = 1 << 20  # bytes of a remote-code tokenizer file read for its pat_str


def _byte_chars() -> list[str]:
    """GPT-2's byte -> printable character table (transformers' ``bytes_to_unicode``), which byte-level
    vocabularies and the ByteLevel pre-tokenizer / decoder of ``tokenizers`` use: printable Latin-1 bytes
    stand for themselves, the others for 256 + their order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def read_ranks(path: Path, error: type[ValueError]) -> list[bytes]:
    """The token bytes of the tiktoken file ``path`` in rank order, read a line at a time. Blank lines are
    skipped (as tiktoken's ``load_tiktoken_bpe`` skips them); every other line is ``base64 rank`` with the
    ranks 0, 1, 2, ... in order (as tiktoken writes them) and no token twice, and all 256 single bytes are
    tokens (byte-level BPE encodes any text). Else ``error`` with one line naming the file and line."""
    tokens: list[bytes] = []
    seen: dict[bytes, int] = {}
    try:
        f = open(path, "rb")
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from None
    with f:
        for n in itertools.count(1):
            line = f.readline(_MAX_LINE + 1)
            if not line:
                break
            where = f"{path}:{n}"
            if len(line) > _MAX_LINE:
                raise error(f"{where}: line longer than {_MAX_LINE} bytes (not a tiktoken file?)")
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2:
                raise error(f"{where}: expected 'base64-token rank', got {len(parts)} field(s)")
            try:
                token = base64.b64decode(parts[0], validate=True)
            except (binascii.Error, ValueError):
                raise error(f"{where}: the token is not base64") from None
            if not parts[1].isdigit():
                raise error(f"{where}: the rank is not a non-negative integer")
            rank = int(parts[1])
            if rank != len(tokens):
                what = "repeats" if rank < len(tokens) else "skips"
                raise error(f"{where}: rank {rank} {what} (expected {len(tokens)}: ranks run 0, 1, 2, ... in order)")
            if not token or token in seen:
                raise error(f"{where}: token {token!r} " + ("is empty" if not token else f"repeats rank {seen[token]}"))
            seen[token] = rank
            tokens.append(token)
    if not tokens:
        raise error(f"{path}: no tokens (empty file)")
    missing = [b for b in range(256) if bytes([b]) not in seen]
    if missing:
        raise error(f"{path}: byte 0x{missing[0]:02x} is not a token ({len(missing)} of the 256 single bytes "
                    "missing; byte-level BPE needs each)")
    return tokens


def bpe_from_ranks(tokens: list[bytes]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of the byte-level BPE that encodes as tiktoken does with ranks ``tokens`` (rank order),
    derived as transformers' ``TikTokenConverter`` derives them: each token of two or more bytes is the merge of
    every split of it into two tokens, ordered by its rank, then by the ranks of the two halves."""
    chars = _byte_chars()
    text = ["".join(chars[b] for b in t) for t in tokens]
    rank = {t: i for i, t in enumerate(tokens)}
    merges: list[tuple[str, str]] = []
    for t in tokens:  # in rank order already: merges come out sorted by the merged token's rank
        splits = sorted((rank[t[:k]], rank[t[k:]]) for k in range(1, len(t)) if t[:k] in rank and t[k:] in rank)
        merges.extend((text[a], text[b]) for a, b in splits)
    return {s: i for i, s in enumerate(text)}, merges


def tiktoken_tokenizer(tokens: list[bytes], pattern: str, special: list[str]) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` equal to ``tiktoken.Encoding(pat_str=pattern, mergeable_ranks=ranks of tokens,
    special_tokens={special[i]: len(tokens) + i})`` encoding with every special token allowed, built as
    transformers' ``TikTokenConverter.converted`` builds it. The regex compiles with Oniguruma (``tokenizers``);
    an invalid one raises ``ValueError``."""
    vocab, merges = bpe_from_ranks(tokens)
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, ignore_merges=True))  # a whole piece in the vocabulary
    # is one token, as tiktoken takes it before merging
    try:
        split = pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False)
    except Exception as e:  # tokenizers raises a bare Exception for a pattern Oniguruma rejects
        raise ValueError(f"Oniguruma rejects it ({(str(e).splitlines() or ['?'])[0]:.100})") from None
    tok.pre_tokenizer = pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                  use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in special])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def read_json_object(path: Path, error: type[ValueError]) -> dict:
    """A settings file's JSON object, or ``error`` with one line naming the file."""
    try:
        d = json_loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from None
    except ValueError as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise error(f"{path}: expected a JSON object")
    return d


def special_tokens(config: dict, n_base: int, where: Path, error: type[ValueError]) -> list[str]:
    """The special tokens after ``n_base`` ranks, as transformers lays them (``_convert_from_tiktoken``):
    ids ``n_base`` .. the largest id of tokenizer_config.json's ``added_tokens_decoder`` (``config``), named
    there, ``<|reserved_token_{id}|>`` in the gaps (as Kimi's tokenizer names them too)."""
    decoder = config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise error(f"{where}: added_tokens_decoder must be an object of id -> token")
    named: dict[int, str] = {}
    for key, e in decoder.items():
        content = e.get("content") if isinstance(e, dict) else e
        if not (isinstance(key, str) and key.isdigit()) or not isinstance(content, str) or not content:
            raise error(f"{where}: added_tokens_decoder[{key!r}] must map an id to a token (its content)")
        if int(key) < n_base:
            raise error(f"{where}: added_tokens_decoder id {key} is one of the {n_base} tiktoken ranks "
                        "(special tokens follow them)")
        named[int(key)] = content
    special = [named.get(i, f"<|reserved_token_{i}|>") for i in range(n_base, max(named, default=n_base - 1) + 1)]
    twice = next((s for s in named.values() if special.count(s) > 1), None)
    if twice is not None:
        raise error(f"{where}: added_tokens_decoder names {twice!r} at more than one id")
    return special


def _literal(node: ast.expr) -> str | None:
    """A string expression of constants (``r"..."``, ``"a" + "b"``, ``"|".join([...])``), or None."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        a, b = _literal(node.left), _literal(node.right)
        return None if a is None or b is None else a + b
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "join"
            and len(node.args) == 1 and not node.keywords and isinstance(node.args[0], (ast.List, ast.Tuple))):
        sep, parts = _literal(node.func.value), [_literal(e) for e in node.args[0].elts]
        return None if sep is None or None in parts else sep.join(parts)
    return None


def remote_settings(path: Path, class_name: str, error: type[ValueError]) -> tuple[str, PreSplit | None]:
    """(the ``pat_str`` class attribute, the cut of its encode or None) of ``class_name`` in the remote-code tokenizer
    ``path``, read (never run) from its syntax tree; ``error`` naming the file when it has no pattern flyer can read,
    when the class changes the text before tiktoken sees it (a ``pre_tokenizer_process`` other than Kimi's
    ``return [text]``), or cuts it (``_presplit``) with limits flyer cannot read."""
    tree, cls = _remote_tree(path, class_name, error)
    pattern = None
    for node in cls.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pat_str" for t in node.targets):
            pattern = _literal(node.value)
            if pattern is None:
                raise error(f"{path}: {class_name}.pat_str is not a string of constants flyer can read")
        if isinstance(node, ast.FunctionDef) and node.name == "pre_tokenizer_process" and not _returns_text(node):
            raise error(f"{path}: {class_name}.pre_tokenizer_process rewrites the text before tiktoken encodes it; "
                        "flyer cannot reproduce remote code")
    if pattern is None:
        raise error(f"{path}: {class_name} has no pat_str (the tiktoken pre-tokenizer regex)")
    return pattern, _presplit(tree, cls, path, error)


def _remote_tree(path: Path, class_name: str, error: type[ValueError]) -> tuple[ast.Module, ast.ClassDef]:
    """(syntax tree, class ``class_name``) of the remote-code tokenizer module ``path``; ``error`` naming the file
    when it cannot be read, is not Python or has no such class."""
    try:
        with open(path, "rb") as f:
            source = f.read(_MAX_SOURCE + 1)
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e}; tokenizer_config.json's auto_map names it)") from None
    if len(source) > _MAX_SOURCE:
        raise error(f"{path}: larger than {_MAX_SOURCE} bytes (not a tokenizer module?)")
    try:
        tree = ast.parse(source, filename=str(path))
    except (SyntaxError, ValueError) as e:
        raise error(f"{path}: not Python flyer can read ({type(e).__name__})") from None
    cls = next((n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == class_name), None)
    if cls is None:
        raise error(f"{path}: no class {class_name} (tokenizer_config.json's auto_map names it)")
    return tree, cls


_SORT_CALL = "deep_sort_dict"  # Kimi's: its apply_chat_template calls it on the tools


def sorts_tools(root: str | Path) -> bool:
    """Whether the remote-code tokenizer of directory ``root`` (tokenizer_config.json's ``auto_map``) sorts the keys
    of the tools, at every depth, before its chat template renders them: its class's ``apply_chat_template`` calls
    ``deep_sort_dict(tools)``, as Kimi's ``tokenization_kimi.py`` does. Read from its syntax tree, never run; False
    where there is none or it cannot be read (loading the tokenizer says why)."""
    root = Path(root)
    settings = root / "tokenizer_config.json"
    try:
        ref = _remote_class(root, read_json_object(settings, ValueError) if settings.is_file() else {}, ValueError)
        if ref is None:
            return False
        _, cls = _remote_tree(root / f"{ref[0]}.py", ref[1], ValueError)
    except ValueError:
        return False
    return any(isinstance(fn, ast.FunctionDef) and fn.name == "apply_chat_template" and any(
        isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == _SORT_CALL and n.args
        and isinstance(n.args[0], ast.Name) and n.args[0].id == "tools" for n in ast.walk(fn)) for fn in cls.body)


_CUT_METHOD = "_split_whitespaces_or_nonwhitespaces"  # Kimi's; its encode calls it on every chunk
_CUT_LIMITS = ("TIKTOKEN_MAX_ENCODE_CHARS", "MAX_NO_WHITESPACES_CHARS")  # PreSplit's max_chars, max_run


def _presplit(tree: ast.Module, cls: ast.ClassDef, path: Path, error: type[ValueError]) -> PreSplit | None:
    """Kimi's cut (``flyer.data.presplit``) where the class defines ``_CUT_METHOD``, its limits the integer
    constants the module assigns to ``_CUT_LIMITS`` (locals of Kimi's ``encode``); None where it defines none."""
    if not any(isinstance(n, ast.FunctionDef) and n.name == _CUT_METHOD for n in cls.body):
        return None
    found: dict[str, set] = {name: set() for name in _CUT_LIMITS}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name) \
                and node.targets[0].id in found:
            v = node.value.value if isinstance(node.value, ast.Constant) else None
            found[node.targets[0].id].add(v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None)
    for name, values in found.items():
        if len(values) != 1 or None in values:
            raise error(f"{path}: {cls.name}.{_CUT_METHOD} cuts the text, but {name} is not one positive integer "
                        "constant flyer can read")
    return PreSplit(*(found[name].pop() for name in _CUT_LIMITS))


def _returns_text(fn: ast.FunctionDef) -> bool:
    """``fn(self, text)`` is, less its docstring, ``return [text]``."""
    body = [s for s in fn.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    args = fn.args.args
    return (len(body) == 1 and isinstance(body[0], ast.Return) and isinstance(body[0].value, ast.List)
            and len(args) == 2 and len(body[0].value.elts) == 1 and isinstance(body[0].value.elts[0], ast.Name)
            and body[0].value.elts[0].id == args[1].arg)


def _remote_class(root: Path, config: dict, error: type[ValueError]) -> tuple[str, str] | None:
    """(module, class) of the remote-code tokenizer tokenizer_config.json's ``auto_map.AutoTokenizer`` (``config``)
    names, or None; a name that is not ``module.Class`` of a file in ``root``: ``error``."""
    auto = config.get("auto_map")
    ref = auto.get("AutoTokenizer") if isinstance(auto, dict) else auto
    ref = next((r for r in ref if r), None) if isinstance(ref, (list, tuple)) else ref
    if ref is None:
        return None
    if not isinstance(ref, str) or ref.count(".") != 1 or not ref.split(".")[0].isidentifier():
        raise error(f"{root / 'tokenizer_config.json'}: auto_map.AutoTokenizer {ref!r} is not 'module.Class' of a "
                    "file in the directory")
    module, cls = ref.split(".")
    return module, cls


def tokenizer_files(root: str | Path, error: type[ValueError]) -> list[str]:
    """Names of the files beside tokenizer_config.json that the tiktoken directory ``root``'s tokenizer is made of,
    which a copy of it carries as they are: ``tiktoken.model``, the remote-code module ``auto_map`` names (its
    pattern and cut; transformers runs it with trust_remote_code) and the modules it imports relatively, as
    transformers gathers them (Kimi K2.5's ``from .tool_declaration_ts import ...``; one not in ``root`` is left
    out, as Kimi's own fallback imports are optional)."""
    root = Path(root)
    settings = root / "tokenizer_config.json"
    ref = _remote_class(root, read_json_object(settings, error) if settings.is_file() else {}, error)
    names, todo = [TIKTOKEN_FILE], [f"{ref[0]}.py"] if ref else []
    while todo:
        name = todo.pop()
        if name in names or not (root / name).is_file():
            continue
        names.append(name)
        todo += [f"{m}.py" for m in _relative_imports(root / name, error)]
    return names


def _relative_imports(path: Path, error: type[ValueError]) -> list[str]:
    """The modules ``path`` imports from its own package (``from .name import ...``), read from its syntax tree."""
    try:
        with open(path, "rb") as f:
            tree = ast.parse(f.read(_MAX_SOURCE + 1), filename=str(path))
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from None
    except (SyntaxError, ValueError) as e:
        raise error(f"{path}: not Python flyer can read ({type(e).__name__})") from None
    return [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 1 and n.module
            and n.module.isidentifier()]


def pattern_source(root: Path, config: dict, error: type[ValueError]) -> tuple[str, str, PreSplit | None]:
    """(pre-tokenizer regex, where it came from, the cut before it) for the tiktoken directory ``root``: ``pat_str``
    and the cut (``remote_settings``) of the remote-code tokenizer its tokenizer_config.json's
    ``auto_map.AutoTokenizer`` names (Kimi's ``tokenization_kimi.py``: the release's own, a Han-aware regex;
    transformers without remote code would use its default instead), else ``DEFAULT_PATTERN``, what transformers
    uses, and no cut."""
    ref = _remote_class(root, config, error)
    if ref is None:
        return DEFAULT_PATTERN, "transformers' TikTokenConverter default", None
    module, cls = ref
    path = root / f"{module}.py"
    pattern, presplit = remote_settings(path, cls, error)
    return pattern, str(path), presplit


def read_tiktoken_dir(path: str | Path, error: type[ValueError]) -> Tokenizer:
    """The tokenizer of the tiktoken file ``path`` (``DIR/tiktoken.model``) with its directory's special tokens
    (``special_tokens``), pre-tokenizer regex and cut (``pattern_source``; ``presplit_of`` the tokenizer gives the
    cut); a bad file raises ``error`` with one line naming it."""
    path = Path(path)
    root = path.parent
    settings = root / "tokenizer_config.json"
    config = read_json_object(settings, error) if settings.is_file() else {}
    pattern, where, presplit = pattern_source(root, config, error)
    tokens = read_ranks(path, error)
    special = special_tokens(config, len(tokens), root / "tokenizer_config.json", error)
    try:
        tok = tiktoken_tokenizer(tokens, pattern, special)
    except ValueError as e:
        raise error(f"{where}: its pre-tokenizer regex is unusable: {e}") from None
    return set_presplit(tok, presplit)


__all__ = ["DEFAULT_PATTERN", "TIKTOKEN_FILE", "bpe_from_ranks", "pattern_source", "read_json_object", "read_ranks",
           "read_tiktoken_dir", "remote_settings", "special_tokens", "tiktoken_tokenizer", "tokenizer_files"]
