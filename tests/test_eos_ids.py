"""A checkpoint whose generation_config.json lists several end-of-sequence ids (Llama 3's
``"eos_token_id": [128001, 128009]``): ``flyer generate`` and ``flyer serve`` stop at any of them, as
transformers' ``generate`` does, not only at the first. Tiny random DeepseekV3 with an MTP layer, FP32, CPU."""

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from flyer.cli import main
from flyer.infer.cli import ByteTokenizer
from flyer.infer.generate import GenerationConfig, generate
from flyer.interop.export_config import eos_token_id
from flyer.interop.hf import TextTokenizer, load_hf, load_tokenizer
from flyer.serve.api import Api, CompletionBody
from flyer.serve.engine import Engine, EngineConfig
from tests.hf_models import add_mtp_layer, build

N = 16  # new tokens
PROMPT = "hello world"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """The directory, its greedy tokens without a stop (``out``), and the two EOS ids its
    generation_config.json lists: ``first`` = out[m], ``second`` = out[k] with k < m, so the second
    of the list is the first one generated."""
    path = tmp_path_factory.mktemp("v3-eos-list")
    add_mtp_layer(build("v3", path), path)
    ids = AutoTokenizer.from_pretrained(path)(PROMPT)["input_ids"]
    ref = AutoModelForCausalLM.from_pretrained(path).eval()
    out = ref.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=N, eos_token_id=None,
                       pad_token_id=0)[0, len(ids):].tolist()
    # a token first made at k >= 2, and another first made at m > k + 1, the first not made again before it
    k = next(i for i in range(2, N) if out[i] not in out[:i])
    m = next(i for i in range(k + 2, N) if out[i] not in out[:i] and out[k] not in out[k + 1:i])
    gc_path = path / "generation_config.json"
    gc = json.loads(gc_path.read_text())
    gc_path.write_text(json.dumps({**gc, "eos_token_id": [out[m], out[k]]}))
    return SimpleNamespace(path=path, ids=ids, out=out, k=k, m=m, first=out[m], second=out[k])


def _transformers(path, ids, eos: list[int]) -> list[int]:
    """transformers' greedy tokens with the directory's generation_config.json (``eos``, its EOS list)."""
    ref = AutoModelForCausalLM.from_pretrained(path).eval()
    assert list(ref.generation_config.eos_token_id) == eos
    return ref.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=N, pad_token_id=0)[0, len(ids):].tolist()


def _cli(capsys, ckpt, *extra) -> dict:
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(ckpt.path), "--prompt", PROMPT, "--max-new-tokens", str(N),
                 "--temperature", "0", "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_the_tokenizer_keeps_every_eos_id_and_names_the_first(ckpt, tmp_path):
    tok = load_tokenizer(ckpt.path)
    assert tok.eos_ids() == (ckpt.first, ckpt.second) and tok.eos_id() == ckpt.first
    # one id, as before: generation_config.json's, else config.json's; flyer's own runs: the named EOS
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_text((ckpt.path / name).read_text())
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    assert load_tokenizer(tmp_path, {}).eos_ids() == (2,)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": []}))
    assert load_tokenizer(tmp_path, {"eos_token_id": [7, 7, 9]}).eos_ids() == (7, 9)
    assert ByteTokenizer().eos_ids() == () and ByteTokenizer().eos_id() is None


def test_generate_stops_at_the_second_eos_id_of_the_list_as_transformers(ckpt, capsys):
    want = _transformers(ckpt.path, ckpt.ids, [ckpt.first, ckpt.second])
    # not vacuous: transformers stops at the list's second id, before its first, which greedy decoding makes later
    assert want == ckpt.out[:ckpt.k + 1] and want[-1] == ckpt.second
    assert ckpt.out[ckpt.m] == ckpt.first and ckpt.first not in want
    res = _cli(capsys, ckpt)
    assert res["token_ids"] == [want]
    text = AutoTokenizer.from_pretrained(ckpt.path).decode(want[:-1], skip_special_tokens=True)
    assert res["text"] == text
    assert _cli(capsys, ckpt, "--speculative", "mtp", "--draft-tokens", "2")["token_ids"] == [want]
    # the library: eos_id and stop_ids both end a row, plain and speculative, in a batch
    model, _, _ = load_hf(ckpt.path)
    for spec in (None, "mtp"):
        gen = GenerationConfig(max_new_tokens=N, cache_dtype=torch.float32, eos_id=ckpt.first,
                               stop_ids=(ckpt.second,), speculative=spec)
        assert generate(model, [ckpt.ids, ckpt.ids[:-1]], gen).tokens[0] == want


def test_the_eos_id_flag_still_replaces_the_checkpoints_ids(ckpt, capsys):
    assert _cli(capsys, ckpt, "--eos-id", str(ckpt.first))["token_ids"] == [ckpt.out[:ckpt.m + 1]]
    assert _cli(capsys, ckpt, "--eos-id", "-1")["token_ids"] == [ckpt.out]


def test_serve_options_stop_at_either_eos_id(ckpt):
    model, _, tok = load_hf(ckpt.path)
    for spec in (None, "mtp"):
        eng = Engine(model, EngineConfig(kv_cache_bytes=1 << 22, block_size=4, cache_dtype=torch.float32,
                                         speculative=spec))
        api = Api(SimpleNamespace(limits=eng.limits), tok, "tiny")
        body = CompletionBody(model="tiny", prompt=PROMPT, max_tokens=N, temperature=0.0)
        opts = api._options(body, N, len(ckpt.ids), None)
        assert opts.stop_ids == (ckpt.first, ckpt.second)
        # from the prompt, the second id comes first; after it (the prompt continued through it), the first
        cont = ckpt.ids + ckpt.out[:ckpt.k + 1]
        events = {0: [], 1: []}
        for i, p in enumerate((ckpt.ids, cont)):
            eng.submit(p, opts, events[i].append)
        eng.run_until_idle()
        assert [e.token for e in events[0]] == ckpt.out[:ckpt.k + 1] and events[0][-1].finish_reason == "stop"
        assert [e.token for e in events[1]] == ckpt.out[ckpt.k + 1:ckpt.m + 1]
        assert events[1][-1].finish_reason == "stop" and events[1][-1].token == ckpt.first
    # transformers agrees on the continuation
    assert _transformers(ckpt.path, cont, [ckpt.first, ckpt.second]) == ckpt.out[ckpt.k + 1:ckpt.m + 1]


def test_export_writes_every_eos_id(ckpt):
    """``flyer export`` writes the list back (it wrote the first id alone), a single id as an int."""
    _, _, tok = load_hf(ckpt.path)
    assert eos_token_id(tok) == [ckpt.first, ckpt.second]
    assert eos_token_id(TextTokenizer(tok.tok, ckpt.first)) == ckpt.first
