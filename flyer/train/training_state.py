"""A whole training run's checkpoint: ``save_training`` / ``load_training`` write and restore the model, optimizer,
sampler, RNG and counters of a run on any mesh, in ``flyer.train.checkpoint``'s format; a resume may change the
process layout (world, pp, dp, ep, zero) where the optimizer state was saved whole."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import secrets
import shutil
import socket
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from tokenizers import Tokenizer

from flyer.config import ModelConfig
from flyer.data.tiktoken_file import TIKTOKEN_FILE
from flyer.errors import CheckpointError, ConfigError, DataError, every_rank
from flyer.model.transformer import Transformer
from flyer.parallel.grads import load_state_file, weight_part
from flyer.parallel.optim_state import (INDEX_FILE, OPTIMIZER_FILE, full_optimizer_state, has_saved_state,
                                        load_full_optimizer_state, optimizer_index, optimizer_part, part_name,
                                        write_optimizer_part)
from flyer.train.checkpoint import (WEIGHTS_FILE, WEIGHTS_INDEX, check_model_weights, fsync_file, load_model_weights,
                                    read_tensors, read_torch, read_weights, save_checkpoint, save_tensors, saved_layout,
                                    sha256_file, step_dir_name, temporary_dir, verify_checkpoint, weight_files,
                                    weights_part_name)

_PROBE = ".shared"  # in a save's temporary directory while the ranks check that they all see it


def rank_suffix(rank: int, world: int) -> str:
    """Suffix of a rank's optimizer/state/rng file names: none in a one-process run."""
    return "" if world == 1 else f"-rank{rank}"


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's torch RNG states (CPU, and ``device``'s when it is CUDA)."""
    rng = {"torch_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["torch_cuda"] = torch.cuda.get_rng_state(device)
    return rng


def save_training(ckpt_root: Path, step: int, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  sampler, mesh, cfg: ModelConfig, tokenizer: Tokenizer, bad_steps: int, train_config: dict,
                  keep: int | None, protect: tuple[Path, ...] = (), layout: dict | None = None,
                  settings: dict[str, bytes] | None = None, extra: dict | None = None) -> Path | None:
    """Checkpoint a training run at ``step`` (a collective: every rank of ``mesh`` calls it).

    model: this rank's model (its expert slice under EP); its weights and the optimizer's state are saved in the
    full single-process layout: by each rank its part (``weight_part``, ``optimizer_part``) where every rank sees
    the folder rank 0 writes in (``shared_temporary_dir``), else gathered and written by rank 0. Sampler
    (``state_dict()``) and RNG: saved per rank. bad_steps and train_config (a JSON-able dict) go into each rank's
    state file, and ``layout`` (the process layout: world, pp, dp, ep, zero, pp_schedule), which a resume may change
    (``check_layout``). ``keep``: valid checkpoints kept, ``protect``: checkpoints never pruned (the one the run
    resumed from). ``settings``: the Hugging Face tokenizer and generation settings the run carries
    (a name of ``settings_names`` -> its bytes), written as they are; with a tiktoken tokenizer's files
    (``flyer.interop.load.read_settings``), which build ``tokenizer`` (``flyer.data.tokenizer_copy.builds``),
    those stand for it and no tokenizer.json is written (one cannot carry Kimi's cut of long runs).
    ``extra``: more JSON-able fields of this rank's state file (a DPO run's reference fingerprint).
    Returns the checkpoint directory on rank 0, None elsewhere; a failed write raises ``CheckpointError`` on every
    rank.
    """
    state = {"step": step, "sampler": sampler.state_dict(), "bad_steps": bad_steps, "train_config": train_config,
             "layout": layout, **(extra or {})}
    tmp = shared_temporary_dir(ckpt_root, step, mesh) if mesh.world > 1 else None
    weights, moments, parts = None, None, {}
    if tmp is None:
        weights = mesh.full_state_dict(model, only_rank0=True)
        moments = full_optimizer_state(model, optimizer, mesh)
    else:  # each rank writes its parts, one after the other (it holds one at a time)
        share = weight_part(model, mesh)
        parts["weights"] = _write_part(tmp, weights_part_name(mesh.rank, mesh.world), mesh,
                                       (lambda path: _write_weights(path, share)) if share else None)
        share = optimizer_part(model, optimizer, mesh)
        parts["optimizer"] = _write_part(tmp, part_name(mesh.rank, mesh.world), mesh,
                                         (lambda path: write_optimizer_part(path, share)) if share else None)
    ranks = mesh.gather_object({"state": state, "rng": rng_state(mesh.device), "parts": parts})
    path, failed = None, None
    if ranks is not None:
        try:
            path = _save_on_rank0(ckpt_root, step, ranks, weights, moments, tmp, cfg, tokenizer, mesh.world, keep,
                                  protect, settings)
        except Exception as e:
            failed = e  # every rank raises it, after telling them
            shutil.rmtree(temporary_dir(ckpt_root, step), ignore_errors=True)  # the ranks' parts, or the probe's
    why = mesh.broadcast_object(None if failed is None else str(failed))
    if failed is not None:
        raise every_rank(failed)
    if why is not None:
        raise every_rank(CheckpointError(why))
    return path


def shared_temporary_dir(ckpt_root: Path, step: int, mesh) -> Path | None:
    """Rank 0's ``temporary_dir`` for checkpoint ``step``, made there, if every rank of ``mesh`` sees it (one file
    system, as a cluster's checkpoint folder is: each rank then writes its part of the state into it); None
    otherwise (each node's own disk: rank 0 writes it all). A collective."""
    probe = None
    if mesh.rank == 0:
        tmp = temporary_dir(ckpt_root, step)
        try:
            ckpt_root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
            probe = (tmp.name, secrets.token_hex(16))
            (tmp / _PROBE).write_text(probe[1])
        except OSError:
            probe = None  # rank 0 writes it all, and says why it cannot
    probe = mesh.broadcast_object(probe)
    if probe is None:
        return None
    tmp = ckpt_root / probe[0]  # this rank's view of the folder rank 0 writes in
    try:
        sees = (tmp / _PROBE).read_text() == probe[1]
    except OSError:
        sees = False
    shared = mesh.max_int(0 if sees else 1) == 0  # every rank has read the probe here
    if mesh.rank == 0:
        (tmp / _PROBE).unlink()
    return tmp if shared else None


def check_writers(ckpt_root: Path, mesh, writes: bool) -> None:
    """Before training (a collective): ``CheckpointError`` on every rank unless each rank that will write its part
    of a checkpoint into ``ckpt_root`` (``writes``: this one) can: a rank whose view of it is read-only failed the
    first save, the steps before it lost. Nothing to check where rank 0 writes it all (one process, or each node's
    own disk)."""
    tmp = shared_temporary_dir(ckpt_root, 0, mesh) if mesh.world > 1 else None
    if tmp is None:
        return
    why = None
    if writes:
        try:
            probe = tmp / f".write-{mesh.rank}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            why = e.strerror or str(e)
    every = mesh.gather_object(why)
    if mesh.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    bad = mesh.broadcast_object(next(((r, w) for r, w in enumerate(every or []) if w is not None), None))
    if bad is not None:
        raise every_rank(CheckpointError(f"rank {bad[0]} cannot write in {ckpt_root} ({bad[1]}), where every rank "
                                         "writes its part of each checkpoint: nothing was trained"))


def _write_weights(path: Path, weights: dict[str, torch.Tensor]) -> dict:
    """Write a rank's share of the weights; what the index records of it: each tensor's shape, and their bytes."""
    save_tensors(path, weights)
    return {"shapes": {k: list(t.shape) for k, t in weights.items()},
            "bytes": sum(t.numel() * t.element_size() for t in weights.values())}


def _write_part(tmp: Path, name: str, mesh, write: Callable[[Path], Any] | None) -> dict:
    """Write this rank's part ``name`` of a checkpoint into ``tmp`` with ``write`` (None: it holds none), fsynced:
    {"file", "index" (what ``write`` returns: what the checkpoint's index records of it), "entry" (its manifest
    entry)}, or {"error": why} (a full disk), or {}."""
    if not write:
        return {}
    try:
        index = write(tmp / name)
        fsync_file(tmp / name)
        entry = {"bytes": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)}
    except Exception as e:  # as save_checkpoint's: an OSError from open/write, a RuntimeError from a short write
        return {"error": f"rank {mesh.rank}: {getattr(e, 'strerror', None) or (str(e).splitlines() or [''])[0]}"}
    return {"file": name, "index": index, "entry": entry}


