"""What a training run is asked to do: ``TrainConfig`` (the fields ``flyer train``'s flags and a config's
``[train]`` section set, and their checks), what a resumed run must keep, and the learning-rate schedule."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import os
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from flyer.config import INDEXER_TRAIN_MODES
from flyer.data.chat_data import is_chat_data
from flyer.data.tiktoken_file import TIKTOKEN_FILE
from flyer.data.tokenizer import MIN_VOCAB
from flyer.data.tokenizer_copy import files_build
from flyer.errors import CheckpointError, FieldError
from flyer.fp8.linear import ACTIVATION_CACHES
from flyer.model.recompute import MODES as RECOMPUTE_MODES
from flyer.interop.load import init_weight_files, read_settings, settings_dir
from flyer.limits import SIZE_LIMITS
from flyer.model.dispatch import DISPATCHER_KINDS
from flyer.optim.muon import OPTIMIZERS
from flyer.parallel.stages import PP_SCHEDULES, SPLIT_SCHEDULES, min_micro_batches
from flyer.parse import nesting_depth
from flyer.runtime import PRECISIONS, check_threads
from flyer.train import checkpoint as ckpt

SCHEDULES = ("cosine", "constant", "v3")
# DeepSeek-V3's schedule (report, section 4.2) as the trillions of tokens at which its stages end: lr to 10T, a
# cosine decay to lr * min_lr_ratio (2.2e-5 of 2.2e-4) by 14.3T, that for 333B more, then 7.3e-6 to the end (14.8T)
V3_STAGES_T = (10.0, 14.3, 14.8 - 0.167, 14.8)
V3_FINAL_RATIO = 7.3e-6 / 2.2e-5  # the last stage's lr, of the decay's end
# What a resumed run keeps (seed first, as the README promises): each changes what the remaining
# steps compute. Free to change: steps (extending a run; the cosine decay stretches to the new end),
# evaluation, logging, plots, progress, tensorboard, checkpoint cadence and keep, threads, device,
# max_bad_steps (when to give up, not what a step does), fp4_experts (DeepSeek-V4 switches FP4 QAT on late in
# training: a resume may turn it on; the FP32 master weights are the state either way), fp8_activation_cache (a
# memory choice: the forward is the same, wgrad's operand rounds once more or not), recompute (memory only: the
# same gradients bit for bit), paths (out, data, cache,
# tokenizer, config, init: what they hold is checked instead, by the model config and the sampler's token count)
# and the process layout (``training_state.check_layout`` compares it). The precision is compared as resolved ("auto" is
# what it resolved to: ``Trainer._resume``). grad_accum and micro_batches may change with the layout as long as a step
# trains on as many batches over its replicas (``batches_per_step`` x dp).
RESUME_KEEPS = ("seed", "preset", "batch_size", "seq_len", "ramp_steps", "lr", "min_lr_ratio",
                "warmup", "schedule", "weight_decay", "beta1", "beta2", "clip", "vocab_size",
                "fp8_dispatch", "optimizer", "indexer_train", "pack", "chat_template_kwargs", "fim_rate", "dpo",
                "dpo_beta")

MAX_LR = 1.0  # AdamW and Muon move each weight by about lr a step: past 1, one step outweighs the weights (~0.02)
MAX_KWARGS_DEPTH = 64  # chat_template_kwargs: far more than a template variable needs, far within Python's recursion
PATH_FIELDS = ("out", "config", "data", "data_cache", "tokenizer", "init")
NAME_MAX, PATH_MAX = 255, 4096  # bytes of a path's component and of a path (Linux): longer, stat() raises
MAX_COLLECTIVE_TIMEOUT_S = 7 * 86400  # a week; past ~2**31 ms it overflows the process group's C int

# free to change on a resume but changing what the remaining steps compute: the resume's log line names each change
RESUME_SWITCHES = ("fp4_experts", "fp8_activation_cache", "threads")

REFERENCE_FILES = "reference_files"  # a DPO run's state field: its reference's fingerprint (load.init_weight_files)

_FIELD_TYPES = {  # a TrainConfig annotation -> (does a value have it, its name in an error)
    bool: (lambda v: isinstance(v, bool), "true or false"),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    str: (lambda v: isinstance(v, (str, os.PathLike)), "a string"),
    dict: (lambda v: isinstance(v, dict), "an object"),
}


@dataclass
class TrainConfig:
    preset: str = "small"
    config: str | None = None  # TOML/JSON overriding model fields ([model]) and train fields ([train])
    steps: int = 130  # the default run: small preset, about five minutes on 2 cores
    batch_size: int = 8
    seq_len: int = 256
    grad_accum: int = 1
    # DeepSeek-V3's batch-size ramp: ramp_grad_accum micro-batches at step 1, growing linearly to grad_accum over
    # ramp_steps steps (``grad_accum_at``); the V3 report grows its batch 3072 -> 15360 over its first 469B tokens
    ramp_grad_accum: int | None = None
    ramp_steps: int = 0
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 15
    schedule: str = "cosine"
    weight_decay: float = 0.1
    optimizer: str = "adamw"  # or muon: DeepSeek-V4's (flyer.optim.muon), AdamW's lr and weight decay reused
    beta1: float = 0.9
    beta2: float = 0.95
    clip: float = 1.0
    precision: str = "auto"  # auto: bf16 where the device multiplies BF16 in hardware, else fp32
    out: str = "runs/flyer"
    resume: bool = False
    seed: int = 0
    eval_every: int = 25
    eval_batches: int = 8
    ckpt_every: int = 50
    keep: int = 3
    data: str | None = None  # None: the installed Shakespeare corpus
    data_cache: str | None = None  # tokenizer/shard cache (default ~/.cache/flyer/data)
    tokenizer: str | None = None
    init: str | None = None  # fine-tune from a flyer run / checkpoint or an HF model directory (its config, tokenizer)
    vocab_size: int | None = None  # default: the preset's vocab, capped at 8192 where flyer trains its BPE
    max_bad_steps: int = 10
    threads: int | None = None
    device: str = "auto"  # auto (CUDA when available), cpu, cuda or cuda:N; under torchrun: auto, cpu or cuda
    ep: int = 1
    pp: int = 1  # pipeline stages (ranks); the world is pp x data-parallel ranks
    pp_schedule: str = "1f1b"  # 1f1b, interleaved, zb (zero-bubble V) or dualpipev
    micro_batches: int | None = None  # per step with pp > 1 (default: the fewest the schedule runs)
    pp_overlap: bool = True  # dualpipev with ep > 1: paired forward and backward chunks run concurrently
    zero: int = 0  # 1: optimizer state sharded over the data-parallel ranks (ZeRO-1)
    ranks_per_node: int | None = None
    dispatcher: str = "hierarchical"
    fp8_dispatch: bool = False
    # --precision fp8: what backward keeps of an FP8 layer's input for wgrad (flyer.fp8.linear.FP8Recipe): "fp8" (the
    # forward's 1x128 tiles, DeepSeek-V3's FP8 activation cache) or "input" (the input in its working precision)
    fp8_activation_cache: str = "fp8"
    # "mla": DeepSeek-V3's recomputation of the MLA layers' latent norms and up-projections in backward
    # (flyer.model.recompute): their per-head q, k, v are not kept; the same gradients bit for bit
    recompute: str = "none"
    # DeepSeek-V4's FP4 QAT: routed experts multiply by their FP4 values (flyer.fp8.fp4), in training and validation;
    # each checkpoint's train_config records it, and inference loads that FP4 model (flyer.interop.load)
    fp4_experts: bool = False
    # DSA's lightning indexer trained by its KL loss (flyer.model.indexer_loss): off, warmup (dense attention, all
    # else frozen) or sparse (top-k attention, the indexer's input detached); a resumed run keeps it
    indexer_train: str = "off"
    collective_timeout_s: float = 300.0  # a rank that stops answering fails the others after this, not torch's 30 min
    plots: bool = True
    progress: bool = True
    tensorboard: bool | str = False  # True: scalars in OUT/tensorboard; a str: that directory
    # chat data: several whole conversations per seq_len-wide row, each attending to itself (flyer.data.chat_pack)
    pack: bool = False
    # chat data: variables the chat template sees (its extra, e.g. {"thinking": true}); a line's own override them
    chat_template_kwargs: dict | None = None
    # text data: share of train documents rewritten as fill-in-the-middle (PSM) before packing, each decided from
    # seed (flyer.data.fim; DeepSeek-V3 used 0.1); part of the data cache's key when above 0
    fim_rate: float = 0.0
    # Direct Preference Optimization (flyer.train.dpo) on preference pairs (flyer.data.pref_data): the reference is
    # init's weights, a resumed run's too (the same init, checked); dpo_beta the loss's temperature
    dpo: bool = False
    dpo_beta: float = 0.1

    def validate(self) -> None:
        def need(cond: bool, name: str, msg: str, also: tuple[str, ...] = ()) -> None:
            if not cond:  # the CLI words name and the fields of also as their flags
                raise FieldError(name, f"{msg} (got {getattr(self, name)!r})", also)

        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            wrong = self.type_problem(f.name, v)
            if wrong:
                raise FieldError(f.name, wrong)
            if isinstance(v, int) and not -(1 << 64) < v < 1 << 64:  # a config file's, as flyer.cli bounds a flag's
                raise FieldError(f.name, f"must be below 2**64 in magnitude (got a {len(str(abs(v)))}-digit number)")
        for name in PATH_FIELDS:  # "" would be the current directory (out, data_cache) or silently no path at all
            need(getattr(self, name) != "", name, "must be a path, not empty")
            path = os.fsencode(getattr(self, name) or "")
            need(b"\0" not in path, name, "must be a path, without a NUL character")  # a TOML string may hold one
            if len(path) >= PATH_MAX or max(map(len, path.split(b"/"))) > NAME_MAX:  # exists() would raise
                raise FieldError(name, f"names a path longer than the system allows ({PATH_MAX - 1} bytes, "
                                       f"{NAME_MAX} a component; got {len(path)} bytes)")
        need(0 <= self.seed < 2**64, "seed", "must be an integer in [0, 2**64)")  # torch.manual_seed's range
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_every", "eval_batches", "ckpt_every",
                     "keep", "max_bad_steps", "ep", "pp"):
            v = getattr(self, name)
            need(v > 0, name, "must be a positive integer")
        need(self.seq_len >= 2, "seq_len", "must be >= 2")
        need(0 < self.lr <= MAX_LR, "lr", f"must be in (0, {MAX_LR:g}]")
        need(1 <= self.collective_timeout_s <= MAX_COLLECTIVE_TIMEOUT_S, "collective_timeout_s",  # < 1 ms: 0 ms
             f"must be in [1, {MAX_COLLECTIVE_TIMEOUT_S}] seconds")
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            need(not isinstance(v, float) or math.isfinite(v), f.name, "must be a finite number")
        need(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        need(self.warmup >= 0, "warmup", "must be >= 0")
        need(self.schedule in SCHEDULES, "schedule", f"must be one of {', '.join(SCHEDULES)}")
        need(self.precision in PRECISIONS, "precision", f"must be one of {', '.join(PRECISIONS)}")
        need(self.fp8_activation_cache in ACTIVATION_CACHES, "fp8_activation_cache",
             f"must be one of {', '.join(ACTIVATION_CACHES)}")
        need(self.recompute in RECOMPUTE_MODES, "recompute", f"must be one of {', '.join(RECOMPUTE_MODES)}")
        need(self.dispatcher in DISPATCHER_KINDS, "dispatcher", f"must be one of {', '.join(DISPATCHER_KINDS)}")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(self.optimizer in OPTIMIZERS, "optimizer", f"must be one of {', '.join(OPTIMIZERS)}")
        need(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1", "betas must be in [0, 1)")
        need(self.clip > 0, "clip", "must be > 0")
        need(self.vocab_size is None or self.vocab_size >= MIN_VOCAB, "vocab_size",
             f"must be >= {MIN_VOCAB} (256 byte symbols and the end-of-text token)")
        need(self.vocab_size is None or self.vocab_size <= SIZE_LIMITS["vocab_size"], "vocab_size",
             f"must be <= {SIZE_LIMITS['vocab_size']} (a tokenizer trains toward it up front)")
        if self.threads is not None:
            check_threads(self.threads, "threads")
        need(self.ranks_per_node is None or self.ranks_per_node > 0, "ranks_per_node", "must be a positive integer")
        if self.ramp_grad_accum is not None:
            need(1 <= self.ramp_grad_accum < self.grad_accum, "ramp_grad_accum",
                 f"must be in [1, {{grad_accum}}) ({{grad_accum}} {self.grad_accum}: the batches a step when it ends)",
                 ("grad_accum",))
            need(self.ramp_steps > 0, "ramp_steps", "must be a positive integer with {ramp_grad_accum}",
                 ("ramp_grad_accum",))
            need(self.pp == 1, "ramp_grad_accum", "needs a step without pipelining (its micro-batches are fixed)")
        need(self.ramp_steps == 0 or self.ramp_grad_accum is not None, "ramp_steps", "needs {ramp_grad_accum}",
             ("ramp_grad_accum",))
        need(self.micro_batches is None or self.micro_batches > 0, "micro_batches", "must be a positive integer")
        need(self.micro_batches is None or self.pp > 1, "micro_batches", "needs pipelining ({pp} > 1); without "
                                                                          "it use {grad_accum}", ("pp", "grad_accum"))
        if self.dpo:
            need(bool(self.init), "dpo", "needs {init} (the reference model, and the policy's starting weights)",
                 ("init",))
            need(is_chat_data(self.data), "data", "dpo trains on preference pairs: a .jsonl file of {prompt, "
                                                  "chosen, rejected} lines")
            for name, off in (("pp", 1), ("ep", 1), ("pack", False), ("indexer_train", "off")):
                need(getattr(self, name) == off, name, "is not supported with {dpo}", ("dpo",))
        need(self.dpo_beta > 0, "dpo_beta", "must be > 0")
        need(not (self.init and self.tokenizer), "tokenizer", "is {init}'s own with {init} (a Hugging Face directory "
             "or flyer run brings its tokenizer): give one or the other", ("init",))
        if is_chat_data(self.data):  # flyer.data.chat_data
            need(bool(self.init or self.tokenizer), "data", "a .jsonl chat file needs {init} (a Hugging Face directory "
                 "or flyer run: its tokenizer and chat template; resuming a fine-tune, its {init} again or the run "
                 "itself) or {tokenizer} (a tokenizer.json; flyer's default chat template)", ("init", "tokenizer"))
        need(self.indexer_train in INDEXER_TRAIN_MODES, "indexer_train",
             f"must be one of {', '.join(INDEXER_TRAIN_MODES)}")
        if nesting_depth(self.chat_template_kwargs) > MAX_KWARGS_DEPTH:  # Python walks it level by level (asdict)
            raise FieldError("chat_template_kwargs", f"nests deeper than {MAX_KWARGS_DEPTH} levels")
        bad = [k for k in self.chat_template_kwargs or {} if not re.fullmatch(r"[A-Za-z_]\w*", str(k))]
        need(not bad, "chat_template_kwargs", f"keys must be template variable names ({bad[:1]})")
        need(not self.chat_template_kwargs or is_chat_data(self.data), "chat_template_kwargs",
             "renders chat data (a .jsonl file)")
        need(0 <= self.fim_rate <= 1, "fim_rate", "must be in [0, 1]")
        need(self.fim_rate == 0 or not is_chat_data(self.data), "fim_rate", "rewrites text documents as "
             "fill-in-the-middle; chat data (a .jsonl file) takes none")
        need(not self.pack or is_chat_data(self.data), "pack", "packs chat data (a .jsonl file); text data is "
             "already packed documents")
        need(self.pp_schedule in PP_SCHEDULES, "pp_schedule", f"must be one of {', '.join(PP_SCHEDULES)}")
        need(self.recompute == "none" or self.pp < 2 or self.pp_schedule not in SPLIT_SCHEDULES, "recompute",
             "is not taken with {pp_schedule} zb or dualpipev: their split weight backward would recompute each MLA "
             "layer once per parameter group (5 times); use 1f1b or interleaved", ("pp_schedule",))
        need(self.zero in (0, 1), "zero", "must be 0 or 1 (ZeRO-1: optimizer state sharded)")
        need(re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(self.device)) is not None, "device",
             "must be auto, cpu, cuda or cuda:N")
        need(isinstance(self.tensorboard, bool) or (isinstance(self.tensorboard, str) and self.tensorboard != ""),
             "tensorboard", "must be true, false or a directory")

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def type_problem(cls, name: str, value: Any) -> str | None:
        """None when ``value`` has field ``name``'s annotated type, else what was expected and got.
        bool is only a real boolean (and never an int); an int is a good float; a path may be a str."""
        hint = _type_hints(cls)[name]
        kinds = [t for t in typing.get_args(hint) or (hint,) if t is not type(None)]
        if value is None and len(kinds) < len(typing.get_args(hint)):
            return None
        if any(_FIELD_TYPES[t][0](value) for t in kinds):
            return None
        return f"expected {' or '.join(_FIELD_TYPES[t][1] for t in kinds)}, got {type(value).__name__} {value!r}"


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    """``typing.get_type_hints(cls)``, evaluated once per class: each takes a millisecond, and a validation asks for
    every field's (tens of ms per config, paid by every trainer a test builds)."""
    return typing.get_type_hints(cls)


