"""Atomic, verified checkpoints.

Layout of ``RUN/checkpoints/step_00000100/``:

- ``model.safetensors``  weights and persistent buffers (router biases), full single-process layout
- ``optimizer.safetensors``  optimizer state, full single-process layout (``{parameter}/{key}``), so a run
                         resumes on another process layout (``flyer.parallel.optim_state``); checkpoints
                         written before it have ``optimizer*.pt`` (one per rank, for the layout that wrote them)
- ``optimizer-RRRRR-of-WWWWW.safetensors``  instead, from a run of several ranks sharing the checkpoint folder:
  and ``optimizer.index.json``  each rank's part of that state, written by that rank, and where each tensor lies
- ``state*.json``        step, sampler position, counters, train config (one per rank)
- ``rng*.safetensors``   RNG state
- ``config.json``        the model config
- ``tokenizer.json``     the tokenizer the run trains with
- ``SETTINGS_FILES``     a run fine-tuned from a Hugging Face directory (``--init``): that directory's
                         tokenizer and generation settings (chat template, special tokens, EOS ids,
                         sampling defaults), byte for byte, whichever it has, and its named chat templates
                         (``additional_chat_templates/NAME.jinja``)
- ``tiktoken.model``     instead of tokenizer.json, a run fine-tuned from a tiktoken directory (Kimi's): its
  and remote code        tokenizer files byte for byte (``flyer.data.tokenizer_copy``), its cut of long runs
                         with them
- ``manifest.json``      size and SHA-256 of every file above; written last

A checkpoint is written into a temporary directory, every file fsynced, then renamed into place
(and the parent directory fsynced), so a crash leaves either a complete checkpoint or a temporary
directory that is ignored and cleaned. On load every checksum is verified; a corrupt newest
checkpoint is reported and the previous one is used.

``save_training`` / ``load_training`` write and restore a whole training run (model, optimizer,
sampler, RNG, counters) on any mesh; the files above are their format.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import secrets
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from flyer.config import ModelConfig
from flyer.data.tiktoken_file import TIKTOKEN_FILE
from flyer.data.tokenizer import load_tokenizer, tokenizer_file
from flyer.errors import CheckpointError, ConfigError, DataError
from flyer.parallel.grads import load_state_file
from flyer.parallel.optim_state import (INDEX_FILE, OPTIMIZER_FILE, full_optimizer_state, has_saved_state,
                                        load_full_optimizer_state, optimizer_index, optimizer_part, part_name,
                                        write_optimizer_part)
from flyer.parse import json_loads

FORMAT_VERSION = 1
_PREFIX = "step_"
_PROBE = ".shared"  # in a save's temporary directory while the ranks check that they all see it
_REPLACED = "-replaced"  # a temporary directory's suffix: the checkpoint a save of its step moved aside
# A Hugging Face directory's tokenizer and generation settings, beside its tokenizer.json: what
# transformers reads for the chat template, BOS/EOS and sampling defaults. A run started from one
# carries them in its checkpoints (``save_training``), so its readers see the model's, not flyer's.
SETTINGS_FILES = ("tokenizer_config.json", "generation_config.json", "special_tokens_map.json",
                  "chat_template.jinja", "chat_template.json")
# transformers 5's folder of named chat templates beside chat_template.jinja (NAME.jinja: "tool_use", ...), carried too
NAMED_TEMPLATES = "additional_chat_templates"


def settings_names(path: Path) -> list[str]:
    """The settings files the directory ``path`` has, as names relative to it: ``SETTINGS_FILES`` and its named
    chat templates (``NAMED_TEMPLATES``/NAME.jinja)."""
    named = sorted(f"{NAMED_TEMPLATES}/{f.name}" for f in (path / NAMED_TEMPLATES).glob("*.jinja") if f.is_file())
    return [n for n in SETTINGS_FILES if (path / n).is_file()] + named


def read_by_flyer(name: str) -> bool:
    """Whether a file of a checkpoint (``name`` relative to it) is of a kind its readers read: JSON, tensors, pickles,
    chat templates, a tiktoken tokenizer's files and remote code, anything in ``NAMED_TEMPLATES``."""
    base = name.rpartition("/")[2]
    return name.startswith(f"{NAMED_TEMPLATES}/") or (not base.startswith(".") and base.endswith(_READ_SUFFIXES))


