"""Hostile input, as rules: every numeric flag of every subcommand (read from the argparse parsers)
fed NaN, +-inf, 0 and a negative value either runs or says one line ``flyer: error: --flag: ...``
and exits 2; path flags, config files and out-of-range values likewise."""

import argparse
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from flyer.cli import COMMAND_MODULES, build_parser, main
from flyer.errors import CheckpointError

VALUES = ["nan", "inf", "-inf", "0", "-1"]


def numeric_flags(parser: argparse.ArgumentParser, path: tuple[str, ...] = (), types=(int, float)):
    """(subcommand path, flag) of every option of ``types``, over every subcommand parser."""
    for action in parser._actions:  # argparse has no public way to list a parser's options
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from numeric_flags(sub, (*path, name), types)
        elif action.option_strings and action.type in types:
            yield path, max(action.option_strings, key=len)


FLAGS = list(numeric_flags(build_parser()))
ZERO_OK = set().union(*(getattr(m, "ZERO_OK", ()) for m in COMMAND_MODULES))


def quick_args(path: tuple[str, ...], tmp_path, data_cache) -> list[str]:
    """Arguments that make a subcommand fast (a one-step tiny run, two generated tokens, 256 GPUs to plan)."""
    return {
        ("train",): ["--preset", "tiny", "--steps", "1", "--batch-size", "2", "--seq-len", "16", "--eval-batches",
                     "1", "--data-cache", data_cache, "--out", str(tmp_path / "run"), "--no-plots", "--no-progress",
                     "--threads", "1", "--device", "cpu"],
        ("generate",): ["--preset", "tiny", "--prompt", "hi", "--max-new-tokens", "2", "--device", "cpu"],
        ("net", "simulate"): ["--nodes", "4", "--gpus-per-node", "2"],
        ("plan",): ["--gpus", "256"],  # the default 2048 GPUs: 2048 ranks to plan (13 s)
    }.get(path, [])


def outcome(capsys, argv) -> tuple[int, list[str], str]:
    rc = main(argv)
    captured = capsys.readouterr()
    return rc, captured.err.strip().splitlines(), captured.out


def assert_runs_or_one_line(rc, err, out, flag=None):
    if rc == 0:
        assert not re.search(r"\b(nan|inf)\b", out, re.I), out  # never a silently non-finite result
    else:
        assert rc == 2 and len(err) == 1 and err[0].startswith("flyer: error: "), (rc, err)
        if flag is not None:
            assert err[0].startswith(f"flyer: error: {flag}: "), err


def test_every_subcommand_has_numeric_flags_in_the_table():
    commands = {p for p, _ in FLAGS}
    assert {("train",), ("generate",), ("plan",), ("net", "topology"), ("net", "ep"), ("net", "latency"),
            ("net", "simulate"), ("net", "storage"), ("net", "pipeline")} <= commands
    assert len(FLAGS) >= 80


@pytest.mark.parametrize("path,flag", FLAGS, ids=lambda x: " ".join(x) if isinstance(x, tuple) else x)
def test_numeric_flag_rejects_nonfinite_and_nonsense(path, flag, tmp_path, data_cache, capsys):
    outcomes = {}
    for value in VALUES:
        argv = [*path, *quick_args(path, tmp_path / value, data_cache), f"{flag}={value}"]
        rc, err, out = outcome(capsys, argv)
        # an allowed 0 passes the flag check; the command may then stop on something else (serve: no model)
        allowed = value == "0" and flag.lstrip("-").replace("-", "_") in ZERO_OK
        assert_runs_or_one_line(rc, err, out, None if allowed else flag)
        outcomes[value] = rc
    assert outcomes["nan"] == outcomes["inf"] == outcomes["-inf"] == 2


def test_integer_flags_beyond_64_bits_are_one_line(tmp_path, data_cache, capsys):
    """10**400 is a valid int to argparse and too large for a float: refused before any work (it was
    an OverflowError traceback from the finiteness check)."""
    for path, flag in numeric_flags(build_parser(), types=(int,)):
        rc, err, out = outcome(capsys, [*path, *quick_args(path, tmp_path, data_cache), f"{flag}={10 ** 400}"])
        assert rc == 2, (path, flag)
        assert_runs_or_one_line(rc, err, out, flag)


