"""The optimizer's state written by each rank as its own part (``optimizer-RRRRR-of-WWWWW.safetensors`` and
``optimizer.index.json``): no rank gathers the whole state; the parts read back as the one single-process state,
an expert stack's rows put together across them; ranks that do not share the checkpoint folder fall back to rank 0
writing it whole; a rank that cannot write its part fails the save on every rank, the earlier checkpoints intact."""

import errno
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from flyer.errors import CheckpointError
from flyer.interop.export import export
from flyer.interop.load import init_weight_files
from flyer.parallel import grads
from flyer.parallel.optim_state import (INDEX_FILE, OPTIMIZER_FILE, SavedState, optimizer_index, part_name,
                                        write_optimizer_part)
from flyer.train import checkpoint as ckpt
from flyer.train import training_state
from flyer.train.config import TrainConfig
from flyer.train.trainer import Trainer
from interrupted import stop_after
from ranks import run_ranks
from test_train import _rewrite, losses, quiet, tc_for


def _parts(tmp_path, whole: dict[str, torch.Tensor]):
    """``whole`` written as two ranks' parts: ``a``'s rows split 0:2 / 2:4, its step count held by both, ``b`` by
    rank 0 alone."""
    mine = [{"a/exp_avg": (whole["a/exp_avg"][:2], 0, 4), "a/step": (whole["a/step"], None, 0),
             "b/exp_avg": (whole["b/exp_avg"], None, 5)},
            {"a/exp_avg": (whole["a/exp_avg"][2:], 2, 4), "a/step": (whole["a/step"], None, 0)}]
    index = {part_name(r, 2): write_optimizer_part(tmp_path / part_name(r, 2), m) for r, m in enumerate(mine)}
    (tmp_path / INDEX_FILE).write_text(json.dumps(optimizer_index(index)))
    return json.loads((tmp_path / INDEX_FILE).read_text())


def test_parts_read_back_as_the_whole_state_and_a_bad_index_is_refused(tmp_path):
    whole = {"a/exp_avg": torch.randn(4, 3), "a/step": torch.tensor(2.0), "b/exp_avg": torch.randn(5)}
    index = _parts(tmp_path, whole)
    assert index["tensors"]["a/exp_avg"]["parts"] == [[part_name(0, 2), 0, 2], [part_name(1, 2), 2, 4]]
    assert index["tensors"]["a/step"]["parts"] == [[part_name(0, 2)]]  # held by both, read from one
    with SavedState(tmp_path) as f:
        got = f.read_all()
        assert sorted(got) == sorted(whole) and all(torch.equal(got[k], whole[k]) for k in whole)
        assert torch.equal(f.read("a/exp_avg", (1, 3)), whole["a/exp_avg"][1:3])  # rows across both parts
        assert torch.equal(f.read("a/exp_avg", (3, 4)), whole["a/exp_avg"][3:])
        assert f.shape("a/exp_avg") == (4, 3)

    with pytest.raises(RuntimeError, match="expert rows"):  # two ranks holding the same rows
        optimizer_index({"x": {"a": {"shape": [4], "rows": [0, 2]}}, "y": {"a": {"shape": [4], "rows": [1, 4]}}})
    good = json.dumps(index)
    for change, says in ((lambda t: t["a/exp_avg"]["parts"][1].__setitem__(1, 3), "expert rows"),
                         (lambda t: t["a/exp_avg"]["parts"][0].__setitem__(0, "../" + part_name(0, 2)), "not a part"),
                         (lambda t: t["b/exp_avg"]["parts"][0].__setitem__(0, "model.safetensors"), "not a part"),
                         (lambda t: t["b/exp_avg"]["parts"][0].__setitem__(0, OPTIMIZER_FILE), "not a part"),
                         (lambda t: t["a/exp_avg"].__setitem__("shape", [5, 3]), "expert rows"),
                         (lambda t: t["b/exp_avg"].__setitem__("shape", [6]), "index says"),
                         (lambda t: t["a/step"].__setitem__("parts", []), "bad entry")):
        broken = json.loads(good)
        change(broken["tensors"])
        (tmp_path / INDEX_FILE).write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=says), SavedState(tmp_path) as f:
            f.read_all()
    (tmp_path / INDEX_FILE).write_text(good)
    (tmp_path / OPTIMIZER_FILE).write_bytes((tmp_path / part_name(0, 2)).read_bytes())  # never written so
    with pytest.raises(ValueError, match=f"both {OPTIMIZER_FILE} and {INDEX_FILE}"):
        SavedState(tmp_path)