def _save_on_rank0(ckpt_root: Path, step: int, ranks: list[dict], weights: dict, moments: dict | None,
                   tmp: Path | None, cfg: ModelConfig, tokenizer: Tokenizer, world: int, keep: int | None,
                   protect: tuple[Path, ...], settings: dict[str, bytes] | None) -> Path:
    files: dict[str, Any] = {"config.json": cfg.to_dict(), **(settings or {})}
    written = None
    if tmp is None:
        files[WEIGHTS_FILE], files[OPTIMIZER_FILE] = weights, moments
    else:
        errors = [p["error"] for r in ranks for p in r["parts"].values() if "error" in p]
        if errors:  # save_training removes the parts written
            raise CheckpointError(f"cannot write checkpoint {step_dir_name(step)} in {ckpt_root}: {errors[0]}; "
                                  "the earlier checkpoints are intact")
        of_weights, of_state = ([r["parts"][kind] for r in ranks if r["parts"][kind]]
                                for kind in ("weights", "optimizer"))
        of_weights = _numbered(tmp, of_weights)
        files[WEIGHTS_INDEX] = _weights_index(cfg, of_weights)
        files[INDEX_FILE] = optimizer_index({p["file"]: p["index"] for p in of_state})
        written = {p["file"]: p["entry"] for p in of_weights + of_state}
    if TIKTOKEN_FILE not in files:
        files["tokenizer.json"] = json.loads(tokenizer.to_str())
    for r, per_rank in enumerate(ranks):
        sfx = rank_suffix(r, world)
        files[f"state{sfx}.json"] = per_rank["state"]
        files[f"rng{sfx}.safetensors"] = per_rank["rng"]
    return save_checkpoint(ckpt_root, step, files, keep=keep, protect=protect, written=written)


