"""tiktoken-file edges a mutation sweep of ``flyer.data.tiktoken_file`` found unpinned: the last single byte,
the merges' order where a longer prefix ranks first (transformers' ``TikTokenConverter`` the oracle), a
``pat_str`` written as a sum (Python's own evaluation the oracle), the remote code's cut limits, and which imports
are the directory's own modules."""

import base64
import json

import pytest
from transformers.convert_slow_tokenizer import TikTokenConverter

from flyer.data import tiktoken_file as tf


def _write_ranks(path, tokens):
    path.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(tokens)))
    return path


def _remote(tmp_path, body: str, module: str = ""):
    p = tmp_path / "tokenization_x.py"
    p.write_text(module + "class Tok:\n" + body)
    return p


def test_a_file_without_the_last_single_byte_is_refused(tmp_path):
    p = _write_ranks(tmp_path / "tiktoken.model", [bytes([b]) for b in range(255)])  # 0xff missing
    with pytest.raises(ValueError, match=r"byte 0xff is not a token \(1 of the 256"):
        tf.read_ranks(p, ValueError)


def test_merges_are_ordered_as_transformers_converter_orders_them(tmp_path):
    """"abc" (a + bc) ranks before "ab": "abcd"'s splits sort by their halves' ranks, not by split position."""
    tokens = [bytes([b]) for b in range(256)] + [b"bc", b"abc", b"ab", b"cd", b"bcd", b"abcd"]
    p = _write_ranks(tmp_path / "tiktoken.model", tokens)
    assert tf.bpe_from_ranks(tokens) == TikTokenConverter(vocab_file=str(p)).extract_vocab_merges_from_model(str(p))


def test_a_pat_str_written_as_a_sum_reads_as_python_evaluates_it(tmp_path):
    src = 'pat_str = r"[a-z]+" + r"|[0-9]+" + "|\\\\s+"\n'
    want: dict = {}
    exec(src, want)
    assert tf.remote_settings(_remote(tmp_path, "    " + src), "Tok", ValueError) == (want["pat_str"], None)


SPLIT = '    pat_str = r"\\w+"\n    def _split_whitespaces_or_nonwhitespaces(self, s, n):\n        return [s]\n'


@pytest.mark.parametrize("limits", [(0, 25000), (400000, 0)])
def test_the_remote_codes_cut_limits_must_be_positive(tmp_path, limits):
    module = f"TIKTOKEN_MAX_ENCODE_CHARS = {limits[0]}\nMAX_NO_WHITESPACES_CHARS = {limits[1]}\n"
    with pytest.raises(ValueError, match="is not one positive integer"):
        tf.remote_settings(_remote(tmp_path, SPLIT, module), "Tok", ValueError)
    good = _remote(tmp_path, SPLIT, "TIKTOKEN_MAX_ENCODE_CHARS = 7\nMAX_NO_WHITESPACES_CHARS = 5\n")
    cut = tf.remote_settings(good, "Tok", ValueError)[1]
    assert (cut.max_chars, cut.max_run) == (7, 5)


def test_only_same_directory_imports_are_the_tokenizers_files(tmp_path):
    """``from .helper import`` names a file of the directory; ``from ..parent import`` and ``import os`` do not."""
    (tmp_path / "tiktoken.model").write_text("")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["tok_x.Tok", None]}}))
    (tmp_path / "tok_x.py").write_text("from .helper import a\nfrom ..parent import b\nimport os\nclass Tok: pass\n")
    (tmp_path / "helper.py").write_text("a = 1\n")
    (tmp_path / "parent.py").write_text("b = 1\n")
    assert sorted(tf.tokenizer_files(tmp_path, ValueError)) == ["helper.py", "tiktoken.model", "tok_x.py"]
