"""``flyer train``: the main job. Flags map onto ``TrainConfig`` fields; ``--config FILE`` (TOML)
may set model fields (top level or ``[model]``) and train fields (``[train]``); flags win."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from flyer.config import PRESETS, ConfigError, FieldError, preset_fields, read_config_sections
from flyer.errors import every_rank, print_error
from flyer.model.dispatch import DISPATCHER_KINDS
from flyer.parse import json_loads

_FLAGS = [  # (flag, field, type, help)
    ("--preset", "preset", str, f"model preset ({', '.join(PRESETS)})"),
    ("--config", "config", str, "TOML file overriding model fields ([model]) and train fields ([train]), "
                                "or a DeepSeek/HF config.json (model fields)"),
    ("--steps", "steps", int, "optimizer steps"),
    ("--batch-size", "batch_size", int, "sequences per micro-batch (per rank)"),
    ("--seq-len", "seq_len", int, "tokens per sequence"),
    ("--grad-accum", "grad_accum", int, "micro-batches per optimizer step"),
    ("--ramp-grad-accum", "ramp_grad_accum", int, "batch-size ramp (DeepSeek-V3's): micro-batches at step 1, growing "
                                                  "linearly to --grad-accum over --ramp-steps steps"),
    ("--ramp-steps", "ramp_steps", int, "steps of the batch-size ramp (with --ramp-grad-accum)"),
    ("--lr", "lr", float, "peak learning rate (in (0, 1])"),
    ("--warmup", "warmup", int, "linear warmup steps"),
    ("--schedule", "schedule", str, "cosine, constant or v3 (DeepSeek-V3's stages) after warmup"),
    ("--optimizer", "optimizer", str, "adamw, or muon: DeepSeek-V4's Muon for the matrices (AdamW for the embedding, "
                                      "head, norms and mHC biases/gates), reusing --lr and the weight decay"),
    ("--precision", "precision", str,
     "auto (bf16 where the device multiplies BF16 in hardware, else fp32), fp32, bf16 or fp8"),
    ("--fp8-activation-cache", "fp8_activation_cache", str,
     "with --precision fp8, what backward keeps of each FP8 layer's input for its weight gradient: fp8 (the "
     "forward's 1x128 tiles, re-tiled 128x1: DeepSeek-V3's, the default) or input (the input itself)"),
    ("--recompute", "recompute", str,
     "none, or mla: DeepSeek-V3's recomputation of each MLA layer's latent norms and up-projections in backward "
     "(their per-head queries, keys and values are not kept; the same gradients)"),
    ("--out", "out", str, "run directory (metrics, plots, checkpoints)"),
    ("--seed", "seed", int, "random seed (model init and data order)"),
    ("--eval-every", "eval_every", int, "validate every N steps"),
    ("--eval-batches", "eval_batches", int, "validation batches"),
    ("--ckpt-every", "ckpt_every", int, "checkpoint every N steps"),
    ("--keep", "keep", int, "checkpoints to keep (a resumed run: also the one it resumed from)"),
    ("--data", "data", str, "text file or directory (default: the installed Shakespeare corpus), or a .jsonl chat "
                            "file of {\"messages\": [{\"role\", \"content\"}, ...], \"tools\"} lines: fine-tunes on "
                            "the assistant turns only, rendered with --init's chat template (else flyer's default); "
                            "needs --init or --tokenizer"),
    ("--data-cache", "data_cache", str, "tokenizer and shard cache directory (default ~/.cache/flyer/data)"),
    ("--tokenizer", "tokenizer", str, "a tokenizer.json to use instead of training one"),
    ("--init", "init", str, "fine-tune from PATH: a flyer run or checkpoint, or a Hugging Face model directory "
                            "(its model config and tokenizer replace --preset and --tokenizer)"),
    ("--vocab-size", "vocab_size", int, "BPE vocabulary size to train"),
    ("--threads", "threads", int, "CPU threads (at most 4 per core)"),
    ("--device", "device", str, "auto (CUDA when available), cpu, cuda or cuda:N"),
    ("--ep", "ep", int, "expert-parallel degree (under torchrun)"),
    ("--pp", "pp", int, "pipeline-parallel stages (under torchrun; world = pp x data-parallel ranks)"),
    ("--pp-schedule", "pp_schedule", str, "1f1b, interleaved, zb (zero-bubble V) or dualpipev"),
    ("--micro-batches", "micro_batches", int, "micro-batches per step with --pp (default: the fewest the schedule "
                                              "runs)"),
    ("--zero", "zero", int, "1: shard the optimizer state over the data-parallel ranks (ZeRO-1)"),
    ("--ranks-per-node", "ranks_per_node", int, "ranks per node, to simulate several nodes on one machine"),
    ("--dispatcher", "dispatcher", str, f"{', '.join(DISPATCHER_KINDS)} (expert parallelism)"),
    ("--indexer-train", "indexer_train", str,
     "train the lightning indexers (DeepSeek-V3.2's DSA, V4's CSA layers) by their KL loss against the main "
     "attention: off (default: frozen), warmup (dense attention, every other parameter frozen) or sparse (top-k "
     "attention; the indexer learns from its loss only, the rest from the LM loss only); the metrics log "
     "indexer_loss. A resumed run keeps its mode: to go from warmup to sparse, start a new run with --init from the "
     "warm-up run"),
    ("--fim-rate", "fim_rate", float,
     "share of text documents (each decided by --seed) rewritten as fill-in-the-middle before packing: begin, "
     "prefix, hole, suffix, end, middle, with the tokenizer's FIM tokens as markers (PSM; DeepSeek-V3 used 0.1; "
     "default 0); flyer's own BPE gets DeepSeek's, a --tokenizer or --init one must hold them"),
    ("--dpo-beta", "dpo_beta", float, "--dpo's beta, the temperature of its loss (default 0.1)"),
    ("--collective-timeout", "collective_timeout_s", float,
     "seconds a collective may wait for a rank that stopped answering before the job fails (default 300)"),
]
ZERO_OK = {"warmup", "seed", "zero", "fim_rate"}  # numeric flags that may be 0 (flyer.cli: the others must be > 0)


def register(sub) -> None:
    p = sub.add_parser("train", help="train a DeepSeek-V3-style model (default: small preset on Shakespeare)",
                       description="Train a DeepSeek-V3-style model. Flags override --config "
                                   "(TOML, or a DeepSeek/HF config.json), which overrides defaults.")
    for flag, field, typ, help_ in _FLAGS:
        p.add_argument(flag, dest=field, type=typ, default=None, help=help_)
    p.add_argument("--resume", action="store_true", default=None,
                   help="continue from the newest valid checkpoint in --out")
    p.add_argument("--fp8-dispatch", dest="fp8_dispatch", action="store_true", default=None,
                   help="send the EP dispatch payload in FP8 (E4M3, per-128-channel scales), and in backward the "
                        "gradient that retraces its route (combine's); combine and its route back stay BF16")
    p.add_argument("--fp4-experts", dest="fp4_experts", action="store_true", default=None,
                   help="DeepSeek-V4's FP4 QAT: routed experts' GEMMs multiply by their FP4 values (E2M1, a power-of-"
                        "two scale per 32 inputs, from the FP32 master weights each step; gradients straight through), "
                        "the model `flyer generate`, `serve` and `export` (every --dtype) use")
    p.add_argument("--no-pp-overlap", dest="pp_overlap", action="store_false", default=None,
                   help="run DualPipeV's paired forward and backward chunks one after the other (default with "
                        "--ep > 1: concurrently, hiding the EP all-to-all)")
    p.add_argument("--pack", dest="pack", action="store_true", default=None,
                   help="chat data: pack several whole conversations into each --seq-len row, each attending only to "
                        "itself at positions from 0 (every model, DSA and DeepSeek-V4's too; under --pp too, where "
                        "rows are --seq-len wide)")
    p.add_argument("--chat-template-kwargs", dest="chat_template_kwargs", type=json_object, default=None,
                   metavar="JSON", help="chat data: an object of variables the chat template sees, e.g. "
                                        "'{\"thinking\": true}' (DeepSeek-V3.1 / V3.2 / V4's thinking mode) or "
                                        "'{\"enable_thinking\": false}' (Qwen3's); a line's own "
                                        "\"chat_template_kwargs\" override them for that line")
    p.add_argument("--dpo", dest="dpo", action="store_true", default=None,
                   help="Direct Preference Optimization (sigmoid loss) on --data, a .jsonl of TRL's preference pairs "
                        "({\"prompt\", \"chosen\", \"rejected\"}: message lists or strings) against a frozen "
                        "reference, --init's weights; --batch-size counts pairs; MTP modules are not trained; not "
                        "with --pp, --ep, --pack or --indexer-train; a pair longer than --seq-len is refused")
    p.add_argument("--no-plots", dest="plots", action="store_false", default=None, help="skip the PNG plots")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    p.config_defaults = _config_defaults
    p.add_argument("--tensorboard", nargs="?", const=True, default=None, metavar="DIR",
                   help="write per-step metrics as TensorBoard scalars to DIR (default: OUT/tensorboard); "
                        "needs the tensorboard package")
    p.set_defaults(func=run)


def _config_defaults() -> dict:
    """``TrainConfig``'s defaults, which the flags (None unless given) leave in place: shown by --help."""
    from flyer.train.config import TrainConfig  # the model stack: loaded for --help, not for every command

    return {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}