def batches_per_step(grad_accum: int, micro_batches: int | None, pp: int, pp_schedule: str) -> int:
    """Batches each data-parallel replica draws a step: ``grad_accum`` times, under pipelining, its micro-batches
    (``micro_batches``, by default the fewest ``pp_schedule`` runs on ``pp`` ranks)."""
    return grad_accum * ((micro_batches or min_micro_batches(pp_schedule, pp)) if pp > 1 else 1)


def _batches_per_step(c: dict) -> int | None:
    """``batches_per_step`` of a saved train config (None for one saved without grad_accum)."""
    if not isinstance(c.get("grad_accum"), int) or c.get("pp_schedule") not in PP_SCHEDULES:
        return None
    return batches_per_step(c["grad_accum"], c.get("micro_batches"), c.get("pp") or 1, c["pp_schedule"])


def check_resume_settings(tc: TrainConfig, path: Path, dp: int = 1) -> None:
    """``FieldError`` naming the first of ``RESUME_KEEPS`` that ``tc`` sets otherwise than the run
    checkpointed at ``path`` did (the others that differ are listed), or the batches a step trains on over its
    ``dp`` data-parallel replicas (each ``batches_per_step``: grad_accum and micro_batches may trade places, and
    with the replicas, on another layout), before any work."""
    state = ckpt.saved_state(path)
    saved = state.get("train_config") or {}  # older checkpoints may lack it: nothing to compare
    # the preset names the model only without init (init's config is the model's): ignored by a run with one
    keeps = [k for k in RESUME_KEEPS if not (k == "preset" and (tc.init or saved.get("init")))]
    changed = [k for k in keeps if k in saved and saved[k] != getattr(tc, k)]
    was_dp = (state.get("layout") or {}).get("dp", dp)
    was, now = _batches_per_step(saved), batches_per_step(tc.grad_accum, tc.micro_batches, tc.pp, tc.pp_schedule)
    if was is not None and was * was_dp != now * dp:
        k = "micro_batches" if tc.pp > 1 and tc.grad_accum == saved["grad_accum"] else "grad_accum"
        if changed:
            changed.append(k)  # listed among the others
        else:
            raise FieldError(k, f"{now * dp} batches a step ({dp} data-parallel replicas x {now}: {{grad_accum}} x "
                                f"{{micro_batches}} under pipelining) differ from the run's {was * was_dp} ({was_dp} x "
                                f"{was}; checkpoint {path}); a resumed run trains each step on as many batches",
                             ("grad_accum", "micro_batches"))
    start = saved.get("ramp_grad_accum")  # a ramp's first step too
    # a ramp rounds each replica's micro-batches (grad_accum_at), and the v3 schedule counts them: another number of
    # replicas would train some steps on another total, and move the schedule's stages
    if start is not None and was_dp != dp and not changed:
        raise FieldError("ramp_grad_accum", f"a run with a batch-size ramp resumes with its {was_dp} data-parallel "
                                            f"replicas (this run has {dp}; checkpoint {path})")
    if "grad_accum" in saved and start != tc.ramp_grad_accum:
        if changed:
            changed.append("ramp_grad_accum")
        else:
            raise FieldError("ramp_grad_accum", f"{tc.ramp_grad_accum} differs from the run's {start} (checkpoint "
                                                f"{path}); a resumed run keeps its batch-size ramp")
    if tc.dpo and saved.get("init") and Path(saved["init"]).resolve() != Path(tc.init).resolve():
        changed.insert(0, "init")  # the DPO reference: init's weights, the same on resume
    if tc.dpo and not changed and saved_files(path) is not None:  # the same init: the same weights in it?
        now = {f: (size, mtime) for f, size, mtime in init_weight_files(tc.init)}
        was = {f: (size, mtime) for f, size, mtime in saved_files(path)}
        diff = sorted(set(now) ^ set(was)) or [f for f in sorted(now) if now[f] != was[f]]
        if diff:
            raise FieldError("init", f"{tc.init}'s weights changed since the run started ({diff[0]}: another "
                                     f"file, size or modification time; checkpoint {path}); a resumed DPO run "
                                     "needs the reference it started with")
    if changed:
        k, also = changed[0], f"; also changed: {', '.join(changed[1:])}" if changed[1:] else ""
        raise FieldError(k, f"{getattr(tc, k)} differs from the run's {k} {saved[k]}{also} (checkpoint {path}); "
                            "a resumed run keeps the settings it started with")