def test_parse_errors_are_one_line(capsys):
    for argv in (["train", "--steps", "x"], ["plan", "--gpus"], ["net", "simulate", "--topology", "torus"],
                 ["net"], ["generate", "--prompt", "hi", "--bogus"]):
        rc, err, _ = outcome(capsys, argv)
        assert rc == 2 and len(err) == 1 and err[0].startswith("flyer: error: "), (argv, err)


def test_topology_search_is_bounded(capsys):
    t0 = time.perf_counter()
    rc, err, out = outcome(capsys, ["net", "topology", "--radix", "100000", "--json"])
    assert rc == 0 and time.perf_counter() - t0 < 10, err
    sf = next(r for r in json.loads(out) if r["name"] == "sf")
    assert sf["params"]["q"] == 44444 and sf["params"]["buildable_q"] == 44417


@pytest.fixture
def files(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    (tmp_path / "adir").mkdir()
    (tmp_path / "latin1.json").write_bytes('{"dim": "\xe9"}'.encode("latin-1"))
    (tmp_path / "bad.toml").write_bytes(b"[model]\ndim = \xff\n")
    # no model_type: no config class's defaults (flyer.interop.hf_defaults) to fill what it leaves out
    (tmp_path / "missing.json").write_text(json.dumps({"hidden_size": 64, "num_hidden_layers": 2}))
    (tmp_path / "nan.toml").write_text("[model]\nrope_theta = inf\n")
    (tmp_path / "gemma2.json").write_text(json.dumps({  # an architecture flyer does not implement, not a dense Llama
        "model_type": "gemma2", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "vocab_size": 300, "intermediate_size": 128, "sliding_window": 16, "final_logit_softcapping": 30.0}))
    # nesting deeper than Python's recursion, an integer longer than it converts: the parsers' own errors
    (tmp_path / "deep.json").write_text('{"dim": ' + "[" * DEEP + "]" * DEEP + "}")
    (tmp_path / "deep.toml").write_text("[train]\nsteps = " + "[" * DEEP + "]" * DEEP + "\n")
    (tmp_path / "digits.json").write_text('{"dim": ' + "9" * 5000 + "}")
    (tmp_path / "digits.toml").write_text("[model]\ndim = " + "9" * 5000 + "\n")
    (tmp_path / "layers.toml").write_text("[model]\nn_layers = 100000000\n")  # built layer by layer: 457 s at 1e5
    (tmp_path / "layers.json").write_text(json.dumps({  # the HF reader's per-layer lists come before validation
        "model_type": "deepseek_v3", "hidden_size": 64, "num_hidden_layers": 10**11, "num_attention_heads": 2,
        "vocab_size": 300, "intermediate_size": 64}))
    hf = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "vocab_size": 300}
    hand_edited = {  # values of the right JSON type read (divided by, compared) before they were validated
        "heads0": {**hf, "model_type": "llama", "num_attention_heads": 0, "intermediate_size": 128},
        "factor": {**hf, "model_type": "deepseek_v3", "rope_scaling": {"type": "yarn", "factor": "4"}},
        "rates": {**hf, "model_type": "deepseek_v4", "compress_rates": [4, 128]},
        "half": {**hf, "model_type": "deepseek_v4", "partial_rotary_factor": "half"},
        "config_v3": {"dim": 7168, "max_seq_len": "x"},  # DeepSeek's own config_*.json
    }
    for name, config in hand_edited.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(config))
    for step, state in (("step_00000001", "state.json"), ("step_00000002", "state-rank0.json")):
        step = tmp_path / step  # a flyer step whose manifest.json is gone: one process's, or several ranks'
        step.mkdir()
        (step / "config.json").write_text(json.dumps({"dim": 64}))
        (step / state).write_text("{}")
        (step / "model.safetensors").write_bytes(b"")
    (tmp_path / "threads.toml").write_text("[train]\nthreads = 100000\n")
    (tmp_path / "steps.toml").write_text("[train]\nsteps = 99999999999999999999999\n")
    (tmp_path / "lr.toml").write_text("[train]\nlr = nan\n")
    (tmp_path / "model5.toml").write_text("model = 5\n")  # a [model] table expected
    (tmp_path / "train_list.toml").write_text("train = [1]\n")
    for name, config in (("list", [1]), ("deep", None)):  # a run's step directory whose config.json is no object
        step = tmp_path / f"run_{name}" / "checkpoints" / "step_00000001"
        step.mkdir(parents=True)
        data = ("[1]" if config else "[" * DEEP + "]" * DEEP).encode()
        (step / "config.json").write_bytes(data)
        (step / "manifest.json").write_text(json.dumps({"format_version": 1, "step": 1, "files": {"config.json": {
            "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}}}))
    (tmp_path / "locked" / ".lock").mkdir(parents=True)
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "a.txt").write_text("some words\n" * 50)
    (tmp_path / "linked" / "b.txt").symlink_to(tmp_path / "nowhere.txt")
    return tmp_path


DEEP = 100_000


GEN = ["generate", "--preset", "tiny", "--prompt", "hi", "--max-new-tokens", "2", "--device", "cpu"]
PATH_CASES = [  # (argv with {t} for the files' folder, the words the one line must hold)
    (["train", "--out", "{t}/afile"], "--out: {t}/afile is a file, not a directory"),
    (["train", "--out", "{t}/afile/run"], "--out: {t}/afile/run lies under a file"),
    (["train", "--tensorboard", "{t}/afile"], "--tensorboard: {t}/afile is a file"),
    (["train", "--config", "{t}/adir"], "cannot read config file {t}/adir"),
    (["train", "--config", "{t}/latin1.json"], "{t}/latin1.json is not UTF-8 text"),
    (["train", "--config", "{t}/bad.toml"], "{t}/bad.toml is not UTF-8 text"),
    (["train", "--config", "{t}/missing.json"], "field 'vocab_size': required field is missing"),
    (["train", "--config", "{t}/nan.toml"], "'rope_theta': must be a finite number"),
    (["info", "--config", "{t}/missing.json"], "field 'vocab_size': required field is missing"),
    (["train", "--config", "{t}/gemma2.json"], "unsupported architecture 'gemma2'"),
    (["plan", "--config", "{t}/gemma2.json"], "unsupported architecture 'gemma2'"),
    (["plan", "--config", "{t}/latin1.json"], "is not UTF-8 text"),
    (["plan", "--hw", "hbm_gib=nan"], "--hw: hbm_gib must be a finite number > 0"),
    ([*GEN, "--prefix-cache", "{t}/afile"], "--prefix-cache: {t}/afile is a file, not a directory"),
    ([*GEN, "--prefix-cache", "{t}/afile/pc"], "--prefix-cache: cannot create directory {t}/afile/pc"),
    ([*GEN, "--prefix-cache", "{t}/pc", "--prefix-cache-size", "0"], "--prefix-cache-size: must be at least 1"),
    ([*GEN, "--eos-id", "100000"], "--eos-id: must be a token id in [0, 2048)"),
    ([*GEN, "--eos-id", "-2"], "--eos-id: must be a token id in [0, 2048)"),
    (["net", "topology", "--plot", "{t}/afile/x.png"], "--plot: cannot write {t}/afile/x.png"),
    (["net", "topology", "--plot", "{t}/adir"], "--plot: {t}/adir is a directory"),
    (["net", "ep", "--node-limit", "99"], "--node-limit: must be <= --experts-per-token = 9"),
    (["net", "ep", "--preset", "qwen2.5-72b"], "--preset: qwen2.5-72b is a dense model"),
    (["plan", "--preset", "qwen2.5-72b", "--ep", "8"], "--ep: must be 1 for a dense model"),
    (["train", "--config", "{t}/deep.json"], "{t}/deep.json is not valid JSON: nested too deeply (100001 levels)"),
    (["info", "--config", "{t}/deep.json"], "{t}/deep.json is not valid JSON: nested too deeply"),
    (["train", "--config", "{t}/deep.toml"], "{t}/deep.toml is not valid TOML: arrays or inline tables nested too"),
    (["plan", "--config", "{t}/deep.toml"], "{t}/deep.toml is not valid TOML: arrays or inline tables nested too"),
    (["info", "--config", "{t}/digits.json"], "{t}/digits.json is not valid JSON: an integer of more than 4300 digits"),
    (["info", "--config", "{t}/digits.toml"], "{t}/digits.toml is not valid TOML: an integer of more than 4300 digits"),
    (["info", "--config", "{t}/layers.toml"], "config field 'n_layers': must be at most 4,096"),
    (["train", "--config", "{t}/layers.toml"], "config field 'n_layers': must be at most 4,096"),
    (["info", "--config", "{t}/layers.json"], "field 'num_hidden_layers': must be at most 4,096"),
    (["train", "--threads", "100000"], "--threads: must be in [1, "),
    ([*GEN, "--threads", "100000"], "--threads: must be in [1, "),
    (["serve", "--ckpt", "{t}/nowhere", "--threads", "100000"], "--threads: must be in [1, "),
    (["train", "--config", "{t}/threads.toml"], "config field 'threads': must be in [1, "),
    (["train", "--config", "{t}/steps.toml"], "config field 'steps': must be below 2**64 in magnitude"),
    (["train", "--config", "{t}/lr.toml"], "config field 'lr': must be in (0, 1] (got nan) (in {t}/lr.toml)"),
    (["train", "--lr", "1e308"], "--lr: must be in (0, 1] (got 1e+308)"),
    (["train", "--out", "{t}/locked"], "--out: cannot open the run's lock file {t}/locked/.lock: Is a directory"),
    (["train", "--out", ""], "--out: must be a path, not empty"),
    (["train", "--data", ""], "--data: must be a path, not empty"),
    (["train", "--data-cache", ""], "--data-cache: must be a path, not empty"),
    (["train", "--config", ""], "--config: must be a path, not empty"),
    (["train", "--init", ""], "--init: must be a path, not empty"),
    (["generate", "--ckpt", "", "--prompt", "hi"], "--ckpt: must be a path, not empty"),
    ([*GEN, "--prefix-cache", ""], "--prefix-cache: must be a path, not empty"),
    ([*GEN, "--prefix-block", "3"], "--prefix-block sizes the prefix cache's blocks: give --prefix-cache DIR"),
    (["export", "{t}/adir", "--out", ""], "--out: must be a path, not empty"),
    (["info", "--config", ""], "--config: must be a path, not empty"),
    (["net", "topology", "--plot", ""], "--plot: must be a path, not empty"),
    (["train", "--data-cache", "{t}/afile"], "--data-cache: cannot create directory {t}/afile: File exists"),
    (["train", "--data", "{t}/linked"], "data file '{t}/linked/b.txt' is not readable (a link to nothing)"),
    (["info", "--config", "{t}/model5.toml"], "{t}/model5.toml: model must be a table ([model]), got int"),
    (["plan", "--config", "{t}/train_list.toml"], "{t}/train_list.toml: train must be a table ([train]), got list"),
    (["net", "topology", "--plot", "{t}/x.txt"], "--plot: cannot write {t}/x.txt: Format 'txt' is not supported"),
    (["net", "latency", "--sizes", "64,inf"], "--sizes: must be comma-separated whole byte counts from 1 to "),
    (["net", "latency", "--sizes", "1e400"], "--sizes: must be comma-separated whole byte counts"),
    (["net", "latency", "--sizes", "0.5"], "--sizes: must be comma-separated whole byte counts"),
    (["net", "latency", "--sizes", "1e300"], "--sizes: must be comma-separated whole byte counts"),
    (["serve", "--preset", "tiny", "--host", " ", "--port", "0"], "--host: must name an address"),
    (["serve", "--ckpt", "{t}/nothing", "--host", "", "--port", "0"], "--host: must name an address"),  # before loading
    (["serve", "--ckpt", "{t}/nothing", "--api-key", ""], "--api-key: must be a key without surrounding spaces"),
    (["serve", "--ckpt", "{t}/nothing", "--api-key", " k"], "--api-key: must be a key without surrounding spaces"),
    (["serve", "--ckpt", "{t}/nothing", "--model-name", ""], "--model-name: must name the model"),
    (["serve", "--ckpt", "{t}/nothing", "--kv-cache-memory", "0"], "--kv-cache-memory: must be >= 1 (got 0)"),
    ([*GEN[:-6], "--prompt", "a\udcffb", *GEN[-4:]], "--prompt: is not UTF-8 text"),
    ([*GEN, "--suffix", "\udcff"], "--suffix: is not UTF-8 text"),
    (["generate", "--ckpt", "{t}/run_list", "--prompt", "hi"], "bad config.json (a JSON list, not an object)"),
    (["generate", "--ckpt", "{t}/run_deep", "--prompt", "hi"], "bad config.json (nested too deeply"),
    (["info", "--config", "{t}/heads0.json"], "field 'num_attention_heads': must be >= 1 (got 0)"),
    (["info", "--config", "{t}/factor.json"], "field 'rope_scaling.factor': expected a number (got '4')"),
    (["info", "--config", "{t}/rates.json"], "field 'compress_rates': expected an object of ratios by layer type"),
    (["info", "--config", "{t}/half.json"], "field 'partial_rotary_factor': expected a number in (0, 1] (got 'half')"),
    (["info", "--config", "{t}/config_v3.json"], "config field 'max_seq_len': expected an integer (got 'x')"),
    (["generate", "--ckpt", "{t}/step_00000001", "--prompt", "hi"], "step_00000001: no manifest.json"),
    (["export", "{t}/step_00000001", "--out", "{t}/hf"], "step_00000001: no manifest.json"),
    (["generate", "--ckpt", "{t}/step_00000002", "--prompt", "hi"], "step_00000002: no manifest.json"),
]


@pytest.mark.parametrize("argv,words", PATH_CASES, ids=lambda x: " ".join(x) if isinstance(x, list) else None)
def test_paths_configs_and_ranges_are_one_line(argv, words, files, data_cache, capsys):
    t = str(files)
    argv = [a.format(t=t) for a in argv]
    if argv[0] == "train":
        argv += ["--preset", "tiny", "--no-progress", "--device", "cpu"]
        argv += [] if "--data-cache" in argv else ["--data-cache", data_cache]
        argv += [] if "--out" in argv else ["--out", f"{t}/run"]
    rc, err, _ = outcome(capsys, argv)
    assert rc == 2 and len(err) == 1 and err[0].startswith("flyer: error: "), err
    assert words.format(t=t) in err[0]


def test_read_only_prefix_cache_is_used_read_only(tmp_path, capsys, monkeypatch):
    cache = tmp_path / "pc"
    argv = [*GEN, "--prompt", "x" * 80, "--prefix-block", "16", "--prefix-cache", str(cache), "--json"]
    rc, err, out = outcome(capsys, argv)
    assert rc == 0, err
    before = {p: p.stat().st_mtime_ns for p in cache.rglob("*")}
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(cache) else real_access(p, mode))
    rc, err, out = outcome(capsys, argv)
    assert rc == 0, err
    assert json.loads(out)["prefix_cache"]["hits"] > 0
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.suffix != ".blk"} == \
        {p: t for p, t in before.items() if p.suffix != ".blk"}  # nothing written (LRU touches aside)


def test_library_warnings_are_one_line(tmp_path, capsys):
    from flyer.train import checkpoint as ckpt

    (tmp_path / "checkpoints" / ckpt.step_dir_name(7)).mkdir(parents=True)  # invalid: skipped with a warning
    rc, err, _ = outcome(capsys, ["generate", "--ckpt", str(tmp_path), "--prompt", "hi"])
    assert rc == 2
    assert err[0].startswith("flyer: warning: ") and "UserWarning" not in " ".join(err)
    assert err[-1].startswith("flyer: error: --ckpt: ")
    rc, err, _ = outcome(capsys, ["export", str(tmp_path), "--out", str(tmp_path / "hf")])  # any command
    assert rc == 2 and err[0].startswith("flyer: warning: checkpoint "), err


def test_kernels_unavailable_warns_with_one_prefix(capsys, monkeypatch):
    """It printed ``flyer: warning: flyer: fused CPU kernels unavailable``."""
    from flyer.kernels import extension

    def no_compiler():
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(extension, "build", no_compiler)
    monkeypatch.setitem(extension._state, "tried", False)
    monkeypatch.setitem(extension._state, "module", None)
    rc, err, _ = outcome(capsys, ["generate", "--preset", "tiny", "--prompt", "hi", "--max-new-tokens", "1",
                                  "--device", "cpu"])
    assert rc == 0
    assert err[0] == "flyer: warning: fused CPU kernels unavailable, using eager PyTorch (RuntimeError: no C++ " \
                     "compiler)", err
    assert sum("warning" in line for line in err) == 1, err


def test_data_cache_is_checked_and_a_read_only_one_is_used_read_only(tmp_path, monkeypatch, capsys):
    from flyer.data import prepare_data
    from flyer.data.shards import write_shard

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"line {i} of a small corpus, with words to merge.\n" for i in range(400)))
    cache = tmp_path / "cache"
    built = prepare_data(corpus, cache, vocab_size=300)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(cache) else real_access(p, mode))
    again = prepare_data(corpus, cache, vocab_size=300)  # read-only: the build is used, nothing written
    assert again.cache_dir == built.cache_dir and len(again.train) == len(built.train)
    monkeypatch.undo()
    shard = built.train.paths[0]  # a shard of another tokenizer (vocab 9000) under this one's name
    write_shard(shard, built.train.read(0, len(built.train)).clip(max=299), vocab_size=9000)
    rebuilt = prepare_data(corpus, cache, vocab_size=300)
    err = capsys.readouterr().err
    assert "rebuilding data cache" in err and "are for vocab 9000/300, its tokenizer has 300" in err
    assert rebuilt.train.vocab_size == rebuilt.vocab_size


