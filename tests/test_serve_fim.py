"""Fill-in-the-middle on ``/v1/completions`` (``suffix``, as DeepSeek's FIM completion API takes it) and ``flyer
generate --suffix``, through the official ``openai`` client: the engine receives exactly the PSM ids transformers
encodes from the PSM text (the tokenizer's BOS once, DeepSeek's or Qwen's markers in prefix-suffix-middle order), the
greedy middle equals ``generate`` and ``flyer generate --suffix`` on those ids, streamed equals whole; refusals (no
FIM tokens, echo, token-id prompts, a non-string suffix) answer 400 naming ``suffix`` before the engine hears of
them."""

import json
import shutil

import httpx
import openai
import pytest
import torch
from hf_models import build, make_tokenizer
from served import EngineServer, client, serving
from test_serve_api import _error
from test_serve_tools_v3 import _Scripted
from tokenizers import AddedToken, Tokenizer, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from flyer.cli import main
from flyer.data.fim import DEEPSEEK, QWEN, FimTokens
from flyer.infer import GenerationConfig, generate
from flyer.infer.cli import ByteTokenizer
from flyer.interop.hf import load_hf, load_tokenizer
from flyer.serve.api import Api
from flyer.serve.engine import Engine, EngineConfig
from flyer.serve.request import Limits

LIMITS = Limits(vocab_size=1 << 20, max_seq_len=4096, block_size=16, capacity=256, max_queue=8)
PREFIX, SUFFIX = "def fox(the quick):\n    ", "\n    return the lazy dog"
SCRIPT = [100, 101, 102]  # what the stand-in engine answers, whatever the prompt


def _with_markers(path, markers: FimTokens, bos: bool = True) -> None:
    """``path``'s tokenizer (``hf_models.make_tokenizer``'s) with ``markers`` added as one token each; not special,
    as DeepSeek's tokenizer holds its FIM tokens. ``bos=False``: no BOS added to an encoding (as Qwen's)."""
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.add_tokens([AddedToken(m, special=False, normalized=False) for m in (markers.begin, markers.hole, markers.end)])
    if not bos:
        tok.post_processor = processors.TemplateProcessing(single="$A", special_tokens=[])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            add_bos_token=bos).save_pretrained(path)


def _psm_ids(path, markers: FimTokens, prefix: str, suffix: str) -> list[int]:
    """The oracle: transformers' tokenizer of ``path`` on the PSM text (as DeepSeek-Coder's FIM example encodes
    it), checked against the layout built piece by piece (BOS where the tokenizer adds one, then the markers)."""
    hf = AutoTokenizer.from_pretrained(path)
    ids = hf(markers.psm(prefix, suffix))["input_ids"]
    begin, hole, end = hf.convert_tokens_to_ids([markers.begin, markers.hole, markers.end])
    bos = [hf.bos_token_id] if hf("x")["input_ids"][0] == hf.bos_token_id else []
    assert ids == bos + [begin, *hf.encode(prefix, add_special_tokens=False), hole,
                         *hf.encode(suffix, add_special_tokens=False), end]
    return ids


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny random DeepSeek-V3 checkpoint whose tokenizer holds DeepSeek's FIM tokens (and adds a BOS)."""
    path = tmp_path_factory.mktemp("v3_fim")
    build("v3", path)
    _with_markers(path, DEEPSEEK)
    return path


@pytest.fixture(scope="module")
def served(ckpt):
    model, _, tok = load_hf(ckpt)
    s = EngineServer(Engine(model, EngineConfig(kv_cache_bytes=1 << 24, block_size=16, cache_dtype=torch.float32),
                            tokenizer=tok), lambda link: Api(link, tok, "tiny-test"))
    s.model, s.tok = model, tok
    yield s
    s.close()


class _Recording(_Scripted):
    """The stand-in engine (``SCRIPT`` for every request), keeping each prompt it is sent."""

    def __init__(self):
        super().__init__(LIMITS, SCRIPT)
        self.prompts = []

    def submit(self, prompt, opts, emit):
        self.prompts.append(list(prompt))
        return super().submit(prompt, opts, emit)