def check_resumed_run(path: Path, tc: TrainConfig, precision: str, fingerprints: dict[str, str]) -> None:
    """``FieldError`` naming what a run resuming from checkpoint ``path`` trains with otherwise than the checkpoint
    recorded: its precision as resolved (``precision``: "auto" set as what it resolved to is the same), its tokenizer
    or its training data (``fingerprints``: ``flyer.train.batches.run_fingerprints``; the same sizes in another order
    would pass the sampler's counts). A checkpoint saved before it recorded one has nothing to compare."""
    state = ckpt.saved_state(path)
    saved = state.get("precision") or (state.get("train_config") or {}).get("precision")  # resolved, else as set
    if saved not in (None, "auto", precision):
        raise FieldError("precision", f"{tc.precision} is {precision} here, but checkpoint {path} trained in {saved}; "
                                      "a resumed run keeps its precision (set it)")
    for field, what in (("tokenizer", "tokenizer"), ("data", "training data")):
        if (state.get("fingerprints") or {}).get(field, fingerprints[field]) != fingerprints[field]:
            raise FieldError(field, f"the run's {what} is not the one checkpoint {path} trained on (other tokens, "
                                    "or the same number in another order); a resumed run trains on what it started "
                                    "with")


def saved_files(path: Path) -> list | None:
    """The DPO reference's fingerprint (``load.init_weight_files``) the run checkpointed at ``path`` recorded, or None
    (not DPO, or saved before it was recorded: nothing to compare)."""
    return ckpt.saved_state(path).get(REFERENCE_FILES)