_READ_SUFFIXES = (".json", ".safetensors", ".pt", ".jinja", ".model", ".tiktoken", ".py")


def is_settings_name(name: str) -> bool:
    """Whether ``name`` (a file of a checkpoint, relative to it) is one of ``settings_names``'s."""
    folder, _, rest = name.rpartition("/")
    return name in SETTINGS_FILES or (folder == NAMED_TEMPLATES and rest.endswith(".jinja") and "/" not in rest)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_path(path: Path) -> None:
    """fsync a file or a directory by its path (a directory's makes the renames in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True))


def step_dir_name(step: int) -> str:
    return f"{_PREFIX}{step:08d}"


def _is_step_name(name: str) -> bool:
    return name.startswith(_PREFIX) and name[len(_PREFIX):].isdigit()


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete-looking checkpoint directories (with a manifest), newest first."""
    if not ckpt_root.is_dir():
        return []
    dirs = [p for p in ckpt_root.iterdir() if p.is_dir() and _is_step_name(p.name)]
    return sorted(dirs, key=lambda p: int(p.name[len(_PREFIX):]), reverse=True)


def check_step_names(ckpt_root: Path) -> None:
    """Raise ``CheckpointError`` for an entry of ``ckpt_root`` named as a checkpoint directory that is not one (a
    file, a link): that step's save would fail on it after the step's training, and it is not ours to remove."""
    for p in ckpt_root.iterdir() if ckpt_root.is_dir() else ():
        if _is_step_name(p.name) and (p.is_symlink() or not p.is_dir()):
            raise CheckpointError(f"{p} is named as a checkpoint but is not a checkpoint directory: move it away")


