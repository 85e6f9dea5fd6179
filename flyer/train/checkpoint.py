"""Atomic, verified checkpoints.

Layout of ``RUN/checkpoints/step_00000100/``:

- ``model.safetensors``  weights and persistent buffers (router biases), full single-process layout
- ``model-KKKKK-of-NNNNN.safetensors``  instead, from a run of several ranks sharing the checkpoint folder: each
  and ``model.safetensors.index.json``  writing rank's share of the weights, each tensor whole in one file, as
                         Hugging Face's sharded checkpoints are, numbered from 1 among the N ranks that write one
                         (``weights_part_name``; ``weight_files`` reads either layout)
- ``optimizer.safetensors``  optimizer state, full single-process layout (``{parameter}/{key}``), so a run
                         resumes on another process layout (``flyer.parallel.optim_state``); checkpoints
                         written before it have ``optimizer*.pt`` (one per rank, for the layout that wrote them)
- ``optimizer-RRRRR-of-WWWWW.safetensors``  instead, from a run of several ranks sharing the checkpoint folder:
  and ``optimizer.index.json``  each rank's part of that state, written by that rank (RRRRR: its global rank, from
                         0, of the W), and where each tensor lies
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

``flyer.train.training_state`` writes and restores a whole training run (model, optimizer, sampler, RNG,
counters) on any mesh in this format.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from flyer.config import ModelConfig
from flyer.data.tiktoken_file import read_json_object
from flyer.data.tokenizer import load_tokenizer, tokenizer_file
from flyer.errors import CheckpointError
from flyer.parse import json_loads

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
STATE_FILES = ("state.json", "state-rank0.json")  # a training run's state: one process's, or rank 0's of several
_PREFIX = "step_"
_REPLACED = "-replaced"  # a temporary directory's suffix: the checkpoint a save of its step moved aside
# A Hugging Face directory's tokenizer and generation settings, beside its tokenizer.json: what
# transformers reads for the chat template, BOS/EOS and sampling defaults. A run started from one
# carries them in its checkpoints (``training_state.save_training``), so its readers see the model's, not flyer's.
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


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_file(path: Path) -> None:
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
    """Directories named as checkpoints (``step_N``), newest first; not verified (a manifest may be missing)."""
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


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` to the safetensors file ``path`` (tied ones each with its own copy: ``_unshared``)."""
    save_file(_unshared(tensors), str(path))


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
            save_tensors(path, obj)
        elif name.endswith(".pt"):
            torch.save(obj, path)
        else:  # .json (save_checkpoint refused any other kind)
            write_json(path, obj)
        fsync_file(path)
        entries[name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    write_json(tmp / "manifest.json", {"format_version": FORMAT_VERSION, "step": step, "files": entries})
    fsync_file(tmp / "manifest.json")
    final, old = tmp.parent / step_dir_name(step), tmp.with_name(tmp.name + _REPLACED)
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it, keeping files flyer did not write
        for p in sorted(final.rglob("*")):
            name = p.relative_to(final).as_posix()
            if p.is_file() and not p.is_symlink() and not read_by_flyer(name) and not (tmp / name).exists():
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                os.replace(p, tmp / name)
        os.replace(final, old)  # aside in one rename: a crash meanwhile loses no step (restore_moved_aside)
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
    if _is_step_name(path.name) and manifest.get("step") != int(path.name[len(_PREFIX):]):  # a copy renamed
        raise CheckpointError(f"checkpoint {path}: its manifest says step {manifest.get('step')!r}, its directory's "
                              "name another (copied or renamed: a run resumes by the name)")
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
            same = stats[name].st_size == meta["bytes"] and sha256_file(path / name) == meta["sha256"]
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


def _temporaries(ckpt_root: Path) -> list[Path]:
    return [p for p in ckpt_root.iterdir() if p.name.startswith(".tmp-")] if ckpt_root.is_dir() else []


def restore_moved_aside(ckpt_root: Path) -> None:
    """Put back a checkpoint a crash left moved aside while its step was saved again (``_write_files``): a resume
    chooses its start after this, or would miss it."""
    for p in _temporaries(ckpt_root):
        step = ckpt_root / p.name.removeprefix(".tmp-").partition("-")[0]
        if p.name.endswith(_REPLACED) and _is_step_name(step.name) and not step.exists():
            os.replace(p, step)


def clean_temporaries(ckpt_root: Path) -> None:
    """Remove half-written checkpoint directories left by a crash, once ``restore_moved_aside`` has put back what
    they moved aside."""
    restore_moved_aside(ckpt_root)
    for p in _temporaries(ckpt_root):
        shutil.rmtree(p, ignore_errors=True)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def weights_part_name(rank: int, world: int) -> str:
    """The file of the ``rank``-th of ``world`` shares of a checkpoint's weights (numbered from 1, as Hugging Face
    numbers its shards: a rank's, renumbered among the ranks that hold some; the optimizer's parts go by rank)."""
    return f"model-{rank + 1:05d}-of-{world:05d}.safetensors"


def is_training_step(path: Path) -> bool:
    """Whether directory ``path`` holds a training run's state (``STATE_FILES``): a flyer step, even one whose
    manifest is gone, and not a Hugging Face directory."""
    return any((path / name).is_file() for name in STATE_FILES)


def _tensor_names(path: Path) -> list[str]:
    """The tensors safetensors file ``path`` holds (its header alone is read)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a safetensors file ({(str(e).splitlines() or [''])[0]})") from None


def weight_files(path: Path) -> dict[str, Path]:
    """Tensor name -> file of the weights in directory ``path`` (a checkpoint's, or a Hugging Face model's): from the
    index (``WEIGHTS_INDEX``: every listed file must exist and hold the tensors it is listed for) or the single file.
    The index is the one record of where a tensor is: a file holding more is read for what the index says only."""
    if not (path / WEIGHTS_INDEX).is_file():
        if not (path / WEIGHTS_FILE).is_file():
            raise CheckpointError(f"{path}: no {WEIGHTS_FILE} or {WEIGHTS_INDEX}")
        return dict.fromkeys(_tensor_names(path / WEIGHTS_FILE), path / WEIGHTS_FILE)
    index = read_json_object(path / WEIGHTS_INDEX, CheckpointError)
    wm = index.get("weight_map")
    if not isinstance(wm, dict):
        raise CheckpointError(f"{path / WEIGHTS_INDEX}: no weight_map")
    held: dict[str, set[str]] = {}
    for name, f in wm.items():
        # a shard is a file of this directory: never a path out of it (an index may come from anyone)
        if not isinstance(f, str) or not f or Path(f).is_absolute() or ".." in Path(f).parts:
            raise CheckpointError(f"{path / WEIGHTS_INDEX}: tensor {name}: {f!r:.60} is not a file name inside "
                                  f"the checkpoint directory")
        if f not in held:
            if not (path / f).is_file():
                raise CheckpointError(f"{path / WEIGHTS_INDEX}: shard {f} (holding tensor {name}) is missing")
            held[f] = set(_tensor_names(path / f))
        if name not in held[f]:
            raise CheckpointError(f"{path / WEIGHTS_INDEX}: tensor {name} is not in {f}, the shard it names")
    return {name: path / f for name, f in wm.items()}


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every weight of checkpoint ``path`` (its one file, or its ranks' parts), each from the file its index names."""
    by_file: dict[Path, list[str]] = {}
    for name, f in weight_files(path).items():
        by_file.setdefault(f, []).append(name)
    out = {}
    for f, names in sorted(by_file.items()):
        with safe_open(str(f), framework="pt") as opened:
            out.update({name: opened.get_tensor(name) for name in names})
    return out


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
    if is_training_step(p):  # a step directory whose manifest is gone
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
    its weights are ``model.safetensors`` there, or its ranks' parts with an index
    (``flyer.interop.load.load_pretrained`` loads either)."""
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


# ---- what a training run's checkpoint records ---------------------------------------------------
def saved_state(path: Path) -> dict:
    """Rank 0's state file of checkpoint ``path`` (step, sampler, train_config, layout), or {}; one that is not a JSON
    object: ``CheckpointError`` naming it."""
    for name in STATE_FILES:
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