def carried_settings(start: Path | None, init: str | None) -> dict[str, bytes]:
    """The Hugging Face tokenizer and generation settings a run carries in its checkpoints
    (``checkpoint.settings_names``, name -> bytes): those of the checkpoint it resumes from ``start``,
    else of its ``init`` (an HF directory, or a run that carries them); none for flyer's own tokenizer."""
    if start is not None:
        return read_settings(start)
    src = settings_dir(init) if init else None
    return read_settings(src) if src is not None else {}


def tokenizer_settings(settings: dict[str, bytes], tok: Tokenizer, log) -> dict[str, bytes]:
    """``settings`` (``carried_settings``) as the run's checkpoints carry them: a tiktoken tokenizer's files (Kimi's)
    where they build ``tok``, the tokenizer the run trains with, its cut included (``tokenizer_copy.files_build``);
    else without them, said in ``log`` (the checkpoints then hold ``tok``'s tokenizer.json, which encodes long runs
    whole): a token added to ``tok`` (``ensure_eos``) or files changed since the data was encoded."""
    if TIKTOKEN_FILE not in settings:
        return settings
    try:
        same, why = files_build(settings, tok, CheckpointError), "they build another tokenizer"
    except CheckpointError as e:
        same, why = False, str(e)
    if same:
        return settings
    log(f"warning: the run's tokenizer is not its source's {TIKTOKEN_FILE} ({why}): its checkpoints hold a "
        "tokenizer.json, which encodes runs of characters past the source's cut whole")
    return {k: v for k, v in settings.items() if ckpt.is_settings_name(k)}


