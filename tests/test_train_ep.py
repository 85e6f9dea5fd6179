"""`flyer train` under torchrun with expert parallelism: 4 gloo ranks as 2 nodes x 2, checkpoint,
resume with the same layout, and the checkpoint loads in one process. The first run's ranks are forked
from the tests' forkserver (tests/test_train_pp.py's ``_run_forked``: torchrun's environment without
each rank's imports); the resume is a torchrun job."""

import os
import subprocess
import sys

import pytest
from test_train_pp import _run_forked

from flyer.cli import main
from flyer.interop.load import load_pretrained
from flyer.train import checkpoint as ckpt
from flyer.train.metrics import read_metrics


@pytest.mark.slow
def test_torchrun_ep4_two_nodes_trains_checkpoints_and_resumes(tmp_path, data_cache):
    cache = data_cache  # the session's tokenizer and shards: the default corpus is prepared once
    args = ["--preset", "tiny", "--ep", "4", "--ranks-per-node", "2", "--batch-size", "2", "--seq-len", "32",
            "--eval-every", "2", "--eval-batches", "1", "--ckpt-every", "2", "--threads", "1", "--no-progress",
            "--no-plots", "--data-cache", str(cache), "--out", str(tmp_path / "run"), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    _run_forked(4, args + ["--steps", "2"])
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4", "-m", "flyer",
            "train", *args]
    second = subprocess.run(base + ["--steps", "4", "--resume"], capture_output=True, text=True, timeout=600, env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr
    recs = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert recs[-1]["inter_node_bytes"] > 0 and recs[-1]["intra_node_bytes"] > 0
    path = ckpt.resolve_checkpoint_path(tmp_path / "run")
    # each rank wrote its part of the optimizer's state: the dense state (rank 0's) and its experts' rows
    assert sorted(p.name for p in path.iterdir() if p.name.startswith(("optimizer", "state"))) == [
        *(f"optimizer-{r:05d}-of-00004.safetensors" for r in range(4)), "optimizer.index.json",
        *(f"state-rank{r}.json" for r in range(4))]
    model, cfg, _ = load_pretrained(tmp_path / "run")  # full single-process layout
    assert model.layers[1].ffn.experts.w1.shape[0] == cfg.n_routed_experts


def test_bad_ep_layout_is_one_line(tmp_path, capsys):
    assert main(["train", "--preset", "tiny", "--ep", "3", "--out", str(tmp_path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flyer: error: --ep: 3 needs a multi-process launch"), lines
    assert not any(tmp_path.iterdir())  # refused before the run directory is taken
