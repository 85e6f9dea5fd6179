"""Export never overwrites or leaves a partial directory, keeps FP8 codes and the source's tokenizer
files, and bad or non-finite input is one line naming the file, the flag or the tensor."""

import errno
import hashlib
import json
import os
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from flyer.cli import main
from flyer.config import parse_size
from flyer.errors import CheckpointError, ConfigError, FieldError
from flyer.fp8.quant import TILE
from flyer.interop import export as export_mod
from flyer.interop.export import export_model
from flyer.interop.hf import check_finite, load_hf  # the finiteness check every read path makes
from flyer.interop.load import load_pretrained
from tests.hf_models import build
from tests.test_interop_export import run, tensors  # noqa: F401 (run: the module's tiny-run fixture)

FP8 = torch.float8_e4m3fn


def snapshot(root) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under ``root``."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def cli_error(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flyer: error: ") and "\n" not in err, err
    return err


def leftovers(parent, keep) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name not in keep)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A tiny DeepseekV3 Hugging Face directory (FP32) with a tokenizer."""
    root = tmp_path_factory.mktemp("src") / "v3"
    build("v3", root)
    return root


def test_export_refuses_a_non_empty_out_and_changes_nothing(run, tmp_path, capsys):  # noqa: F811
    ckpt = sorted((run / "checkpoints").glob("step_*"))[-1]
    before = snapshot(run)
    for out in (ckpt, run):  # a checkpoint directory, and the run directory itself
        err = cli_error(capsys, ["export", str(run), "--out", str(out)])
        assert err.startswith(f"flyer: error: --out: {out}") and "not empty" in err
        assert snapshot(run) == before
    old = tmp_path / "hf"
    assert main(["export", str(run), "--out", str(old), "--max-shard-size", "300KB"]) == 0
    assert (old / "model.safetensors.index.json").is_file()
    old_files = snapshot(old)
    assert "not empty" in cli_error(capsys, ["export", str(run), "--out", str(old), "--dtype", "fp32"])
    assert snapshot(old) == old_files
    missing = tmp_path / "missing"
    assert cli_error(capsys, ["export", str(missing), "--out", str(tmp_path / "x")]) == (
        f"flyer: error: path: no valid checkpoint under {missing}")
    (tmp_path / "empty").mkdir()  # an empty directory is fine
    assert main(["export", str(run), "--out", str(tmp_path / "empty")]) == 0
    assert (tmp_path / "empty" / "model.safetensors").is_file()
    assert leftovers(tmp_path, {"hf", "empty"}) == []


def test_export_failure_leaves_nothing_and_is_one_line(src, tmp_path, capsys, monkeypatch):
    real = export_mod.write_tensors
    calls = []

    def disk_full(path, items, *a, **k):
        calls.append(path)
        if len(calls) == 2:  # the first shard is written, then the disk fills
            raise OSError(errno.EFBIG, "File too large")
        return real(path, items, *a, **k)
    monkeypatch.setattr(export_mod, "write_tensors", disk_full)
    out = tmp_path / "out"
    err = cli_error(capsys, ["export", str(src), "--out", str(out), "--max-shard-size", "100KB"])
    assert err.startswith("flyer: error: --out: ") and str(out) in err and "File too large" in err
    assert len(calls) == 2 and not out.exists() and leftovers(tmp_path, set()) == []

    def interrupted(path, items, *a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(export_mod, "write_tensors", interrupted)
    capsys.readouterr()
    assert main(["export", str(src), "--out", str(out)]) == 130
    assert not out.exists() and leftovers(tmp_path, set()) == []
    monkeypatch.setattr(export_mod, "write_tensors", real)

    (tmp_path / "file").write_text("keep me")
    for bad in (tmp_path / "file", tmp_path / "file" / "sub"):  # an existing file; a path under one
        err = cli_error(capsys, ["export", str(src), "--out", str(bad)])
        assert err.startswith(f"flyer: error: --out: {bad}"), err
    assert (tmp_path / "file").read_text() == "keep me" and leftovers(tmp_path, {"file"}) == []
    if os.path.isdir("/proc/self"):  # a path no one can create
        assert cli_error(capsys, ["export", str(src), "--out", "/proc/flyer-export"]).startswith(
            "flyer: error: --out: /proc/flyer-export")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        try:
            err = cli_error(capsys, ["export", str(src), "--out", str(locked / "out")])
            assert err.startswith(f"flyer: error: --out: {locked / 'out'}"), err
        finally:
            locked.chmod(0o700)


def pow2_fp8(path) -> dict[str, torch.Tensor]:
    """Rewrite the FP8 export at ``path`` with power-of-two block scales (V3.1's, not amax / 448, so a
    requantization would not give them back); return its tensors."""
    files = tensors(path)
    for name in [n for n in files if n.endswith("_scale_inv")]:
        w = name[:-len("_scale_inv")]
        codes, s = files[w], files[name]
        full = s.repeat_interleave(TILE, 0).repeat_interleave(TILE, 1)[:codes.shape[0], :codes.shape[1]]
        s2 = torch.exp2(torch.ceil(torch.log2(s)) + 1)
        full2 = s2.repeat_interleave(TILE, 0).repeat_interleave(TILE, 1)[:codes.shape[0], :codes.shape[1]]
        files[w], files[name] = (codes.float() * full / full2).to(FP8), s2
    for f in path.glob("*.safetensors"):
        f.unlink()
    save_file(files, str(path / "model.safetensors"))
    return files


def exact(files: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The FP32 value of ``name`` in an FP8 checkpoint: code times its block's scale, no other rounding."""
    t = files[name]
    if t.dtype != FP8:
        return t.float()
    s = files[name + "_scale_inv"].repeat_interleave(TILE, 0).repeat_interleave(TILE, 1)
    return t.float() * s[:t.shape[0], :t.shape[1]]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype.itemsize == 1 else t