def _numbered(tmp: Path, parts: list[dict]) -> list[dict]:
    """The ranks' weight ``parts`` renamed 1 to K of K where only K ranks wrote one (replicas, a ZeRO-1 run's data
    parallel ranks), as Hugging Face numbers its shards: no gaps."""
    out = []
    for i, part in enumerate(parts):
        name = weights_part_name(i, len(parts))
        if name != part["file"]:  # "-of-K" < "-of-world": no name of another part
            os.replace(tmp / part["file"], tmp / name)
        out.append({**part, "file": name})
    return out


def _weights_index(cfg: ModelConfig, parts: list[dict]) -> dict:
    """The index of the ranks' weight ``parts`` (``_write_part``'s), as Hugging Face's sharded checkpoints have it
    ({"metadata": {"total_size"}, "weight_map": {tensor: file}}), checked to hold every tensor of the model once, in
    its shape."""
    where: dict[str, str] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for part in parts:
        for name, shape in part["index"]["shapes"].items():
            if name in where:
                raise CheckpointError(f"tensor {name} is in both {where[name]} and {part['file']}")
            where[name], shapes[name] = part["file"], tuple(shape)
    with torch.device("meta"):
        check_model_weights(Transformer(cfg), shapes, "the ranks' weight parts")
    return {"metadata": {"total_size": sum(p["index"]["bytes"] for p in parts)},
            "weight_map": dict(sorted(where.items()))}


def check_layout(path: Path, layout: dict | None) -> None:
    """One-line ``CheckpointError`` naming every field of ``layout`` that differs from the saved one, for a checkpoint
    whose optimizer state is per rank (written before ``has_saved_state``'s: its shards fit only the layout that wrote
    them); one with the state whole resumes on any layout (the batches a step trains on:
    ``config.check_resume_settings``; the replicas' data: the sampler's ``load_resized``)."""
    saved = saved_layout(path)
    if saved is None or layout is None or has_saved_state(path):
        return
    diff = [k for k in sorted(set(saved) | set(layout)) if saved.get(k) != layout.get(k)]
    if diff:
        was = ", ".join(f"{k}={saved.get(k)}" for k in diff)
        now = ", ".join(f"{k}={layout.get(k)}" for k in diff)
        raise CheckpointError(f"checkpoint {path} was saved with {was}; this run has {now} (its optimizer state is "
                              "per rank: resume with the same layout, or start a new run initialised from its weights)")