def test_a_reader_gone_from_stdout_is_no_traceback():
    """``flyer info dsv3 | head -1``: writing to a pipe nobody reads ends the command quietly, 141 as the shell
    reports SIGPIPE, with nothing on stderr (not a BrokenPipeError traceback, twice)."""
    read, write = os.pipe()
    os.close(read)  # the reader left before the first write
    try:
        p = subprocess.run([sys.executable, "-m", "flyer", "info", "dsv3"], stdout=write, stderr=subprocess.PIPE,
                           timeout=120, text=True)
    finally:
        os.close(write)
    assert (p.returncode, p.stderr) == (128 + signal.SIGPIPE, "")


def test_chat_template_kwargs_nested_too_deeply_are_one_line(tmp_path, data_cache, capsys):
    """Deeper than Python's recursion: the flag's JSON error. Deep enough to parse but past 64 levels: refused before
    training, not a traceback at the first checkpoint (``dataclasses.asdict`` walks the train config level by
    level)."""
    from flyer.data.tokenizer import train_bpe

    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"hello {i}"},
                                                      {"role": "assistant", "content": "hi there"}]}) + "\n"
                             for i in range(16)))
    tok = tmp_path / "tokenizer.json"
    train_bpe(["hello hi there user assistant\n" * 20], vocab_size=300).save(str(tok))
    train = [*quick_args(("train",), tmp_path, data_cache), "--data", str(chats), "--tokenizer", str(tok),
             "--seq-len", "64"]
    for depth, words in ((30_000, "not valid JSON (nested too deeply (30001 levels)"), (500, "nests deeper than 64")):
        kwargs = '{"a": ' + "[" * depth + "]" * depth + "}"
        rc, err, _ = outcome(capsys, ["train", *train, "--chat-template-kwargs", kwargs])
        assert rc == 2 and len(err) == 1 and err[0].startswith("flyer: error: --chat-template-kwargs: "), err
        assert words in err[0], err