def test_fp8_export_keeps_codes_and_scales_and_fp32_is_exact(src, tmp_path):
    model, _, tok = load_hf(src)
    export_model(model, tok, tmp_path / "fp8", "fp8")
    files = pow2_fp8(tmp_path / "fp8")
    assert main(["export", str(tmp_path / "fp8"), "--out", str(tmp_path / "again"), "--dtype", "fp8"]) == 0
    again = tensors(tmp_path / "again")
    assert again.keys() == files.keys()
    for k in files:
        assert again[k].dtype == files[k].dtype and torch.equal(bits(again[k]), bits(files[k])), k
    assert main(["export", str(tmp_path / "fp8"), "--out", str(tmp_path / "fp32"), "--dtype", "fp32"]) == 0
    fp32 = tensors(tmp_path / "fp32")
    assert fp32.keys() == {k for k in files if not k.endswith("_scale_inv")}
    for k in fp32:
        assert fp32[k].dtype == torch.float32 and torch.equal(fp32[k], exact(files, k)), k


def test_fp8_export_of_a_rotate_half_checkpoint_keeps_its_scales(tmp_path):
    build("v3-tied-half", tmp_path / "src")
    model, _, tok = load_hf(tmp_path / "src")
    export_model(model, tok, tmp_path / "fp8", "fp8")
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(  # stored rotate-half, as the source was
        {**json.loads((tmp_path / "fp8" / "config.json").read_text()), "rope_interleave": False}))
    files = pow2_fp8(tmp_path / "fp8")
    assert main(["export", str(tmp_path / "fp8"), "--out", str(tmp_path / "again"), "--dtype", "fp8"]) == 0
    again = tensors(tmp_path / "again")
    assert all(torch.equal(again[k], files[k]) for k in files if k.endswith("_scale_inv"))
    a = load_hf(tmp_path / "fp8", dtype=torch.float32)[0].state_dict()
    b = load_hf(tmp_path / "again", dtype=torch.float32)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # rope rows moved with their codes, in their blocks


