"""The trainer: data, model, AdamW, schedule, gradient accumulation, aux-loss-free bias updates,
MTP loss, evaluation, metrics, atomic checkpoints and exact resume; optional expert parallelism.

``Trainer(TrainConfig(...)).run()`` is the API; ``flyer train`` (``flyer.train.cli``) wraps it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from flyer.config import ConfigError, ModelConfig, resolve_config, resolve_device
from flyer.errors import TrainingError
from flyer.model.moe import moe_layers, update_router_bias
from flyer.model.transformer import Transformer
from flyer.runtime import PRECISIONS, autocast, precision_note, resolve_precision, tune_malloc
from flyer.train import checkpoint as ckpt
from flyer.train.metrics import MetricsLog, measure_gemm_peak, model_flops_per_token, read_metrics, truncate_metrics

SCHEDULES = ("cosine", "constant")
DISPATCHERS = ("local", "flat", "hierarchical")


@dataclass
class TrainConfig:
    preset: str = "small"
    config: str | None = None  # TOML/JSON overriding model fields ([model]) and train fields ([train])
    steps: int = 130  # the default run: small preset, about five minutes on 2 cores
    batch_size: int = 8
    seq_len: int = 256
    grad_accum: int = 1
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 15
    schedule: str = "cosine"
    weight_decay: float = 0.1
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
    vocab_size: int | None = None  # default: the preset's vocab, capped at 8192 for the built-in corpus
    max_bad_steps: int = 10
    threads: int | None = None
    device: str = "auto"  # auto (CUDA when available), cpu, cuda or cuda:N; under torchrun: auto, cpu or cuda
    ep: int = 1
    ranks_per_node: int | None = None
    dispatcher: str = "hierarchical"
    fp8_dispatch: bool = False
    plots: bool = True
    progress: bool = True

    def validate(self) -> None:
        def need(cond: bool, name: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"train option '{name}': {msg} (got {getattr(self, name)!r})")

        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_every", "eval_batches", "ckpt_every",
                     "keep", "max_bad_steps", "ep"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, name, "must be a positive integer")
        need(self.seq_len >= 2, "seq_len", "must be >= 2")
        need(self.lr > 0 and math.isfinite(self.lr), "lr", "must be a positive number")
        need(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        need(self.warmup >= 0, "warmup", "must be >= 0")
        need(self.schedule in SCHEDULES, "schedule", f"must be one of {', '.join(SCHEDULES)}")
        need(self.precision in PRECISIONS, "precision", f"must be one of {', '.join(PRECISIONS)}")
        need(self.dispatcher in DISPATCHERS, "dispatcher", f"must be one of {', '.join(DISPATCHERS)}")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1", "betas must be in [0, 1)")
        need(self.clip > 0, "clip", "must be > 0")
        need(self.vocab_size is None or self.vocab_size >= 256, "vocab_size", "must be >= 256 (byte-level BPE)")
        need(self.threads is None or self.threads > 0, "threads", "must be a positive integer")
        need(self.ranks_per_node is None or self.ranks_per_node > 0, "ranks_per_node", "must be a positive integer")
        need(re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(self.device)) is not None, "device",
             "must be auto, cpu, cuda or cuda:N")

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}


def lr_at(tc: TrainConfig, step: int) -> float:
    """Linear warmup, then cosine decay to lr * min_lr_ratio (or constant). ``step`` is 1-based."""
    if tc.warmup and step <= tc.warmup:
        return tc.lr * step / tc.warmup
    if tc.schedule == "constant":
        return tc.lr
    progress = (step - tc.warmup) / max(1, tc.steps - tc.warmup)
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class Trainer:
    def __init__(self, tc: TrainConfig, log=print):
        tc.validate()
        self.tc = tc
        self.log = log
        self.out = Path(tc.out)
        self.ckpt_root = self.out / "checkpoints"
        self.mesh = None
        self.step = 0
        self.bad_steps = 0
        self._setup()

    # ---- set-up -------------------------------------------------------------------------
    def _setup(self) -> None:
        tc = self.tc
        tune_malloc()  # process-wide: reuse freed activation blocks instead of faulting them in again
        if tc.threads:
            torch.set_num_threads(tc.threads)
        model_over, _ = self._file_overrides()  # a [train] table is merged into TrainConfig by the CLI
        base = resolve_config(tc.preset, None, model_over)
        self.mesh = self._init_distributed(base)
        self.device = self.mesh.device if self.mesh is not None else resolve_device(tc.device, "train option 'device'")
        self.rank0 = self.mesh is None or self.mesh.rank == 0
        self.precision = resolve_precision(tc.precision, self.device)
        note = precision_note(self.precision, self.device)
        if note and self.rank0:
            self.log(note)
        if self.rank0:
            self.out.mkdir(parents=True, exist_ok=True)
        from flyer.data import BatchSampler, eval_batches, prepare_data

        vocab = tc.vocab_size or (min(base.vocab_size, 8192) if tc.tokenizer is None else base.vocab_size)
        cache = Path(tc.data_cache) if tc.data_cache else Path.home() / ".cache" / "flyer" / "data"
        self.data = prepare_data(tc.data, cache, vocab_size=vocab, tokenizer=tc.tokenizer)
        self.cfg: ModelConfig = base.replace(vocab_size=self.data.vocab_size,
                                             max_seq_len=max(base.max_seq_len, tc.seq_len))
        self.cfg.validate()
        rank = self.mesh.rank if self.mesh else 0
        # Each data-parallel rank draws its own sample stream (seed, rank); deterministic on resume.
        self.sampler = BatchSampler(self.data.train, tc.batch_size, tc.seq_len, seed=tc.seed * 1000 + rank)
        self.eval_data = eval_batches(self.data.val, tc.batch_size, tc.seq_len, tc.eval_batches)

        torch.manual_seed(tc.seed)
        make_dispatcher = None
        if self.mesh is not None:
            from flyer.parallel.dispatch import dispatcher_factory

            make_dispatcher = dispatcher_factory(self.cfg, self.mesh, kind=tc.dispatcher, fp8=tc.fp8_dispatch)
        self.model = Transformer(self.cfg, make_dispatcher=make_dispatcher).to(self.device)
        if self.mesh is not None:
            from flyer.parallel.grads import init_like_single_process

            # every rank keeps its slice of exactly the single-process initialisation (a plain
            # seeded build would give every EP rank the same expert weights)
            init_like_single_process(self.model, self.mesh, tc.seed)
        if self.precision == "fp8":
            from flyer.fp8 import convert_to_fp8

            convert_to_fp8(self.model)
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=1e-8, fused=self.device.type in ("cpu", "cuda"))
        self.flops_per_token = model_flops_per_token(self.cfg, tc.seq_len)
        peak_dtype = torch.float32 if self.precision == "fp32" else torch.bfloat16
        self.peak_flops = measure_gemm_peak(peak_dtype, self.device)
        if tc.resume:
            self._resume()
        elif self.rank0 and ckpt.list_checkpoints(self.ckpt_root):
            raise ConfigError(f"{self.ckpt_root} already holds checkpoints: pass --resume to continue, "
                              f"or choose another --out")

    def _file_overrides(self) -> tuple[dict, dict]:
        """Model and train overrides from --config (see ``read_config_sections``)."""
        if not self.tc.config:
            return {}, {}
        from flyer.config import read_config_sections

        return read_config_sections(self.tc.config)

    def _init_distributed(self, cfg: ModelConfig):
        if self.tc.ep <= 1 and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return None
        from flyer.parallel.mesh import init_distributed

        return init_distributed(cfg, self.tc.ep, self.tc.ranks_per_node, device=self.tc.device)

    # ---- checkpoints ----------------------------------------------------------------------
    def _resume(self) -> None:
        ckpt.clean_temporaries(self.ckpt_root) if self.rank0 else None
        path = ckpt.find_valid_checkpoint(self.ckpt_root, log=self.log if self.rank0 else (lambda m: None))
        if path is None:
            if self.rank0:
                self.log(f"no valid checkpoint in {self.ckpt_root}: starting from step 0")
            return
        saved = ModelConfig.from_dict(json.loads((path / "config.json").read_text()))
        if saved != self.cfg:
            diff = [k for k, v in saved.to_dict().items() if self.cfg.to_dict()[k] != v]
            raise ckpt.CheckpointError(f"checkpoint {path} is from a different config (fields differ: {', '.join(diff)})")
        weights = ckpt.read_tensors(path / "model.safetensors")
        if self.mesh is not None:
            from flyer.parallel.grads import load_full_state_dict

            load_full_state_dict(self.model, weights, self.mesh)
        else:
            ckpt.load_model_weights(self.model, weights, f"checkpoint {path}")
        suffix = self._rank_suffix()
        state_path = path / f"state{suffix}.json"
        if not state_path.is_file():
            raise ckpt.CheckpointError(f"checkpoint {path} has no {state_path.name}: saved with another process layout")
        self.optimizer.load_state_dict(ckpt.read_torch(path / f"optimizer{suffix}.pt"))
        state = json.loads(state_path.read_text())
        self.sampler.load_state_dict(state["sampler"])
        self.step = int(state["step"])
        self.bad_steps = int(state.get("bad_steps", 0))
        rng = ckpt.read_tensors(path / f"rng{suffix}.safetensors")
        torch.set_rng_state(rng["torch_cpu"])
        if "torch_cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["torch_cuda"], self.device)
        if self.rank0:
            truncate_metrics(self.out / "metrics.jsonl", self.step)
            self.log(f"resumed from {path} at step {self.step}")

    def _rng_state(self) -> dict[str, torch.Tensor]:
        rng = {"torch_cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["torch_cuda"] = torch.cuda.get_rng_state(self.device)
        return rng

    def _rank_suffix(self) -> str:
        return "" if self.mesh is None else f"-rank{self.mesh.rank}"

    def save(self) -> Path | None:
        for p in self.model.parameters():  # a bad state is never checkpointed
            if not torch.isfinite(p).all():
                raise TrainingError(f"refusing to checkpoint step {self.step}: non-finite parameters")
        state = {"step": self.step, "sampler": self.sampler.state_dict(), "bad_steps": self.bad_steps,
                 "train_config": asdict(self.tc)}
        per_rank = {"optimizer": self.optimizer.state_dict(), "state": state,
                    "rng": self._rng_state()}
        if self.mesh is not None:
            import torch.distributed as dist

            from flyer.parallel.grads import full_state_dict

            weights = full_state_dict(self.model, self.mesh)
            gathered = [None] * self.mesh.world if self.rank0 else None
            dist.gather_object(per_rank, gathered, dst=0)
            ranks = list(enumerate(gathered)) if self.rank0 else []
        else:
            weights = self.model.state_dict()
            ranks = [(None, per_rank)]
        path = None
        if self.rank0:
            files: dict[str, Any] = {"model.safetensors": weights, "config.json": self.cfg.to_dict(),
                                     "tokenizer.json": json.loads(self.data.tokenizer.to_str())}
            for r, pr in ranks:
                sfx = "" if r is None else f"-rank{r}"
                files[f"optimizer{sfx}.pt"] = pr["optimizer"]
                files[f"state{sfx}.json"] = pr["state"]
                files[f"rng{sfx}.safetensors"] = pr["rng"]
            path = ckpt.save_checkpoint(self.ckpt_root, self.step, files, keep=self.tc.keep)
        if self.mesh is not None:
            import torch.distributed as dist

            dist.barrier()
        return path

    # ---- one optimizer step ---------------------------------------------------------------
    def _autocast(self):
        return autocast(self.precision, self.device)

    def _precision_label(self) -> str:
        if self.tc.precision != "auto":
            return self.precision
        why = "BF16 in hardware" if self.precision == "bf16" else "no BF16 matrix hardware on this device"
        return f"{self.precision} (auto: {why})"

    def _clip_grad_norm(self) -> torch.Tensor:
        """Global gradient norm (expert shards counted once over the EP group), then clip."""
        if self.mesh is None:
            return torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.grad is not None],
                                                  self.tc.clip)
        from flyer.parallel.grads import clip_grad_norm_

        return clip_grad_norm_(self.model, self.tc.clip, self.mesh)

    def train_step(self) -> dict[str, Any]:
        tc = self.tc
        self.model.train()
        lr = lr_at(tc, self.step + 1)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        t0 = time.perf_counter()
        sums = {"loss": 0.0, "main_loss": 0.0, "mtp_loss": 0.0, "aux_loss": 0.0}
        for _ in range(tc.grad_accum):
            x, y = self.sampler.next_batch()
            x, y = x.to(self.device), y.to(self.device)
            with self._autocast():
                out = self.model.compute_loss(x, y)
            (out.loss / tc.grad_accum).backward()
            sums["loss"] += out.loss.item() / tc.grad_accum
            sums["main_loss"] += out.main_loss.item() / tc.grad_accum
            if out.mtp_losses:
                sums["mtp_loss"] += torch.stack(out.mtp_losses).mean().item() / tc.grad_accum
            if out.aux_loss is not None:
                sums["aux_loss"] += out.aux_loss.item() / tc.grad_accum
        if self.mesh is not None:
            from flyer.parallel.grads import sync_gradients

            sync_gradients(self.model, self.mesh)
            sums = self._mean_over_ranks(sums)
        grad_norm = float(self._clip_grad_norm())
        loads = [m.tokens_per_expert.tolist() for m in moe_layers(self.model)]
        self.step += 1
        record: dict[str, Any] = {"step": self.step, **sums, "lr": lr, "grad_norm": grad_norm}
        if not (math.isfinite(sums["loss"]) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            for m in moe_layers(self.model):
                m.tokens_per_expert.zero_()
            self.bad_steps += 1
            self._consecutive_bad += 1
            record["skipped"] = True
            if self.rank0:
                self.log(f"warning: step {self.step}: non-finite loss or gradient norm; step skipped "
                         f"({self.bad_steps} skipped so far)")
            if self._consecutive_bad >= tc.max_bad_steps:
                raise TrainingError(f"{self._consecutive_bad} consecutive steps with non-finite loss or gradient "
                                    f"norm (last good checkpoint kept); lower --lr or check the data")
        else:
            self._consecutive_bad = 0
            group = None if self.mesh is None else self.mesh.world_group
            record.update(update_router_bias(self.model, group=group))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        world = 1 if self.mesh is None else self.mesh.world
        tokens = tc.batch_size * tc.seq_len * tc.grad_accum * world
        record.update(tokens_per_s=tokens / dt, step_time_s=dt, skipped_total=self.bad_steps,
                      mfu=self.flops_per_token * tokens / world / dt / self.peak_flops, expert_load=loads)
        if self.mesh is not None:
            from flyer.parallel.dispatch import comm_stats

            stats = comm_stats(self.model, reset=True, group=self.mesh.world_group)  # job totals
            record.update({k: v for k, v in stats.items() if not isinstance(v, list)})
        return record

    def _mean_over_ranks(self, sums: dict[str, float]) -> dict[str, float]:
        import torch.distributed as dist

        t = torch.tensor(list(sums.values()), dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return dict(zip(sums, (t / self.mesh.world).tolist()))

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        total = 0.0
        for x, y in self.eval_data:
            with self._autocast():
                total += self.model.compute_loss(x.to(self.device), y.to(self.device)).main_loss.item()
        self.model.train()
        loss = total / len(self.eval_data)
        if self.mesh is not None:
            from flyer.parallel.dispatch import comm_stats

            comm_stats(self.model, reset=True)  # evaluation traffic is not training traffic
            loss = self._mean_over_ranks({"v": loss})["v"]
        return loss

    # ---- the loop -----------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        tc = self.tc
        self._consecutive_bad = 0
        metrics = MetricsLog(self.out / "metrics.jsonl", enabled=self.rank0)
        if self.rank0:
            from flyer.model.counts import param_counts

            pc = param_counts(self.cfg)
            self.log(f"flyer train: preset {tc.preset}, {pc.total / 1e6:.1f}M params ({pc.activated / 1e6:.1f}M "
                     f"activated, MTP {pc.mtp / 1e6:.1f}M), {self._precision_label()}, batch {tc.batch_size}x{tc.seq_len}"
                     f"x{tc.grad_accum}, {len(self.data.train):,} train tokens, vocab {self.cfg.vocab_size}")
            self.log(f"unigram baseline (validation): {self.data.unigram_val_loss:.3f} nats/token")
        bar = None
        if self.rank0 and tc.progress:
            from tqdm import tqdm

            bar = tqdm(total=tc.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        val_loss = None
        try:
            while self.step < tc.steps:
                rec = self.train_step()
                if self.step % tc.eval_every == 0 or self.step == tc.steps:
                    val_loss = self.evaluate()
                    rec["val_loss"] = val_loss
                metrics.write(rec)
                if bar is not None:
                    bar.update(1)
                    post = {"loss": f"{rec['loss']:.3f}", "tok/s": f"{rec['tokens_per_s']:.0f}"}
                    if val_loss is not None:
                        post["val"] = f"{val_loss:.3f}"
                    bar.set_postfix(post)
                if self.step % tc.ckpt_every == 0 or self.step == tc.steps:
                    if self._consecutive_bad == 0:
                        self.save()
        finally:
            if bar is not None:
                bar.close()
            metrics.close()
        records = read_metrics(self.out / "metrics.jsonl") if self.rank0 else []
        if self.rank0 and tc.plots:
            from flyer.train.plots import plot_expert_load, plot_loss

            plot_loss(records, self.out / "loss.png", self.data.unigram_val_loss)
            plot_expert_load(records, self.out / "expert_load.png", n_mtp=self.cfg.mtp_depth)
        train_losses = [r["loss"] for r in records if r.get("loss") is not None and not r.get("skipped")]
        summary = {"steps": self.step, "final_loss": train_losses[-1] if train_losses else None,
                   "val_loss": val_loss, "unigram_val_loss": self.data.unigram_val_loss,
                   "skipped_steps": self.bad_steps, "out": str(self.out)}
        if self.rank0:
            if val_loss is not None:
                self.log(f"done: step {self.step}, validation loss {val_loss:.3f} vs unigram baseline "
                         f"{self.data.unigram_val_loss:.3f}; metrics {self.out / 'metrics.jsonl'}")
        if self.mesh is not None:
            from flyer.parallel.mesh import destroy

            destroy(self.mesh)
        return summary