def test_chat_lines_nested_too_deeply_or_not_utf8_are_one_line(tmp_path):
    from flyer.data.chat_data import is_chat_data, json_object
    from flyer.errors import DataError

    path = tmp_path / "chats.jsonl"
    deep = b'{"messages": ' + b"[" * DEEP + b"]" * DEEP + b"}"
    with pytest.raises(DataError, match=r"chats.jsonl:3: not valid JSON \(nested too deeply \(100001 levels\)"):
        json_object(deep, path, 3, "'messages'")
    with pytest.raises(DataError, match="chats.jsonl:4: not UTF-8 text \\(byte 0\\)$"):  # not "utf-16-le codec"
        json_object(b'\xff\xfe{"messages": []}', path, 4, "'messages'")
    assert json_object(b'\xef\xbb\xbf{"messages": []}', path, 1, "'messages'") == {"messages": []}  # a UTF-8 BOM
    # "\ud800": valid JSON, no text (SFT's tokenizer raised a TypeError, DPO's blamed the chat template)
    with pytest.raises(DataError, match=r"chats.jsonl:5: messages\[0\].content: holds a lone UTF-16 surrogate"):
        json_object(b'{"messages": [{"role": "user", "content": "a\\ud800"}]}', path, 5, "'messages'")
    assert is_chat_data("chats.JSONL") and is_chat_data(path) and not is_chat_data("chats.txt")


