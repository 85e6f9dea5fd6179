"""A run fine-tuned from a Hugging Face directory (``flyer train --init HFDIR``) carries that
directory's tokenizer and generation settings (tokenizer_config.json, chat_template.jinja and its named
templates, special_tokens_map.json, generation_config.json) in every checkpoint, byte for byte and in the
manifest, and its readers use them as transformers uses the directory's: the chat template
``flyer serve`` renders, the BOS a prompt gets, every EOS id of generation_config.json's list.
A resumed run and a run initialised from it keep carrying them; a bad one is one line naming it.
Tiny random DeepseekV3, FP32, CPU."""

import hashlib
import json
import shutil
from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer, GenerationConfig

from flyer.cli import main
from flyer.interop.hf import load_tokenizer
from flyer.interop.load import load_pretrained, settings_dir
from flyer.serve.api import Api, ChatBody
from flyer.data.chat_template import read_chat_template
from flyer.train import checkpoint as ckpt
from tests.hf_models import build

TEXT = "the quick brown fox jumps over the lazy dog. hello world, flyer reads checkpoints\n" * 200
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}User: {{ m['content'] }}\n"
            "{% elif m['role'] == 'system' %}{{ m['content'] }}\n\n{% else %}Assistant: {{ m['content'] }}"
            "{{ eos_token }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")
MSGS = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"},
        {"role": "assistant", "content": "the fox"}, {"role": "user", "content": "again"}]
SECOND_EOS = 100  # generation_config.json's eos_token_id is [2 ("</s>"), SECOND_EOS], as Llama 3's lists two
TOOL_TEMPLATE = "{% for t in tools %}Tool {{ t['function']['name'] }}\n{% endfor %}" + TEMPLATE
TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}]
NAMED = "additional_chat_templates/tool_use.jinja"
SETTINGS = ("tokenizer_config.json", "generation_config.json", "special_tokens_map.json", "chat_template.jinja", NAMED)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny DeepseekV3 directory with an EOS list, sampling defaults and a special_tokens_map.json,
    and the text to fine-tune on."""
    root = tmp_path_factory.mktemp("hf-settings")
    build("v3", root / "src")
    gc = json.loads((root / "src" / "generation_config.json").read_text())
    (root / "src" / "generation_config.json").write_text(
        json.dumps({**gc, "eos_token_id": [2, SECOND_EOS], "temperature": 0.6, "top_p": 0.9}, indent=2))
    (root / "src" / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    (root / "text.txt").write_text(TEXT)
    return root


def with_template(base, dest, where: str):
    """A copy of the base directory whose chat template is in tokenizer_config.json or chat_template.jinja, or
    with a "tool_use" template beside it: as transformers 5 saves them ("named": the default in chat_template.jinja,
    the other in additional_chat_templates/), or in tokenizer_config.json's older list ("named_config")."""
    shutil.copytree(base / "src", dest)
    if where in ("jinja", "named"):
        (dest / "chat_template.jinja").write_text(TEMPLATE)
    if where == "named":
        (dest / NAMED).parent.mkdir()
        (dest / NAMED).write_text(TOOL_TEMPLATE)
    if where in ("tokenizer_config", "named_config"):
        named = [{"name": "default", "template": TEMPLATE}, {"name": "tool_use", "template": TOOL_TEMPLATE}]
        tc = json.loads((dest / "tokenizer_config.json").read_text())
        (dest / "tokenizer_config.json").write_text(json.dumps(
            {**tc, "chat_template": named if where == "named_config" else TEMPLATE}))
    return dest


def train(base, init, out, *extra) -> int:
    return main(["train", "--init", str(init), "--steps", "1", "--batch-size", "2", "--seq-len", "16",
                 "--data", str(base / "text.txt"), "--data-cache", str(base / "cache"), "--out", str(out),
                 "--no-progress", "--no-plots", "--eval-every", "1", "--eval-batches", "1", "--ckpt-every", "1",
                 "--device", "cpu", *extra])


def newest(run):
    return ckpt.list_checkpoints(run / "checkpoints")[0]