def test_export_from_hf_dir_carries_tokenizer_and_generation_config(src, tmp_path):
    import shutil
    hf = tmp_path / "src"
    shutil.copytree(src, hf)
    tc = json.loads((hf / "tokenizer_config.json").read_text())
    tc.update(chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}", pad_token="<pad>",
              unk_token="<pad>", model_max_length=12345)
    (hf / "tokenizer_config.json").write_text(json.dumps(tc))
    gen = {"bos_token_id": 1, "eos_token_id": [2, 0], "do_sample": True, "temperature": 0.6, "top_p": 0.95}
    (hf / "generation_config.json").write_text(json.dumps(gen))
    assert main(["export", str(hf), "--out", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text()) == gen
    got = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert all(got[k] == v for k, v in tc.items()), got


def test_parse_size_refuses_non_finite_and_absurd_sizes(src, tmp_path, capsys):
    for text in ("1e400", "1e30", "99999999999999999999TB"):
        with pytest.raises(FieldError, match="^max_shard_size: "):
            parse_size(text, "max_shard_size")
    assert parse_size("1e9") == 10**9 and parse_size("5GB") == 5 * 10**9
    err = cli_error(capsys, ["export", str(src), "--out", str(tmp_path / "x"), "--max-shard-size", "1e400"])
    assert err.startswith("flyer: error: --max-shard-size: ")
    assert not (tmp_path / "x").exists()


def corrupt_header(path, header: bytes, length: int | None = None) -> None:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data[8 + n:])