def test_deeply_nested_manifest_is_a_corrupt_checkpoint(tmp_path, data_cache, capsys):
    """A newest checkpoint whose manifest.json nests too deeply is passed over like any corrupt one: resume and
    generate fall back to the one before, with one warning line."""
    from flyer.train import checkpoint as ckpt

    run = quick_args(("train",), tmp_path, data_cache)
    rc, err, _ = outcome(capsys, ["train", *run, "--steps", "2", "--ckpt-every", "1"])
    assert rc == 0, err
    out = tmp_path / "run"
    newest = ckpt.list_checkpoints(out / "checkpoints")[0]
    (newest / "manifest.json").write_text('{"files": ' + "[" * DEEP + "]" * DEEP + "}")
    with pytest.raises(CheckpointError, match="unreadable manifest \\(nested too deeply"):
        ckpt.verify_checkpoint(newest)
    rc, err, out_ = outcome(capsys, ["generate", "--ckpt", str(out), "--prompt", "hi", "--max-new-tokens", "1",
                                     "--device", "cpu"])
    warned = [line for line in err if line.startswith("flyer: warning: ")]
    assert rc == 0 and len(warned) == 1 and "step_00000002: unreadable manifest (nested too deeply" in warned[0], err
    rc, err, _ = outcome(capsys, ["train", *run, "--steps", "3", "--resume"])
    assert rc == 0 and any("resumed from" in line and "step_00000001" in line for line in err), err