def carried(step, src) -> dict[str, bytes]:
    """The settings files of ``src``, checked to be in checkpoint ``step`` as they are and in its manifest."""
    files = {n: (src / n).read_bytes() for n in SETTINGS if (src / n).is_file()}
    listed = ckpt.verify_checkpoint(step)["files"]
    for name, data in files.items():
        assert (step / name).is_file(), f"{name} not carried into {step}"
        assert (step / name).read_bytes() == data
        assert listed[name]["sha256"] == hashlib.sha256(data).hexdigest()
    return files


@pytest.fixture(scope="module", params=["tokenizer_config", "jinja", "named", "named_config"])
def trained(base, request):
    src = with_template(base, base / f"src-{request.param}", request.param)
    run = base / f"run-{request.param}"
    assert train(base, src, run) == 0
    template = {"default": TEMPLATE, "tool_use": TOOL_TEMPLATE} if "named" in request.param else TEMPLATE
    return SimpleNamespace(src=src, run=run, hf=AutoTokenizer.from_pretrained(src), template=template)


def test_a_run_from_hf_renders_its_chat_template_and_stops_at_its_eos_ids(trained):
    """What flyer serve renders for the run equals transformers' apply_chat_template for the HF
    directory (text and token ids: one BOS, the template's eos_token); the run's EOS ids are the
    list transformers' GenerationConfig reads, and a completion prompt gets the BOS it would."""
    step = newest(trained.run)
    assert set(carried(step, trained.src)) >= {"tokenizer_config.json", "generation_config.json",
                                               "special_tokens_map.json"}
    tok = load_pretrained(trained.run)[2]
    hf = trained.hf
    assert list(tok.eos_ids()) == GenerationConfig.from_pretrained(trained.src).eos_token_id == [2, SECOND_EOS]
    assert tok.eos_ids() == load_tokenizer(trained.src).eos_ids() and tok.bos_id() == hf.bos_token_id == 1
    assert tok.encode_ids("hello world") == hf("hello world")["input_ids"]
    api = Api(None, tok, "run", chat_template=read_chat_template(str(trained.run)))
    assert api.render_chat(MSGS) == hf.apply_chat_template(MSGS, tokenize=False, add_generation_prompt=True)
    want = hf.apply_chat_template(MSGS, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert api._chat_prompt(ChatBody(model="run", messages=MSGS)) == list(want)
    # with tools, named templates' "tool_use" one, as transformers picks it
    with_tools = hf.apply_chat_template(MSGS, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert api.render_chat(MSGS, TOOLS) == with_tools and ("Tool lookup" in with_tools) == ("named" in trained.src.name)
    assert read_chat_template(str(step)) == trained.template  # a step directory too
    assert settings_dir(trained.run) == settings_dir(step) == step and settings_dir(trained.src) == trained.src


def test_generate_of_the_run_stops_at_the_second_eos_id(trained, capsys):
    """``flyer generate RUN``: the second id of the list ends generation (pushed to be the first
    token by a logit bias), as transformers' generate stops at any of them; the prompt has its BOS."""
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(trained.run), "--prompt", "hello world", "--max-new-tokens", "5",
                 "--logit-bias", f"{SECOND_EOS}=100", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["token_ids"] == [[SECOND_EOS]]
    assert out["prompt_tokens"] == len(trained.hf("hello world")["input_ids"])


def test_export_of_the_run_writes_the_models_settings(trained, tmp_path, capsys):
    """``flyer export RUN`` writes what the HF directory says of its tokenizer: transformers renders
    the same chat and reads the same EOS list and BOS from the export as from the directory."""
    assert main(["export", str(trained.run), "--out", str(tmp_path / "out")]) == 0
    hf = AutoTokenizer.from_pretrained(tmp_path / "out")
    for tools in (None, TOOLS):
        want = trained.hf.apply_chat_template(MSGS, tools=tools, tokenize=False, add_generation_prompt=True)
        assert hf.apply_chat_template(MSGS, tools=tools, tokenize=False, add_generation_prompt=True) == want
    assert GenerationConfig.from_pretrained(tmp_path / "out").eos_token_id == [2, SECOND_EOS]
    assert hf.bos_token_id == trained.hf.bos_token_id and hf("hello")["input_ids"] == trained.hf("hello")["input_ids"]


def test_resume_and_init_from_the_run_keep_carrying_them(base, trained, tmp_path):
    """A resumed run carries the files of the checkpoint it resumes from (not what its --init
    directory holds now); a run initialised from the run carries them too."""
    src, run = tmp_path / "src", tmp_path / "run"
    shutil.copytree(trained.src, src)
    shutil.copytree(trained.run, run)
    want = carried(newest(run), trained.src)
    tc = json.loads((src / "tokenizer_config.json").read_text())
    (src / "tokenizer_config.json").write_text(json.dumps({**tc, "chat_template": "changed"}))
    (src / "generation_config.json").unlink()
    (src / "chat_template.jinja").unlink(missing_ok=True)
    shutil.rmtree(src / NAMED.split("/")[0], ignore_errors=True)
    assert train(base, src, run, "--resume", "--steps", "2") == 0
    assert newest(run).name == ckpt.step_dir_name(2)
    assert carried(newest(run), trained.src) == want
    assert train(base, run, tmp_path / "again") == 0
    assert carried(newest(tmp_path / "again"), trained.src) == want
    assert read_chat_template(str(tmp_path / "again")) == trained.template


def _last_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_a_settings_file_that_is_not_json_is_one_line(base, trained, tmp_path, capsys):
    """Not JSON where JSON is expected: the HF directory's, refused when the run starts; a run's
    (written so: its manifest vouches for it), refused when generate loads it. Exit 2, the file named."""
    src = shutil.copytree(trained.src, tmp_path / "src")
    (src / "generation_config.json").write_text("{not json")
    capsys.readouterr()
    assert train(base, src, tmp_path / "out") == 2
    assert _last_line(capsys).startswith(f"flyer: error: {src / 'generation_config.json'}: not valid JSON")
    run = shutil.copytree(trained.run, tmp_path / "run")
    step = newest(run)
    (step / "tokenizer_config.json").write_text("{oops")
    manifest = json.loads((step / "manifest.json").read_text())
    data = (step / "tokenizer_config.json").read_bytes()
    manifest["files"]["tokenizer_config.json"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (step / "manifest.json").write_text(json.dumps(manifest))
    assert main(["generate", "--ckpt", str(run), "--prompt", "hi", "--max-new-tokens", "1"]) == 2
    line = _last_line(capsys)
    assert line.startswith("flyer: error: --ckpt: cannot load checkpoint")
    assert f"{step / 'tokenizer_config.json'}: not valid JSON" in line


def test_named_templates_need_a_default_and_the_manifest_covers_them(trained, tmp_path):
    """Named templates with no "default" (a conversation without tools has none to render with, and transformers
    refuses it too) are one line naming their folder; a named template added to a checkpoint after it was written
    is not in its manifest, so the checkpoint is refused, not read unchecked."""
    from flyer.errors import ConfigError

    src = shutil.copytree(trained.src, tmp_path / "src")
    (src / "chat_template.jinja").unlink(missing_ok=True)
    (src / NAMED).parent.mkdir(exist_ok=True)
    (src / NAMED).write_text(TOOL_TEMPLATE)
    with pytest.raises(ConfigError, match=r"additional_chat_templates: named chat templates \['tool_use'\] but none"):
        read_chat_template(str(src))
    with pytest.raises(ValueError, match="no default"):
        AutoTokenizer.from_pretrained(src).apply_chat_template(MSGS, tokenize=False)
    step = newest(shutil.copytree(trained.run, tmp_path / "run"))
    (step / NAMED).parent.mkdir(exist_ok=True)
    (step / "additional_chat_templates" / "rag.jinja").write_text(TEMPLATE)
    with pytest.raises(ckpt.CheckpointError, match="additional_chat_templates/rag.jinja is not in its manifest"):
        ckpt.verify_checkpoint(step)