def _source_rank(path: Path, saved: dict | None, mesh) -> str:
    """The suffix of the state and RNG files this rank resumes from (``saved``: the layout that saved them): its own
    under that layout, else those of its replica's first stage (whose sampler every stage of the replica shares), of
    the first replica for a replica the run did not have (its sampler: ``_load_sampler``)."""
    if saved is None or not has_saved_state(path) or all(
            saved.get(k) == v for k, v in (("world", mesh.world), ("pp", mesh.pp), ("dp", mesh.dp))):
        return rank_suffix(mesh.rank, mesh.world)
    dp = saved.get("dp", mesh.dp)
    return rank_suffix(mesh.dp_rank if mesh.dp_rank < dp else 0, saved.get("world", mesh.world))


def _load_sampler(path: Path, saved: dict | None, sampler, mesh, state: dict) -> None:
    """Resume this rank's sampler from its state file's ``state``, or, saved (``saved``: the layout) with another
    number of data-parallel replicas, from every replica's (``load_resized``)."""
    dp, world = (saved or {}).get("dp", mesh.dp), (saved or {}).get("world", mesh.world)
    if dp == mesh.dp:
        sampler.load_state_dict(state["sampler"])
        return
    states = [json.loads((path / f"state{rank_suffix(r, world)}.json").read_text())["sampler"] for r in range(dp)]
    sampler.load_resized(states, mesh.dp_rank)


# The model config's fields a run may change between its stages: weights of its losses and of the router-bias update,
# not of the model (the V3 report's recipe moves the MTP weight from 0.3 to 0.1 after 10T tokens, and the bias speed
# from 0.001 to 0 for the last 500B)
STAGE_FIELDS = ("mtp_loss_weight", "bias_update_speed", "seq_aux_alpha")


def load_training(path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, sampler, mesh,
                  cfg: ModelConfig, layout: dict | None = None, check: Callable[[], None] | None = None) -> dict:
    """Restore checkpoint ``path`` (verified by the caller) into model (this rank's slice),
    optimizer, sampler and the RNG; every rank calls it. ``cfg`` must equal the saved config but for
    ``STAGE_FIELDS``; ``layout``: this run's process layout, which must equal the saved one only where the
    optimizer state was saved per rank (``check_layout``). Returns this rank's state (step,
    bad_steps, sampler, train_config) and ``stage_changes``: {field: [saved, now]} of the ``STAGE_FIELDS`` that
    differ. Raises ``CheckpointError`` for one that does not fit, or a file that does not parse as what it holds (the
    manifest vouches that a file is the one written, not that it was written well). Each rank reads its own part
    of the files, so the ranks agree before returning: one that failed fails every rank, the others naming it (not
    a peer's closed connection at their next collective). ``check``: the caller's own checks of this rank's copy
    (``flyer.train.config.check_resumed_run``), run once it is known to be rank 0's, failing alike."""
    failed: Exception | None = None
    views = mesh.broadcast_object(mesh.gather_object(_view(path)))
    try:
        same_checkpoint(path, mesh, views)
        if check is not None:
            try:
                check()
            except Exception as e:  # the same copy on every rank (same_checkpoint): the same refusal, said once
                raise every_rank(e)
        state = _load_training(path, model, optimizer, sampler, mesh, cfg, layout)
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError, EOFError, pickle.UnpicklingError,
            SafetensorError, OSError) as e:  # a DataError (the sampler's) and a ConfigError are ValueErrors too
        failed = e if isinstance(e, (CheckpointError, DataError, ConfigError)) else CheckpointError(
            f"checkpoint {path}: unreadable ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})")
    every = mesh.gather_object(None if failed is None else str(failed))
    first = mesh.broadcast_object(next(((r, m) for r, m in enumerate(every or []) if m is not None), None))
    if failed is not None:
        raise failed from None  # said by this rank
    if first is not None:  # said by rank 0 for the others
        raise every_rank(CheckpointError(f"rank {first[0]} could not resume: {first[1]}"))
    return state


