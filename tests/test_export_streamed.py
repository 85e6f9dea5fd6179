"""flyer export streams a checkpoint directory: each tensor is read, converted and written before
the next, so exporting never holds the model. What it writes is what exporting the loaded model
writes, byte for byte, from every kind of source; and its peak memory is a tensor's, not the model's."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models

from flyer.config import preset
from flyer.errors import CheckpointError
from flyer.interop.export import export, export_model
from flyer.interop.hf import TextTokenizer, load_hf
from flyer.interop.load import load_pretrained
from flyer.interop.tensorfile import TensorFile
from flyer.model.transformer import Transformer
from tests.hf_models import add_mtp_layer, build
from tests.test_interop_export import run, tensors  # noqa: F401 (run: the module's tiny-run fixture)


def _files(path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(path.iterdir())}


def _same_as_loaded(src, tmp_path, dtype: str, load_dtype=None) -> None:
    """``export(src)`` writes the bytes ``export_model`` writes from the model ``load_pretrained`` loads."""
    export(src, tmp_path / f"streamed-{dtype}", dtype, "40KB")  # shards: the index is compared too
    model, _, tok = load_pretrained(src, dtype=load_dtype)
    source = src if (src / "config.json").is_file() and not (src / "manifest.json").is_file() else None
    export_model(model, tok, tmp_path / f"loaded-{dtype}", dtype, "40KB", source)
    a, b = _files(tmp_path / f"streamed-{dtype}"), _files(tmp_path / f"loaded-{dtype}")
    assert a.keys() == b.keys() and len(a) > 5
    assert [k for k in a if a[k] != b[k]] == []


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp8"])
def test_run_streams_as_its_model_exports(run, tmp_path, dtype):  # noqa: F811
    _same_as_loaded(run, tmp_path, dtype)


@pytest.mark.parametrize("name", ["v3", "v3-tied-half", "v2-grouped", "llama", "qwen2"])
def test_hf_directory_streams_as_its_model_exports(tmp_path, name):
    build(name, tmp_path / "src")  # FP32; the rotate-half ones move rope rows both ways
    for dtype in ("bf16", "fp8"):
        _same_as_loaded(tmp_path / "src", tmp_path, dtype)


def test_mtp_layer_and_bf16_source(tmp_path):
    model = build("v3", tmp_path / "src")
    add_mtp_layer(model, tmp_path / "src")
    bf16 = load_hf(tmp_path / "src")  # with the MTP module, re-exported in BF16 as a BF16 source
    export_model(bf16[0].to(torch.bfloat16), bf16[2], tmp_path / "bf16src", "bf16", source=tmp_path / "src")
    for src in (tmp_path / "src", tmp_path / "bf16src"):
        for dtype in ("fp32", "bf16"):
            out = tmp_path / src.name
            _same_as_loaded(src, out, dtype)
            assert "model.layers.3.eh_proj.weight" in tensors(out / f"streamed-{dtype}")


def test_fp8_source(tmp_path):
    build("v3", tmp_path / "src")
    model, _, tok = load_hf(tmp_path / "src")
    export_model(model, tok, tmp_path / "fp8", "fp8")
    # to BF16 and FP32: the exact values (code times scale), as the FP32 model loaded from it holds them
    for dtype in ("fp32", "bf16"):
        _same_as_loaded(tmp_path / "fp8", tmp_path, dtype, torch.float32)
    # to FP8: its own codes and scales
    export(tmp_path / "fp8", tmp_path / "again", "fp8")
    assert _files(tmp_path / "fp8") == _files(tmp_path / "again")


def test_a_bad_checkpoint_fails_before_anything_is_written(tmp_path):
    build("v3", tmp_path / "src")
    ws = tensors(tmp_path / "src")
    del ws["model.layers.2.mlp.experts.3.up_proj.weight"]  # the last layer's: the check must not wait for it
    save_file(ws, str(tmp_path / "src" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing tensor model.layers.2.mlp.experts.3.up_proj.weight"):
        export(tmp_path / "src", tmp_path / "out", "bf16")
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["src"]


_PEAK = textwrap.dedent("""
    import json, sys, tempfile
    from pathlib import Path
    from flyer.interop.export import export
    def status(key):
        return next(int(ln.split()[1]) * 1024 for ln in open("/proc/self/status") if ln.startswith(key + ":"))
    peaks = []
    for src in sys.argv[3:]:
        # once first: the code pages a first export touches count as resident (RssFile), not its data
        export(src, Path(tempfile.mkdtemp(dir=sys.argv[1])) / "out", sys.argv[2])
        base = status("VmRSS")
        open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
        export(src, Path(tempfile.mkdtemp(dir=sys.argv[1])) / "out", sys.argv[2])
        peaks.append(status("VmHWM") - base)
    print(json.dumps(peaks))