def json_object(text: str) -> dict:
    """``--chat-template-kwargs``' value: a JSON object (argparse words an error as one line naming the flag)."""
    try:
        value = json_loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({str(e).splitlines()[0]:.80})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {type(value).__name__}")
    return value


def build_train_config(args: argparse.Namespace):
    """The ``TrainConfig`` of ``flyer train`` args: defaults < --config's [train] table < flags."""
    from flyer.train.config import TrainConfig  # the model stack: loaded for training, not for every command

    values: dict = {}
    if args.config:
        _, train = read_config_sections(args.config)
        unknown = set(train) - TrainConfig.field_names()
        if unknown:
            raise ConfigError(f"unknown [train] field '{sorted(unknown)[0]}' in {args.config}")
        for name, v in train.items():  # a flag's type is argparse's; a file's is checked here, named as in the file
            wrong = TrainConfig.type_problem(name, v)
            if wrong:
                raise ConfigError(f"config field '{name}': {wrong} (in {args.config})")
        values.update(train)
    for f in dataclasses.fields(TrainConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    if values.get("preset") is not None:
        preset_fields(values["preset"])  # an unknown name fails here, before any data is prepared
    try:
        return TrainConfig(**values)  # validated once, by the Trainer that takes it
    except TypeError as e:
        raise ConfigError(str(e)) from None


def run(args: argparse.Namespace) -> int:
    from flyer.train.metrics import strict_record  # as in build_train_config
    from flyer.train.trainer import Trainer, TrainingError  # as in build_train_config

    try:
        tc = build_train_config(args)
        trainer = Trainer(tc, log=lambda m: print(m, file=sys.stderr, flush=True))
        summary = trainer.run()
    except TrainingError as e:
        print_error(str(e), e)
        return 2
    except FieldError as e:  # a value the config file set, no flag: named as in the file, not as a flag not given
        if args.config and getattr(args, e.field, None) is None and e.field in read_config_sections(args.config)[1]:
            problem = e.worded(e.field)[len(e.field) + 2:]  # its other fields by their names, as the file has them
            named = ConfigError(f"config field '{e.field}': {problem} (in {args.config})")
            raise (every_rank(named) if getattr(e, "every_rank", False) else named) from None
        raise
    if summary.get("signal"):
        return 128 + summary["signal"]  # the shell's convention for a process ended by that signal
    if summary.get("val_loss") is not None and trainer.rank0:  # one summary per job, not one per rank
        print(json.dumps(strict_record(summary), allow_nan=False))  # JSON has no NaN: read as JSON
    return 0