def test_run_summary_is_json_without_nan(tmp_path, data_cache, capsys, monkeypatch):
    """A non-finite validation loss reads null in the summary line: NaN is not JSON."""
    from flyer.train.trainer import Trainer

    monkeypatch.setattr(Trainer, "evaluate", lambda self: float("nan"))
    rc, err, out = outcome(capsys, ["train", *quick_args(("train",), tmp_path, data_cache)])
    assert rc == 0, err

    def no_constant(name):
        raise ValueError(f"{name} in the summary")

    summary = json.loads(out, parse_constant=no_constant)
    assert summary["val_loss"] is None and summary["steps"] == 1


def test_a_pipeline_of_odd_stages_has_no_stage_pairing_note_and_a_template_not_utf8_is_one_line(tmp_path, capsys):
    """DualPipe's README counts stages two a device: ``--pp 3`` said "3 stages on 1 devices" (and ``--pp 1``, "on 0");
    a chat_template.jinja that is no UTF-8 was a UnicodeDecodeError."""
    from flyer.data.chat_template import read_chat_template
    from flyer.errors import ConfigError

    for pp, note in ((3, False), (1, False), (4, True)):
        rc, _, out = outcome(capsys, ["net", "pipeline", "--pp", str(pp)])
        assert rc == 0 and ("stages on" in out) == note, out
    from hf_models import make_tokenizer

    make_tokenizer(tmp_path)  # a Hugging Face directory (config, weights, tokenizer)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "chat_template.jinja").write_bytes(b"{{ messages }}\xff")
    with pytest.raises(ConfigError, match=r"chat_template.jinja: the chat template is not UTF-8 text \(byte 14\)$"):
        read_chat_template(tmp_path)