def test_a_checkpoint_moved_aside_by_a_save_of_its_step_is_put_back(tmp_path):
    """Saving a step again moves the old directory aside, puts the new in place, then removes the old: a crash
    between the two renames leaves the old one aside, which the next start puts back (other temporaries go)."""
    aside, stale = tmp_path / ".tmp-step_00000002-7-replaced", tmp_path / ".tmp-step_00000004-7"
    for d in (aside, stale, tmp_path / ".tmp-step_00000006-7-replaced", tmp_path / "step_00000006"):
        d.mkdir()
        (d / "manifest.json").write_text(d.name)
    ckpt.clean_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002", "step_00000006"]
    assert (tmp_path / "step_00000002" / "manifest.json").read_text() == aside.name
    assert (tmp_path / "step_00000006" / "manifest.json").read_text() == "step_00000006"


def _as_parts(step, split_at: int) -> None:
    """Rewrite one-process checkpoint ``step``'s ``optimizer.safetensors`` as two ranks' parts (every expert stack's
    rows split at ``split_at``, dense state in rank 0's), the manifest with them, as a 2-rank run writes them."""
    with SavedState(step) as f:
        whole = f.read_all()
    mine: list[dict] = [{}, {}]
    for k, t in whole.items():
        if ".experts." in k and t.dim():
            mine[0][k], mine[1][k] = (t[:split_at], 0, t.shape[0]), (t[split_at:], split_at, t.shape[0])
        else:
            mine[0][k] = (t, None, t.shape[0] if t.dim() else 0)
    _rewrite(step, OPTIMIZER_FILE, None)
    index = {part_name(r, 2): write_optimizer_part(step / part_name(r, 2), m) for r, m in enumerate(mine)}
    (step / INDEX_FILE).write_text(json.dumps(optimizer_index(index)))
    for name in (*index, INDEX_FILE):  # into the manifest
        _rewrite(step, name, (step / name).read_bytes())


def test_a_run_resumes_from_parts_as_from_the_whole_state(tmp_path, data_cache):
    """A checkpoint whose state is in parts resumes exactly as from the one file (the resumed steps bit for bit);
    an index whose rows do not cover a stack is one line naming the checkpoint."""
    Trainer(tc_for(tmp_path / "full", data_cache), log=quiet).run()
    step = stop_after(tc_for(tmp_path / "cut", data_cache), 3)
    _as_parts(step, split_at=1)
    shutil.copytree(tmp_path / "cut", tmp_path / "bad")
    Trainer(tc_for(tmp_path / "cut", data_cache, resume=True), log=quiet).run()
    a, b = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert sorted(b) == list(range(1, 7)) and all(a[s] == b[s] for s in b), (a, b)

    bad = tmp_path / "bad" / "checkpoints" / step.name
    index = json.loads((bad / INDEX_FILE).read_text())
    key = next(k for k, t in index["tensors"].items() if len(t["parts"][0]) == 3)
    index["tensors"][key]["parts"][1][1] += 1  # a row no part holds
    _rewrite(bad, INDEX_FILE, json.dumps(index).encode())
    with pytest.raises(CheckpointError, match=f"checkpoint {bad}: unreadable .*{key}") as e:
        Trainer(tc_for(tmp_path / "bad", data_cache, resume=True), log=quiet)
    assert "\n" not in str(e.value)