def grad_accum_at(tc: TrainConfig, step: int) -> int:
    """Micro-batches step ``step`` (1-based) trains on: ``ramp_grad_accum`` at step 1, growing linearly (rounded to
    the nearest) to ``grad_accum`` at step ``ramp_steps`` + 1 and after (without a ramp, every step)."""
    if tc.ramp_grad_accum is None or step > tc.ramp_steps:
        return tc.grad_accum
    return _ramp_at(tc.ramp_grad_accum, tc.grad_accum, tc.ramp_steps, step)


def _ramp_at(start: int, end: int, steps: int, step: int) -> int:
    """start + (end - start) (step - 1) / steps, rounded to the nearest (halves up), in integers."""
    return start + (2 * (end - start) * (step - 1) + steps) // (2 * steps)


def batches_through(tc: TrainConfig, step: int) -> int:
    """Micro-batches steps 1..``step`` train on together (each replica's; ``grad_accum_at``)."""
    if tc.ramp_grad_accum is None:
        return step * tc.grad_accum
    ramp = min(step, tc.ramp_steps)
    return _ramp_sums(tc.ramp_grad_accum, tc.grad_accum, tc.ramp_steps)[ramp] + (step - ramp) * tc.grad_accum


@functools.lru_cache(maxsize=4)
def _ramp_sums(start: int, end: int, steps: int) -> list[int]:
    """Micro-batches of a ramp's first k steps, k = 0..steps (``lr_at`` asks each step: counted once)."""
    return list(itertools.accumulate((_ramp_at(start, end, steps, s) for s in range(1, steps + 1)), initial=0))


def lr_at(tc: TrainConfig, step: int) -> float:
    """Linear warmup, then cosine decay to lr * min_lr_ratio (or constant, or "v3": DeepSeek-V3's stages at their
    shares of the run's tokens, ``V3_STAGES_T``: the share of its batches, which a batch-size ramp makes fewer in
    the first steps). ``step`` is 1-based."""
    if tc.warmup and step <= tc.warmup:
        return tc.lr * step / tc.warmup
    if tc.schedule == "constant":
        return tc.lr
    if tc.schedule == "v3":
        stable, decayed, final, total = V3_STAGES_T
        done = batches_through(tc, step) / batches_through(tc, tc.steps) * total  # trillions of V3's tokens
        if done <= stable:
            return tc.lr
        progress = min(1.0, (done - stable) / (decayed - stable))
        return _cosine(tc, progress) * (V3_FINAL_RATIO if done > final else 1.0)
    return _cosine(tc, (step - tc.warmup) / max(1, tc.steps - tc.warmup))


def _cosine(tc: TrainConfig, progress: float) -> float:
    """lr at ``progress`` (0 to 1, capped) of a cosine decay from lr to lr * min_lr_ratio."""
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))