def test_bad_hf_inputs_are_one_line_errors_naming_the_file(src, tmp_path, capsys):
    import shutil
    hf = tmp_path / "hf"
    shutil.copytree(src, hf)
    st, out = hf / "model.safetensors", str(tmp_path / "out")
    good = st.read_bytes()

    def refused(name: str, exc=CheckpointError) -> str:
        with pytest.raises(exc, match=name):
            load_hf(hf)
        err = cli_error(capsys, ["export", str(hf), "--out", out])
        assert name in err and not (tmp_path / "out").exists()
        return err

    corrupt_header(st, b"{}", length=2**62)  # a header length past the file's end
    refused("model.safetensors")
    (n,) = struct.unpack("<Q", good[:8])
    header = json.loads(good[8:8 + n])
    first = next(k for k in header if k != "__metadata__")
    for bad in ({**header, first: 7}, {**header, first: {**header[first], "shape": "big"}},
                {**header, first: {**header[first], "data_offsets": [0, 2**60]}}, [1, 2]):
        corrupt_header(st, json.dumps(bad).encode())
        refused("model.safetensors")
        st.write_bytes(good)

    (hf / "tokenizer.json").write_text(json.dumps({"not": "a tokenizer"}))
    refused("tokenizer.json")
    shutil.copy(src / "tokenizer.json", hf / "tokenizer.json")

    cfg = json.loads((hf / "config.json").read_text())
    for field, value in (("num_hidden_layers", "two"), ("num_hidden_layers", None), ("hidden_size", [64]),
                         ("vocab_size", 3.5), ("kv_lora_rank", "x")):
        (hf / "config.json").write_text(json.dumps({**cfg, field: value}))
        err = refused("config.json", (CheckpointError, ConfigError))
        assert field in err
    (hf / "config.json").write_text(json.dumps(cfg))

    names = list(safe_open(str(st), "pt").keys())
    st.rename(hf / "model-00001.safetensors")
    for value in (None, "../../etc/passwd", "/etc/passwd", 3):
        wm = {**dict.fromkeys(names, "model-00001.safetensors"), names[0]: value}
        (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
        refused("model.safetensors.index.json")


def nan_fp8(src, tmp_path):
    """An FP8 export of ``src`` and the name of one of its FP8 weights."""
    model, _, tok = load_hf(src)
    export_model(model, tok, tmp_path / "fp8", "fp8")
    return tmp_path / "fp8", "model.layers.1.self_attn.kv_b_proj.weight"


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_fp8_scale_is_refused_on_every_path(src, tmp_path, bad):
    path, name = nan_fp8(src, tmp_path)
    files = tensors(path)
    files[name + "_scale_inv"][0, 0] = bad
    save_file(files, str(path / "model.safetensors"))
    for kw in ({}, {"dtype": torch.float32}, {"dtype": torch.float32, "held": torch.bfloat16},
               {"dtype": torch.float32, "held": FP8}):
        with pytest.raises(CheckpointError, match=name):
            load_pretrained(path, **kw)


def _nan_code(files, name):
    files[name].view(torch.uint8)[0, 0] = 0x7F


def _scale(value):
    def put(files, name):
        files[name + "_scale_inv"][0, 0] = value
    return put


@pytest.mark.parametrize("corrupt,problem", [
    (_scale(float("nan")), "non-finite"), (_scale(float("inf")), "non-finite"), (_scale(-1.0), "negative"),
    (_nan_code, "non-finite"),
    (lambda f, n: f.__setitem__(n + "_scale_inv", f[n + "_scale_inv"][None].contiguous()), "128x128 blocks"),
    (lambda f, n: f.__setitem__(n + "_scale_inv", f[n + "_scale_inv"].int()), "floating point"),
    (lambda f, n: f.__setitem__(n, f[n].view(torch.uint8)), "float8_e4m3fn"),
], ids=["nan_scale", "inf_scale", "negative_scale", "nan_code", "scale_shape", "int_scale", "uint8_codes"])
def test_a_corrupt_fp8_source_is_refused_on_every_path(src, tmp_path, corrupt, problem):
    """An FP8 export of an FP8 source copies its codes and scales: it wrote NaN, inf and another shape's scales into
    the export (a ValueError of the writer, for the shape), which every load path refuses; codes stored as uint8
    beside their scales loaded as their integers, and a negative or integer scale passed, on every path."""
    path, name = nan_fp8(src, tmp_path)
    files = tensors(path)
    corrupt(files, name)
    save_file(files, str(path / "model.safetensors"))
    for kw in ({}, {"dtype": torch.float32}, {"dtype": torch.float32, "held": FP8}):
        with pytest.raises(CheckpointError, match=name) as e:
            load_pretrained(path, **kw)
        assert problem in str(e.value)
    for k, dtype in enumerate(("fp8", "bf16")):
        with pytest.raises(CheckpointError, match=name):
            export_mod.export(path, tmp_path / f"out{k}", dtype)
        assert not (tmp_path / f"out{k}").exists()


def test_nan_in_a_bf16_weight_is_refused_on_every_path(src, tmp_path):
    model, _, tok = load_hf(src)
    export_model(model, tok, tmp_path / "bf16", "bf16")
    files = tensors(tmp_path / "bf16")
    name = "model.layers.1.self_attn.o_proj.weight"
    files[name][3, 5] = float("nan")
    save_file(files, str(tmp_path / "bf16" / "model.safetensors"))
    for kw in ({}, {"dtype": torch.float32}, {"dtype": torch.float32, "held": torch.bfloat16},
               {"dtype": torch.float32, "held": FP8}):
        with pytest.raises(CheckpointError, match=name):
            load_pretrained(tmp_path / "bf16", **kw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64, FP8,
                                   torch.float8_e5m2])
def test_every_non_finite_value_is_found_wherever_it_is(dtype):
    """The finiteness check (one aminmax pass; FP8 codes in slices) finds NaN of either sign and either infinity
    at the start, the middle, a vector's edge and the end of tensors of any length."""
    for n in (1, 15, 16, 17, 33, 1000, 4099):
        clean = torch.randn(n, dtype=torch.float64).to(dtype)
        check_finite(clean, "f", "w")
        for pos in {0, n // 2, 15 % n, 16 % n, n - 1}:
            for bad in (float("nan"), -float("nan"), float("inf"), float("-inf")):
                if torch.tensor(bad).to(dtype).float().isfinite():
                    continue  # E4M3FN holds no infinity: torch saturates it to 448
                t = clean.clone()
                t[pos] = bad
                with pytest.raises(CheckpointError, match="f: tensor w holds non-finite values"):
                    check_finite(t.view(1, -1) if n % 2 else t, "f", "w")