def test_the_weights_index_says_where_each_tensor_is(tmp_path):
    """A checkpoint's weights are read from the file its index names for each (a file holding another copy is not
    read for it); an index naming a file that lacks the tensor, or one that is no safetensors file, is one line."""
    first, second = ckpt.weights_part_name(0, 2), ckpt.weights_part_name(1, 2)
    save_file({"x": torch.ones(2), "y": torch.ones(3)}, str(tmp_path / first))
    save_file({"z": torch.full((2,), 2.0), "x": torch.zeros(2)}, str(tmp_path / second))  # a stray copy of x
    (tmp_path / "config.json").write_text("{}")

    def index(**where):
        (tmp_path / ckpt.WEIGHTS_INDEX).write_text(json.dumps({"weight_map": {"x": first, "y": first, "z": second,
                                                                              **where}}))
    index()
    got = ckpt.read_weights(tmp_path)
    assert sorted(got) == ["x", "y", "z"] and torch.equal(got["x"], torch.ones(2))
    for where, says in (({"y": second}, f"tensor y is not in {second}, the shard it names"),
                        ({"y": "config.json"}, "config.json: not a safetensors file")):
        index(**where)
        with pytest.raises(CheckpointError, match=says) as e:
            ckpt.read_weights(tmp_path)
        assert "\n" not in str(e.value)


def _train_ep2(rank: int, out: str, cache: str, steps: int, split: bool, full_at: int = 0, resume: bool = False):
    """EP 2 on 2 ranks: (steps run or the error, the elements of weights this rank held at each save: gathered whole,
    or its part); ``split``: each rank's run folder its own (``out`` + rank: folders not shared, as each node's disk);
    ``full_at``: a resume, on which no rank reads every weight, and rank 1 cannot write its part at that step (a full
    disk); ``resume``: a resume."""
    gathered = []

    def counted(gather):
        def held(*a, **k):
            sd = gather(*a, **k)
            gathered.append(sum(t.numel() for t in sd.values()))
            return sd
        return held
    grads.full_state_dict, training_state.weight_part = counted(grads.full_state_dict), counted(grads.weight_part)
    if full_at:
        def full(path, part, _write=training_state.write_optimizer_part):
            if rank == 1 and ckpt.step_dir_name(full_at) in path.parent.name:
                raise OSError(errno.ENOSPC, "No space left on device")
            return _write(path, part)

        def every(path):
            raise AssertionError("a rank read every weight")
        training_state.write_optimizer_part, training_state.read_weights = full, every
    tc = TrainConfig(preset="tiny", steps=steps, batch_size=2, seq_len=32, warmup=1, eval_every=1000, eval_batches=1,
                     ckpt_every=2, threads=1, progress=False, plots=False, data_cache=cache,
                     out=f"{out}{rank}" if split else out, device="cpu", ep=2, resume=resume or bool(full_at),
                     collective_timeout_s=120)
    try:
        return Trainer(tc, log=lambda m: None).run()["steps"], gathered
    except CheckpointError as e:
        return str(e), gathered