def _recorded(tok, **kw) -> tuple[_Recording, list]:
    """(the stand-in, the choices) of one completion from an ``Api`` over the stand-in and ``tok``."""
    engine = _Recording()
    with serving(Api(engine, tok, "tiny-test")) as url:
        r = client(url).completions.create(model="tiny-test", max_tokens=len(SCRIPT), **kw)
    return engine, r


def test_the_engine_receives_the_psm_ids_of_each_prompt(ckpt):
    tok = load_tokenizer(ckpt)
    psm = _psm_ids(ckpt, DEEPSEEK, PREFIX, SUFFIX)
    assert psm.count(tok.bos_id()) == 1
    engine, r = _recorded(tok, prompt=PREFIX, suffix=SUFFIX)
    assert engine.prompts == [psm] and r.usage.prompt_tokens == len(psm)
    assert r.choices[0].text == tok.decode(SCRIPT)  # the middle alone
    other = "class Dog:"
    engine, r = _recorded(tok, prompt=[PREFIX, other], suffix=SUFFIX, n=2)  # each prompt its own FIM prompt
    psm_other = _psm_ids(ckpt, DEEPSEEK, other, SUFFIX)
    assert engine.prompts == [psm, psm, psm_other, psm_other] and len(r.choices) == 4
    assert r.usage.prompt_tokens == len(psm) + len(psm_other)  # each prompt once, as OpenAI counts n choices
    for plain in (dict(suffix=""), dict(suffix=None), {}):  # an empty or absent suffix: a plain completion
        engine, _ = _recorded(tok, prompt=PREFIX, **plain)
        assert engine.prompts == [tok.encode_ids(PREFIX)]


def test_qwen_markers_without_a_bos(ckpt, tmp_path):
    """Qwen2.5-Coder's markers, its tokenizer adding no BOS: the prompt opens with <|fim_prefix|>."""
    for f in ("config.json", "generation_config.json"):
        shutil.copy(ckpt / f, tmp_path / f)
    make_tokenizer(tmp_path)
    _with_markers(tmp_path, QWEN, bos=False)
    tok = load_tokenizer(tmp_path)
    assert tok.fim_tokens() == QWEN
    psm = _psm_ids(tmp_path, QWEN, PREFIX, SUFFIX)
    assert psm[0] == tok.tok.token_to_id(QWEN.begin)
    engine, r = _recorded(tok, prompt=PREFIX, suffix=SUFFIX)
    assert engine.prompts == [psm] and r.usage.prompt_tokens == len(psm)