""")


def _peak_bytes(srcs, tmp_path, dtype: str) -> list[int]:
    """Each source's export peak, measured one after the other in one process (one interpreter start, not one
    each); one torch thread, as the tests run: two threads' parallel regions on 2 shared cores waited on each
    other for most of this test's minutes."""
    r = subprocess.run([sys.executable, "-c", _PEAK, str(tmp_path), dtype, *map(str, srcs)], capture_output=True,
                       text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)


def test_export_holds_a_tensor_not_the_model(tmp_path):
    """An export's peak memory is a few of its largest tensors (0.5 MB at most here), not the model:
    loading it first took 1.06x a BF16 checkpoint's bytes, and 4.2x an FP8 one's (as FP32)."""
    cfg = preset("tiny", vocab_size=1024, dim=256, n_layers=3, inter_dim=512, n_heads=4, q_lora_rank=128,
                 kv_lora_rank=64, moe_inter_dim=128, n_routed_experts=64, n_activated_experts=4, mtp_depth=0)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    tok = TextTokenizer(Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1}, unk_token="<unk>")))
    export_model(model, tok, tmp_path / "bf16", "bf16", "20MB")
    export_model(model, tok, tmp_path / "fp8", "fp8", "20MB")
    del model
    srcs = ("bf16", "fp8")
    for src, peak in zip(srcs, _peak_bytes([tmp_path / src for src in srcs], tmp_path, "bf16"), strict=True):
        size = sum(f.stat().st_size for f in (tmp_path / src).glob("*.safetensors"))
        largest = max(t.numel() * t.element_size() for t in tensors(tmp_path / src).values())
        assert size > 10e6 and largest < 0.6e6
        # a tensor read, widened, permuted and converted: a few copies of the largest, in FP32, plus
        # the allocator's slack; the model would be 1x (bf16) and 4x (fp8) of ``size``
        print(src, peak / size)
        assert peak < 0.25 * size, (src, peak, size)


def test_each_header_is_parsed_once(tmp_path, monkeypatch):
    """Loading and exporting parsed a shard's header once per tensor it holds: quadratic in the
    tensors per file (an FP8 export of 835 tensors in one file took 3.4 s, 0.3 s parsed once)."""
    build("v3", tmp_path / "src")
    model, _, tok = load_hf(tmp_path / "src")
    export_model(model, tok, tmp_path / "fp8", "fp8")  # one file, weights and their scales
    parsed = []
    real = TensorFile.__init__

    def counting(self, path):
        parsed.append(path)
        real(self, path)
    monkeypatch.setattr(TensorFile, "__init__", counting)
    n_tensors = len(tensors(tmp_path / "fp8"))
    for held in (None, torch.float8_e4m3fn):
        parsed.clear()
        load_hf(tmp_path / "fp8", dtype=torch.float32, held=held)
        assert n_tensors > 100 and len(parsed) <= 3, (held, len(parsed))  # the file list, the dtype, the load
    for dtype in ("bf16", "fp8"):
        parsed.clear()
        export(tmp_path / "fp8", tmp_path / f"out-{dtype}", dtype)
        assert len(parsed) <= 6, (dtype, len(parsed))  # a few for the directory (dtype, FP8 codes), none a tensor


@pytest.mark.parametrize("held", [torch.bfloat16, torch.float8_e4m3fn])
def test_a_model_holding_its_weights_exports_their_values(tmp_path, held):
    """``export_model`` of a model loaded as ``--weight-dtype bf16|fp8`` holds it (BF16 weights, or
    FP8 codes with their block scales) writes what the streamed export of its checkpoint writes:
    the weights' values (FP8: each code times its scale; the codes alone were written as values)."""
    build("v3", tmp_path / "src")
    model, _, tok = load_hf(tmp_path / "src")
    export_model(model, tok, tmp_path / "fp8", "fp8")  # DeepSeek's format: held FP8 keeps its own codes
    src = tmp_path / ("fp8" if held == torch.float8_e4m3fn else "src")
    export(src, tmp_path / "streamed", "bf16")
    model, _, tok = load_pretrained(src, dtype=torch.float32, held=held)
    export_model(model, tok, tmp_path / "held", "bf16", source=src)
    a, b = tensors(tmp_path / "streamed"), tensors(tmp_path / "held")
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