@pytest.mark.slow
def test_each_rank_writes_its_part_and_unshared_folders_fall_back_to_rank0(tmp_path, data_cache):
    """EP 2: rank 0 writes the dense weights and state, half the expert stacks whole and its experts' rows of the
    optimizer state, rank 1 the other stacks and its rows; the same run in folders the ranks do not share (rank 0
    cannot see rank 1's) writes both whole on rank 0, equal bit for bit to the parts put together. A rank that
    cannot write its part fails the save on both ranks in one line naming it, leaving the earlier checkpoint and no
    temporary directory."""
    (steps0, held0), (steps1, held1) = run_ranks(_train_ep2, 2, str(tmp_path / "shared"), data_cache, 2, False)
    (_, own0), (_, own1) = run_ranks(_train_ep2, 2, str(tmp_path / "own"), data_cache, 2, True)
    parts, whole = (tmp_path / d / "checkpoints" / ckpt.step_dir_name(2) for d in ("shared", "own0"))
    with safe_open(str(whole / ckpt.WEIGHTS_FILE), framework="pt") as f:
        n_model = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    # unshared, rank 0 gathered the whole model to write it, rank 1 kept no copy; shared, each held its share
    assert (own0, own1, steps0, steps1) == ([n_model], [0], 2, 2)
    assert held0[0] + held1[0] == n_model and 0 < held1[0] < held0[0] < n_model, (held0, held1, n_model)
    assert not (parts / OPTIMIZER_FILE).exists() and (whole / OPTIMIZER_FILE).is_file()
    assert not (parts / ckpt.WEIGHTS_FILE).exists() and not (whole / ckpt.WEIGHTS_INDEX).exists()
    assert not list(whole.glob("optimizer-*")) and not (tmp_path / "own1" / "checkpoints").exists()
    n_experts = json.loads((parts / "config.json").read_text())["n_routed_experts"]
    with safe_open(str(parts / part_name(1, 2)), framework="pt") as f:
        held = {k: f.get_slice(k).get_shape() for k in f.keys()}
    assert held and all(".experts." in k for k in held)
    assert all(shape[0] == n_experts // 2 for shape in held.values() if shape)  # its half of each stack's state
    with safe_open(str(parts / ckpt.weights_part_name(1, 2)), framework="pt") as f:
        held = {k: f.get_slice(k).get_shape() for k in f.keys()}
    assert held and all(".experts." in k and shape[0] == n_experts for k, shape in held.items())  # stacks whole
    with SavedState(parts) as a, SavedState(whole) as b:
        got, want = a.read_all(), b.read_all()
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    got, want = ckpt.read_weights(parts), ckpt.read_tensors(whole / ckpt.WEIGHTS_FILE)
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    index = json.loads((parts / ckpt.WEIGHTS_INDEX).read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in want.values())
    assert set(index["weight_map"].values()) == {ckpt.weights_part_name(r, 2) for r in range(2)}
    # what reads a run's weights reads the parts as the one file: an export, a DPO reference's fingerprint
    for d in ("shared", "own0"):
        export(str(tmp_path / d), str(tmp_path / f"hf-{d}"))
    assert (tmp_path / "hf-shared" / "model.safetensors").read_bytes() == \
        (tmp_path / "hf-own0" / "model.safetensors").read_bytes()
    assert [Path(f).name for f, *_ in init_weight_files(tmp_path / "shared")] == \
        [ckpt.weights_part_name(r, 2) for r in range(2)]

    res = [r[0] for r in run_ranks(_train_ep2, 2, str(tmp_path / "shared"), data_cache, 4, False, 4)]
    assert all(f"cannot write checkpoint {ckpt.step_dir_name(4)}" in r and "rank 1: No space left on device" in r
               and "\n" not in r for r in res), res
    root = tmp_path / "shared" / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(root)] == [ckpt.step_dir_name(2)]
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]
    ckpt.verify_checkpoint(parts)

    # a rank that cannot read its part of the state fails the resume on every rank, the others naming it
    shutil.copytree(tmp_path / "shared", tmp_path / "bad")
    step = tmp_path / "bad" / "checkpoints" / ckpt.step_dir_name(2)
    index = json.loads((step / INDEX_FILE).read_text())
    for t in index["tensors"].values():
        for p in t["parts"]:
            p[0] = part_name(7, 9) if p[0] == part_name(1, 2) else p[0]
    _rewrite(step, INDEX_FILE, json.dumps(index).encode())
    (says0, _), (says1, _) = run_ranks(_train_ep2, 2, str(tmp_path / "bad"), data_cache, 4, False, 0, True)
    assert f"names '{part_name(7, 9)}', not a part file" in says1 and "\n" not in says1, says1
    assert says0 == f"rank 1 could not resume: {says1}"