def save_checkpoint(ckpt_root: Path, step: int, files: dict[str, Any], keep: int | None = None,
                    protect: tuple[Path, ...] = (), written: dict[str, dict] | None = None) -> Path:
    """Write ``files`` (name -> tensor dict for .safetensors, state dict for .pt, object for .json,
    bytes for any name: written as they are) as checkpoint ``step`` atomically, then ``prune`` to
    ``keep`` valid checkpoints (``protect``: directories never removed). ``written``: files other processes already
    wrote and fsynced in the temporary directory (``temporary_dir``), name -> their manifest entry. A failed write
    (a full disk) removes its temporary directory and raises ``CheckpointError``; the checkpoints already there are
    untouched."""
    unsupported = [n for n, obj in files.items()
                   if not isinstance(obj, bytes) and not n.endswith((".safetensors", ".pt", ".json"))]
    if unsupported:
        raise ValueError(f"unsupported checkpoint file type: {unsupported[0]}")
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final, tmp = ckpt_root / step_dir_name(step), temporary_dir(ckpt_root, step)
    try:
        _write_files(tmp, step, files, written)
    except Exception as e:  # a full disk is an OSError from open/write, a RuntimeError from torch.save's short write
        why = getattr(e, "strerror", None) or (str(e).splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"cannot write checkpoint {final.name} in {ckpt_root}: {why}; "
                              "the earlier checkpoints are intact") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # renamed into place on success, so gone already
    if keep:
        prune(ckpt_root, keep, protect=(final, *protect))
    return final


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` on the CPU, contiguous, each with its own memory: safetensors refuses tensors that
    share it (a tied head and embedding), so a name whose memory an earlier one uses gets a copy."""
    out, seen = {}, set()
    for k, v in tensors.items():
        v = v.detach().contiguous().cpu()
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def temporary_dir(ckpt_root: Path, step: int) -> Path:
    """The directory this process writes checkpoint ``step`` into before renaming it into place."""
    return ckpt_root / f".tmp-{step_dir_name(step)}-{os.getpid()}"


def _write_files(tmp: Path, step: int, files: dict[str, Any], written: dict[str, dict] | None = None) -> None:
    """Write every file and the manifest into ``tmp`` (which holds ``written`` already, if given), fsync, and rename
    it to its step directory."""
    if written is None:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    entries = dict(written or {})
    for name, obj in files.items():
        path = tmp / name
        path.parent.mkdir(exist_ok=True)  # a settings file's folder (NAMED_TEMPLATES)
        if isinstance(obj, bytes):
            path.write_bytes(obj)
        elif name.endswith(".safetensors"):
            save_file(_unshared(obj), str(path))
        elif name.endswith(".pt"):
            torch.save(obj, path)
        else:  # .json (save_checkpoint refused any other kind)
            write_json(path, obj)
        _fsync_file(path)
        entries[name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    write_json(tmp / "manifest.json", {"format_version": FORMAT_VERSION, "step": step, "files": entries})
    _fsync_file(tmp / "manifest.json")
    final, old = tmp.parent / step_dir_name(step), tmp.with_name(tmp.name + _REPLACED)
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it, keeping files flyer did not write
        for p in sorted(final.rglob("*")):
            name = p.relative_to(final).as_posix()
            if p.is_file() and not p.is_symlink() and not read_by_flyer(name) and not (tmp / name).exists():
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                os.replace(p, tmp / name)
        os.replace(final, old)  # aside in one rename: a crash meanwhile loses no step (clean_temporaries)
    fsync_path(tmp)
    os.replace(tmp, final)
    fsync_path(tmp.parent)
    if old.exists():
        shutil.rmtree(old)


def prune(ckpt_root: Path, keep: int, protect: tuple[Path, ...] = ()) -> None:
    """Remove checkpoints older than the newest ``keep`` valid ones, except those in ``protect``
    (protected ones count as valid). Invalid checkpoints newer than those are left alone: only a
    valid checkpoint ever makes room for another."""
    protect = tuple(p.resolve() for p in protect)
    valid = 0
    for path in list_checkpoints(ckpt_root):
        if valid >= keep:
            if path.resolve() not in protect:
                shutil.rmtree(path, ignore_errors=True)
            continue
        if path.resolve() in protect:
            valid += 1
            continue
        try:
            verify_checkpoint(path)
            valid += 1
        except CheckpointError:
            pass


def verify_checkpoint(path: Path) -> dict:
    """Return the manifest if every listed file exists with the recorded size and checksum."""
    mpath = path / "manifest.json"
    try:
        manifest = json_loads(mpath.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:  # json_loads: deep nesting is a ValueError too
        raise CheckpointError(f"checkpoint {path}: unreadable manifest ({e})") from None
    if not isinstance(files, dict) or not all(isinstance(m, dict) and isinstance(m.get("bytes"), int)
                                              and isinstance(m.get("sha256"), str) for m in files.values()):
        raise CheckpointError(f"checkpoint {path}: malformed manifest (files: name -> bytes and sha256)")
    if manifest.get("format_version") != FORMAT_VERSION:  # another layout of the files: not to be read as this one
        raise CheckpointError(f"checkpoint {path}: format version {manifest.get('format_version')!r}, this flyer "
                              f"reads {FORMAT_VERSION}")
    for name in files:
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path}: missing file {name}")
    # a manifest covers every file the checkpoint was written with: one it leaves out that a reader reads would load
    # unchecked; others (a note, an editor's swap file, NFS's .nfs files) are not the checkpoint's
    written = (p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())  # a settings folder's too
    unlisted = sorted(n for n in written if n != "manifest.json" and n not in files and read_by_flyer(n))
    if unlisted:
        raise CheckpointError(f"checkpoint {path}: {unlisted[0]} is not in its manifest")
    # loading reads a checkpoint's config, header and weights in turn, each through here: files
    # hashed before and unchanged since (inode, size, mtime) are not read again. Only files older
    # than the mtime's granularity are remembered: a write in the same tick could keep the stamp.
    stats = {n: (path / n).stat() for n in sorted(files)}
    stamp = tuple((str((path / n).resolve()), st.st_ino, st.st_size, st.st_mtime_ns) for n, st in stats.items())
    if stamp in _VERIFIED:
        return manifest
    for name, meta in files.items():
        try:
            same = stats[name].st_size == meta["bytes"] and _sha256(path / name) == meta["sha256"]
        except OSError as e:  # a file the manifest lists but this process may not read
            raise CheckpointError(f"checkpoint {path}: cannot read {name} ({e.strerror or e})") from None
        if not same:
            raise CheckpointError(f"checkpoint {path}: checksum mismatch in {name}")
    if all(st.st_mtime_ns < time.time_ns() - 2 * 10**9 for st in stats.values()):
        _VERIFIED.add(stamp)
    return manifest


_VERIFIED: set[tuple] = set()  # verify_checkpoint's stamps of checkpoints whose files hashed right


def newest_valid_checkpoint(ckpt_root: Path) -> tuple[Path | None, list[str]]:
    """(newest checkpoint whose checksums verify or None, what is wrong with each newer one)."""
    problems = []
    for path in list_checkpoints(ckpt_root):
        try:
            verify_checkpoint(path)
            return path, problems
        except CheckpointError as e:
            problems.append(str(e))
    return None, problems


def find_valid_checkpoint(ckpt_root: Path, log=print) -> Path | None:
    """Newest checkpoint whose checksums verify; corrupt ones are reported and skipped."""
    path, problems = newest_valid_checkpoint(ckpt_root)
    for p in problems:
        log(f"warning: {p}; falling back to the previous checkpoint")
    return path


def clean_temporaries(ckpt_root: Path) -> None:
    """Remove half-written checkpoint directories left by a crash; put back a checkpoint a crash left moved aside
    while its step was saved again (``_write_files``)."""
    if ckpt_root.is_dir():
        for p in ckpt_root.iterdir():
            if not p.name.startswith(".tmp-"):
                continue
            step = ckpt_root / p.name.removeprefix(".tmp-").partition("-")[0]
            if p.name.endswith(_REPLACED) and _is_step_name(step.name) and not step.exists():
                os.replace(p, step)
            else:
                shutil.rmtree(p, ignore_errors=True)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def read_torch(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)  # never unpickle arbitrary objects


def load_model_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], where: str) -> None:
    """Load weights strictly; shape or name mismatches become one-line errors."""
    check_model_weights(model, {k: tuple(v.shape) for k, v in weights.items()}, where)
    model.load_state_dict(weights, strict=True)


def check_model_weights(model: torch.nn.Module, shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """``CheckpointError`` unless ``shapes`` names exactly the model's state and each with its shape."""
    own = model.state_dict()
    missing = sorted(set(own) - set(shapes))
    extra = sorted(set(shapes) - set(own))
    if missing or extra:
        raise CheckpointError(f"{where} does not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    for k, shape in shapes.items():
        if tuple(shape) != tuple(own[k].shape):
            raise CheckpointError(f"{where} does not match the model: {k} has shape {tuple(shape)}, "
                                  f"the model expects {tuple(own[k].shape)} (a checkpoint from a different config?)")


def resolve_checkpoint_path(path: str | Path) -> Path:
    """A step directory, or a run directory / its checkpoints folder (newest valid checkpoint)."""
    p = Path(path)
    if (p / "manifest.json").is_file():
        verify_checkpoint(p)
        return p
    if (p / "state.json").is_file():  # a step directory (its training state) whose manifest is gone
        raise CheckpointError(f"checkpoint {p}: no manifest.json (every step is written with one: this one is "
                              f"incomplete or was edited), so its files cannot be verified")
    for root in (p / "checkpoints", p):
        # a warning is printed as "flyer: warning: ...": the log line's own prefix would double it
        found = find_valid_checkpoint(root, log=lambda m: warnings.warn(m.removeprefix("warning: "), stacklevel=3))
        if found is not None:
            return found
    raise CheckpointError(f"no valid checkpoint under {p}")


def inference_checkpoint(path: str | Path) -> tuple[Path, ModelConfig, Tokenizer]:
    """(step directory, model config, tokenizer) of a run directory or a step directory, verified;
    its weights are ``model.safetensors`` there (``flyer.interop.load.load_pretrained`` loads them)."""
    ckpt = resolve_checkpoint_path(path)
    try:
        d = json_loads((ckpt / "config.json").read_text())
        if not isinstance(d, dict):
            raise ValueError(f"a JSON {type(d).__name__}, not an object")
        cfg = ModelConfig.from_dict(d)
    except (OSError, ValueError, TypeError) as e:
        why = (str(e).splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"checkpoint {ckpt}: bad config.json ({why})") from None
    # read through the one guard: the manifest only vouches that the file is the one written (a
    # bad one written so, or one it does not list, must still fail in one line naming it)
    return ckpt, cfg, load_tokenizer(tokenizer_file(ckpt), CheckpointError)


# ---- a training run: model, optimizer, sampler, RNG and counters on any mesh ----------------------
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
    full single-process layout: the weights by rank 0, the optimizer's state by each rank its part where every rank
    sees the folder rank 0 writes in (``shared_temporary_dir``), else gathered and written by rank 0. Sampler
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
    weights = mesh.full_state_dict(model, only_rank0=True)
    state = {"step": step, "sampler": sampler.state_dict(), "bad_steps": bad_steps, "train_config": train_config,
             "layout": layout, **(extra or {})}
    tmp = shared_temporary_dir(ckpt_root, step, mesh) if mesh.world > 1 else None
    moments, part = None, None
    if tmp is None:
        moments = full_optimizer_state(model, optimizer, mesh)
    else:
        part = _write_part(tmp, optimizer_part(model, optimizer, mesh), mesh)
    ranks = mesh.gather_object({"state": state, "rng": rng_state(mesh.device), "part": part})
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
        raise failed
    if why is not None:
        raise CheckpointError(why)
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


def _write_part(tmp: Path, part: dict, mesh) -> dict:
    """Write this rank's ``part`` of the optimizer state into ``tmp``, fsynced: {"file", "index" (its
    ``optimizer_index`` entries), "entry" (its manifest entry)}, or {"error": why} (a full disk), or {} if it holds
    none."""
    if not part:
        return {}
    name = part_name(mesh.rank, mesh.world)
    try:
        index = write_optimizer_part(tmp / name, part)
        _fsync_file(tmp / name)
        entry = {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
    except Exception as e:  # as save_checkpoint's: an OSError from open/write, a RuntimeError from a short write
        return {"error": f"rank {mesh.rank}: {getattr(e, 'strerror', None) or (str(e).splitlines() or [''])[0]}"}
    return {"file": name, "index": index, "entry": entry}


def _save_on_rank0(ckpt_root: Path, step: int, ranks: list[dict], weights: dict, moments: dict | None,
                   tmp: Path | None, cfg: ModelConfig, tokenizer: Tokenizer, world: int, keep: int | None,
                   protect: tuple[Path, ...], settings: dict[str, bytes] | None) -> Path:
    files: dict[str, Any] = {"model.safetensors": weights, "config.json": cfg.to_dict(), **(settings or {})}
    written = None
    if tmp is None:
        files[OPTIMIZER_FILE] = moments
    else:
        errors = [r["part"]["error"] for r in ranks if "error" in r["part"]]
        if errors:  # save_training removes the parts written
            raise CheckpointError(f"cannot write checkpoint {step_dir_name(step)} in {ckpt_root}: {errors[0]}; "
                                  "the earlier checkpoints are intact")
        parts = [r["part"] for r in ranks if r["part"]]
        files[INDEX_FILE] = optimizer_index({p["file"]: p["index"] for p in parts})
        written = {p["file"]: p["entry"] for p in parts}
    if TIKTOKEN_FILE not in files:
        files["tokenizer.json"] = json.loads(tokenizer.to_str())
    for r, per_rank in enumerate(ranks):
        sfx = rank_suffix(r, world)
        files[f"state{sfx}.json"] = per_rank["state"]
        files[f"rng{sfx}.safetensors"] = per_rank["rng"]
    return save_checkpoint(ckpt_root, step, files, keep=keep, protect=protect, written=written)


def saved_state(path: Path) -> dict:
    """Rank 0's state file of checkpoint ``path`` (step, sampler, train_config, layout), or {}; one that is not a JSON
    object: ``CheckpointError`` naming it."""
    for name in ("state.json", "state-rank0.json"):
        if (path / name).is_file():
            try:
                state = json_loads((path / name).read_text())
            except (OSError, ValueError) as e:
                raise CheckpointError(f"checkpoint {path}: unreadable {name} ({e})") from None
            if not isinstance(state, dict):
                raise CheckpointError(f"checkpoint {path}: {name} is not a JSON object")
            return state
    return {}


def trained_fp4_experts(path: Path) -> bool:
    """Whether the run saved at checkpoint ``path`` trained its routed experts with FP4 QAT at its last steps
    (``train_config.fp4_experts``, ``flyer train --fp4-experts``): its FP32 master weights are then not the model it
    trained and evaluated, their FP4 values are (``flyer.fp8.fp4``). A checkpoint without the field did not."""
    return (saved_state(path).get("train_config") or {}).get("fp4_experts") is True


def saved_layout(path: Path) -> dict | None:
    """The process layout checkpoint ``path`` was saved with (None for one saved without it)."""
    return saved_state(path).get("layout")


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
                              "per rank: resume with the same layout, or start a new run from its weights with init)")


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
                  cfg: ModelConfig, layout: dict | None = None) -> dict:
    """Restore checkpoint ``path`` (verified by the caller) into model (this rank's slice),
    optimizer, sampler and the RNG; every rank calls it. ``cfg`` must equal the saved config but for
    ``STAGE_FIELDS``, and ``layout`` the saved process layout (``save_training``). Returns this rank's state (step,
    bad_steps, sampler, train_config) and ``stage_changes``: {field: [saved, now]} of the ``STAGE_FIELDS`` that
    differ. Raises ``CheckpointError`` for one that does not fit, or a file that does not parse as what it holds (the
    manifest vouches that a file is the one written, not that it was written well). Each rank reads its own part
    of the files, so the ranks agree before returning: one that failed fails every rank, the others naming it (not
    a peer's closed connection at their next collective)."""
    failed: Exception | None = None
    try:
        state = _load_training(path, model, optimizer, sampler, mesh, cfg, layout)
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError, EOFError, pickle.UnpicklingError,
            SafetensorError, OSError) as e:  # a DataError (the sampler's) and a ConfigError are ValueErrors too
        failed = e if isinstance(e, (CheckpointError, DataError, ConfigError)) else CheckpointError(
            f"checkpoint {path}: unreadable ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})")
    every = mesh.gather_object(None if failed is None else str(failed))
    first = mesh.broadcast_object(next(((r, m) for r, m in enumerate(every or []) if m is not None), None))
    if failed is not None:
        raise failed from None
    if first is not None:
        raise CheckpointError(f"rank {first[0]} could not resume: {first[1]}")
    return state


def _load_training(path: Path, model, optimizer, sampler, mesh, cfg: ModelConfig, layout: dict | None) -> dict:
    saved = ModelConfig.from_dict(json.loads((path / "config.json").read_text()))
    if saved.replace(**{k: getattr(cfg, k) for k in STAGE_FIELDS}) != cfg:
        diff = [k for k, v in saved.to_dict().items() if cfg.to_dict()[k] != v and k not in STAGE_FIELDS]
        raise CheckpointError(f"checkpoint {path} is from a different config (fields differ: {', '.join(diff)})")
    check_layout(path, layout)
    saved_at = saved_layout(path)
    if mesh.ep == 1 and mesh.pp == 1:  # every weight is here: check names and shapes for a one-line error
        load_model_weights(model, read_tensors(path / "model.safetensors"), f"checkpoint {path}")
    else:  # this rank's part only (its experts' rows, its stages' weights)
        load_state_file(model, path / "model.safetensors", mesh)
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