def test_greedy_middle_equals_generate_streamed_or_whole(served, ckpt, capsys):
    psm = _psm_ids(ckpt, DEEPSEEK, PREFIX, SUFFIX)
    eos = served.tok.eos_ids()
    gen = GenerationConfig(max_new_tokens=8, cache_dtype=torch.float32, eos_id=eos[0], stop_ids=eos[1:])
    ids = [t for t in generate(served.model, [psm], gen).tokens[0] if t not in eos]
    assert len(ids) == 8  # no EOS among them: a whole middle to compare
    kw = dict(model="tiny-test", prompt=PREFIX, suffix=SUFFIX, max_tokens=8, temperature=0, logprobs=1)
    c = served.client()
    whole = c.completions.create(**kw)
    assert whole.choices[0].text == served.tok.decode(ids) and whole.usage.prompt_tokens == len(psm)
    assert whole.usage.completion_tokens == len(ids) + (whole.choices[0].finish_reason == "stop")
    assert whole.choices[0].logprobs.text_offset[0] == 0  # offsets in the middle's text
    chunks = list(c.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == whole.choices[0].text
    streamed = [t for ch in chunks if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.tokens]
    assert streamed == whole.choices[0].logprobs.tokens
    cached = {"prompt_tokens_details"}  # the stream's prompt is the whole's: its full blocks come from the cache
    assert chunks[-1].usage.model_dump(exclude=cached) == whole.usage.model_dump(exclude=cached)
    bs = served.engine.cfg.block_size
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == (len(psm) - 1) // bs * bs
    # flyer generate --suffix: the same ids, the same middle
    assert main(["generate", "--ckpt", str(ckpt), "--prompt", PREFIX, "--suffix", SUFFIX, "--max-new-tokens", "8",
                 "--cache-dtype", "fp32", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["text"] == whole.choices[0].text and [t for t in out["token_ids"][0] if t not in eos] == ids


def test_refusals_answer_400_naming_suffix_before_the_engine_hears(ckpt):
    """No FIM tokens (byte tokens), echo, token-id prompts, a suffix that is not a string: 400 naming suffix in one
    line, raw HTTP and the openai client alike; nothing reaches the engine."""
    engine = _Recording()
    ok = dict(model="tiny-test", prompt=PREFIX, max_tokens=2, suffix=SUFFIX)
    cases = [(ByteTokenizer(), {}, "no fill-in-the-middle tokens"),
             (load_tokenizer(ckpt), dict(echo=True), "cannot be combined with echo"),
             (load_tokenizer(ckpt), dict(prompt=[5, 6, 7]), "needs a text prompt"),
             (load_tokenizer(ckpt), dict(prompt=[[5, 6], [7]]), "needs a text prompt"),
             (load_tokenizer(ckpt), dict(suffix=5), "suffix: Input should be a valid string")]
    for tok, over, message in cases:
        with serving(Api(engine, tok, "tiny-test")) as url:
            err = _error(httpx.post(url + "/v1/completions", json={**ok, **over}), 400, "suffix")
            assert message in err["message"] and "\n" not in err["message"], err
            with pytest.raises(openai.BadRequestError, match="suffix"):
                client(url).completions.create(**{**ok, **over})
    assert engine.prompts == []
    with serving(Api(engine, ByteTokenizer(), "tiny-test")) as url:  # "" is no suffix, echo or ids alike
        assert httpx.post(url + "/v1/completions", json={**ok, "suffix": "", "echo": True, "prompt": [5]}
                          ).status_code == 200
    assert engine.prompts == [[5]]


def test_generate_suffix_without_fim_tokens_names_the_flag(capsys):
    assert main(["generate", "--preset", "tiny", "--prompt", "a", "--suffix", "b", "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flyer: error: --suffix: ") and "no fill-in-the-middle tokens" in err and "\n" not in err, err


def test_a_marker_or_special_token_the_prompt_spells_is_text(ckpt):
    """A prompt or suffix that writes a FIM marker, BOS or EOS (editing a tokenizer's source, this repository's
    ``flyer/data/fim.py``) was encoded with the PSM frame in one pass, so its text became control tokens: a second
    HOLE or END, an EOS inside the prompt. It is text now, as llama.cpp's /infill reads it: one BOS and one of each
    marker, the pieces between them decoding to the prompt and suffix; without such text the ids are transformers'
    (``test_the_engine_receives_the_psm_ids_of_each_prompt``)."""
    tok = load_tokenizer(ckpt)
    begin, hole, end = (tok.encode_ids(m, add_special_tokens=False)[0] for m in (DEEPSEEK.begin, DEEPSEEK.hole,
                                                                                   DEEPSEEK.end))
    prefix = f"s = '{DEEPSEEK.hole}' + '<s>'\n"
    suffix = f"t = '{DEEPSEEK.end}</s>'\n"
    engine, r = _recorded(tok, prompt=prefix, suffix=suffix)
    (ids,) = engine.prompts
    controls = [t for t in ids if t in (tok.bos_id(), tok.eos_id(), begin, hole, end)]
    assert controls == [tok.bos_id(), begin, hole, end] and ids[:2] == [tok.bos_id(), begin] and ids[-1] == end
    h = ids.index(hole)
    assert tok.decode(ids[2:h]) == prefix and tok.decode(ids[h + 1:-1]) == suffix


def test_a_suffix_past_the_context_is_named_in_the_error(ckpt):
    """A short prompt with a long suffix was refused as "a 1021-token prompt leaves no room": the count held the
    suffix and the markers, the message said prompt. It says what the count is now."""
    tok = load_tokenizer(ckpt)
    with serving(Api(_Recording(), tok, "tiny-test")) as url:
        ok = dict(model="tiny-test", prompt="def f():", max_tokens=2)
        for suffix, field in (("x = 1\n" * LIMITS.max_seq_len, "prompt"), ("x = 1\n", "max_tokens")):
            resp = httpx.post(url + "/v1/completions", json={**ok, "suffix": suffix, "max_tokens": LIMITS.max_seq_len})
            err = _error(resp, 400, field)
            assert "-token FIM prompt (the prompt, suffix and markers)" in err["message"], err