def _view(path: Path) -> tuple[str, str, int, int] | None:
    """(host, manifest digest, device, inode) of this rank's view of checkpoint ``path``'s manifest; None if
    unreadable."""
    try:
        st = (path / "manifest.json").stat()
        digest = hashlib.sha256((path / "manifest.json").read_bytes()).hexdigest()
    except OSError:
        return None
    return socket.gethostname(), digest, st.st_dev, st.st_ino


def same_checkpoint(path: Path, mesh, views: list) -> None:
    """``CheckpointError`` unless this rank's copy of ``path`` is the one rank 0 verified: the same manifest (the
    same step and files), and, where it is another file than rank 0's (another node's disk, a copy), its files
    verified here too, by the first rank that sees that copy (``views``: every rank's ``_view``). Only rank 0 chose
    and verified the checkpoint; a node's own copy, damaged or of another step, was read unchecked."""
    mine = views[mesh.rank]
    if mine is None:
        raise CheckpointError(f"checkpoint {path}: rank {mesh.rank} cannot read its manifest.json")
    if views[0] is not None and mine[1] != views[0][1]:
        raise CheckpointError(f"checkpoint {path}: rank {mesh.rank}'s copy is not rank 0's (another manifest: "
                              "another step or run): every rank must read the same checkpoint")
    # rank 0's very file (its device and inode: one host, or a shared file system that reports them alike) is
    # trusted; the first rank on a copy of its own checks its files' checksums
    if mesh.rank and views.index(mine) == mesh.rank and (views[0] is None or mine[2:] != views[0][2:]):
        verify_checkpoint(path)


def _load_training(path: Path, model, optimizer, sampler, mesh, cfg: ModelConfig, layout: dict | None) -> dict:
    saved = ModelConfig.from_dict(json.loads((path / "config.json").read_text()))
    if saved.replace(**{k: getattr(cfg, k) for k in STAGE_FIELDS}) != cfg:
        diff = [k for k, v in saved.to_dict().items() if cfg.to_dict()[k] != v and k not in STAGE_FIELDS]
        raise CheckpointError(f"checkpoint {path} is from a different config (fields differ: {', '.join(diff)})")
    check_layout(path, layout)
    saved_at = saved_layout(path)
    if mesh.ep == 1 and mesh.pp == 1:  # every weight is here: check names and shapes for a one-line error
        load_model_weights(model, read_weights(path), f"checkpoint {path}")
    else:  # this rank's part only (its experts' rows, its stages' weights)
        load_state_file(model, weight_files(path), mesh)
    sfx = _source_rank(path, saved_at, mesh)
    state_path = path / f"state{sfx}.json"
    if not state_path.is_file():
        raise CheckpointError(f"checkpoint {path} has no {state_path.name}: saved with another process layout")
    if has_saved_state(path):
        load_full_optimizer_state(model, optimizer, mesh, path)
    else:  # written before the optimizer state was saved whole: this rank's own (check_layout: the same layout)
        optimizer.load_state_dict(read_torch(path / f"optimizer{sfx}.pt"))
    state = json.loads(state_path.read_text())
    if isinstance(state.get("step"), bool) or not isinstance(state.get("step"), int) or state["step"] < 0:
        raise CheckpointError(f"checkpoint {path}: {state_path.name} has no step count (got {state.get('step')!r})")
    _load_sampler(path, saved_at, sampler, mesh, state)
    rng = read_tensors(path / f"rng{sfx}.safetensors")
    torch.set_rng_state(rng["torch_cpu"])
    if "torch_cuda" in rng and mesh.device.type == "cuda":
        torch.cuda.set_rng_state(rng["torch_cuda"], mesh.device)
    state["stage_changes"] = {k: [getattr(saved, k), getattr(cfg, k)] for k in STAGE_FIELDS
                              if getattr(saved, k) != getattr(cfg, k)}
    return state
