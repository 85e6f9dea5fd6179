"""The trainer: schedule, gradient accumulation, aux-loss-free bias updates, MTP loss, evaluation,
metrics and the training loop, on a one-process or expert-parallel mesh (``flyer.parallel.mesh``).

``Trainer(TrainConfig(...)).run()`` is the API (``flyer.train.config`` holds ``TrainConfig``); ``flyer train``
(``flyer.train.cli``) wraps it. ``flyer.train.build``'s ``build_model`` and ``build_optimizer`` build what the
trainer trains; ``flyer.train.checkpoint`` saves and resumes it.

Besides ``metrics.jsonl`` and ``checkpoints/``, rank 0 writes ``memory.json`` after the first
optimizer step: every rank's measured bytes of parameters, gradients and optimizer state (lists by
global rank, the keys and numbers ``flyer plan --json`` computes for the same layout), and the layout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import signal
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from flyer.config import ConfigError, ModelConfig, check_indexer_train, read_config_sections, resolve_config
from flyer.interop.load import init_weight_files, load_init_weights
from flyer.data.chat_data import IGNORE_INDEX, is_chat_data
from flyer.data.shards import atomic_write
from flyer.model.counts import param_counts
from flyer.model.indexer_loss import clip_gradients, indexer_depths, real_queries, set_indexer_training
from flyer.errors import CheckpointError, FieldError, TrainingError, every_rank
from flyer.model.moe import counting_only, moe_layers, update_router_bias
from flyer.model.lowp import precision_note
from flyer.model.recompute import recompute_line
from flyer.parallel.dispatch import comm_stats
from flyer.parallel.mesh import collective_errors, init_mesh
from flyer.parallel.memory import KEYS as MEMORY_KEYS, measure_state_bytes
from flyer.parallel.pipeline import PipelineModel
from flyer.parallel.stages import check_indexer_stages, min_micro_batches, require_torch_for, validate_pipeline
from flyer.runtime import autocast, resolve_precision, tune_malloc
from flyer.train import checkpoint as ckpt
from flyer.train import training_state
from flyer.train.build import build_model, build_optimizer, check_fp4_experts, read_inputs, require_training_memory
from flyer.train.dpo import DpoObjective, dpo_flops_per_token, freeze_mtp, hold_reference
from flyer.train.expert_stats import expert_loads, router_stats
from flyer.train.config import (REFERENCE_FILES, RESUME_SWITCHES, TrainConfig, carried_settings, check_resume_settings,
                                check_resumed_run, grad_accum_at, lr_at, tokenizer_settings)
from flyer.train.batches import counts, draw, positions_run, prepare_run_data, run_fingerprints, samplers
from flyer.train.rundir import (LOCK_NAME, METRICS_NAME, RunLock, StopSignals, choose_start, new_paths, remove_new,
                                start_metrics, usable_dir)
from flyer.train.metrics import (MetricsLog, StepSums, TensorBoardLog, fastest_gemm, model_flops_per_token,
                                 progress_postfix, read_metrics, require_tensorboard, strict_record)

# ``Trainer.run``'s stop code for a log rank 0 could not write: past every signal's number
LOG_FAILED = 1 << 10


def _silent(_msg: str) -> None:
    pass


PLOTS = ("loss.png", "expert_load.png")  # drawn at a run's end (``Trainer._plots``)


class Trainer:
    """Trains ``tc`` (validated here): ``run()`` for the whole loop, or ``train_step()`` /
    ``evaluate()`` / ``save()`` one at a time. ``log``: one-line messages, called on rank 0 only."""

    def __init__(self, tc: TrainConfig, log=print):
        tc.validate()
        self.tc = tc
        self.out = Path(tc.out)
        self.ckpt_root = self.out / "checkpoints"
        self.tensorboard_dir = (self.out / "tensorboard" if tc.tensorboard is True
                                else Path(tc.tensorboard) if tc.tensorboard else None)
        self.step = 0
        self.bad_steps = 0  # skipped (non-finite) steps in the whole run
        self.consecutive_bad = 0  # skipped steps since the last good one; max_bad_steps of them end the run
        if self.tensorboard_dir is not None:
            require_tensorboard()  # before any work, on every rank
        tune_malloc()  # process-wide: reuse freed activation blocks instead of faulting them in again
        if tc.threads:
            torch.set_num_threads(tc.threads)
        model_over = read_config_sections(tc.config)[0] if tc.config else {}  # [train]: merged by the CLI
        init_cfg, init_tok = read_inputs(tc)  # before the run directory is made for nothing
        base = init_cfg or resolve_config(tc.preset, None, model_over)
        check_fp4_experts(tc.fp4_experts, base)  # before any work
        check_indexer_train(tc.indexer_train, base)
        self.micro_batches = tc.micro_batches or min_micro_batches(tc.pp_schedule, tc.pp)
        validate_pipeline(base, tc.pp, tc.pp_schedule, self.micro_batches, tc.grad_accum)  # before any work
        check_indexer_stages(base, tc.pp, tc.pp_schedule, tc.seq_len, tc.indexer_train)
        require_torch_for(tc.pp_schedule, tc.pp)
        self.mesh = init_mesh(base, tc.ep, tc.ranks_per_node, tc.device, what="device",
                              timeout_s=tc.collective_timeout_s, pp=tc.pp)
        self.lock: RunLock | None = None
        # what rank 0's start creates (the run directory, its lock, checkpoints/): taken away again if it is refused
        made = new_paths(self.out / LOCK_NAME, self.ckpt_root, *filter(None, [self.tensorboard_dir]))
        try:
            self._start(tc, log, base, init_cfg, init_tok)
        except BaseException:  # the run directory free again and the process group torn down, not left to exit
            if self.lock is not None:  # this process took the directory; before the lock goes, no other run has it
                remove_new(made)
            self.close()  # (a rank exiting with it held aborted: "terminate called without an active exception")
            with contextlib.suppress(Exception):  # the error that got here is the one to report
                self.mesh.destroy()
            raise

    def _start(self, tc: TrainConfig, log, base: ModelConfig, init_cfg: ModelConfig | None, init_tok) -> None:
        """The rest of ``__init__`` once the mesh exists: the run directory, data, model, optimizer and resume."""
        self.device = self.mesh.device
        self.rank0 = self.mesh.rank == 0
        self.log = log if self.rank0 else _silent
        self.resumed_from: Path | None = None
        self.unlogged: dict | None = None  # (``_resume``)
        self.stopped_by: int | None = None  # the signal that stopped run()
        self.settings: dict[str, bytes] = {}  # carried_settings (rank 0 writes the checkpoints)
        self.state_extra: dict[str, Any] = {}  # more of rank 0's state file (DPO: the reference's fingerprint)
        start, err = None, None
        if self.rank0:  # the run directory: owned by this job, and a fresh run or the continuation of one
            try:
                self.lock = RunLock(self.out)
                usable_dir(self.ckpt_root, "out")  # a file in its place would fail the first save, after training
                ckpt.check_step_names(self.ckpt_root)  # and one in a checkpoint's place, that checkpoint's save
                ckpt.restore_moved_aside(self.ckpt_root)  # by a crash while its step was saved again
                start = choose_start(self.out, tc.resume, self.log)
                if start is not None:
                    check_resume_settings(tc, start, self.mesh.dp)  # DPO: the reference's fingerprint too
                if tc.dpo:  # recorded at the start, before the reference is read (checked on resume)
                    self.state_extra = {REFERENCE_FILES: init_weight_files(tc.init)}
                self.settings = carried_settings(start, tc.init)
                if self.tensorboard_dir is not None:
                    usable_dir(self.tensorboard_dir, "tensorboard")
            except (ConfigError, CheckpointError) as e:
                err = e
        err, start = self.mesh.broadcast_object((err, start))
        if err is None:
            # each rank writing a part of a save (its experts', its ZeRO shard, a stage's first) tries, before any step
            writes = bool(tc.zero) or self.mesh.dp_rank < self.mesh.ep
            training_state.check_writers(self.ckpt_root, self.mesh, writes)
        if err is not None:
            raise every_rank(err)  # broadcast: every rank raises it, rank 0 says it
        self.precision = resolve_precision(tc.precision, self.device)
        note = precision_note(self.precision, self.device)
        if note:
            self.log(note)

        vocab = tc.vocab_size or (min(base.vocab_size, 8192) if tc.tokenizer is None else base.vocab_size)
        cache = Path(tc.data_cache) if tc.data_cache else Path.home() / ".cache" / "flyer" / "data"
        self.data = prepare_run_data(tc, cache, vocab, init_tok)
        # what a resumed run must train on again: the same tokens of the same text (``_resume``)
        self.fingerprints = run_fingerprints(self.data)
        if self.rank0:  # a tiktoken source's files stand for the tokenizer only where they build it
            self.settings = tokenizer_settings(self.settings, self.data.tokenizer, self.log)
        if init_cfg and self.data.vocab_size > init_cfg.vocab_size:
            raise FieldError("init", f"{tc.init}'s tokenizer has {self.data.vocab_size} tokens, "
                                     f"more than its model's vocab_size {init_cfg.vocab_size}")
        self.cfg: ModelConfig = base.replace(vocab_size=init_cfg.vocab_size if init_cfg else self.data.vocab_size,
                                             max_seq_len=max(base.max_seq_len, tc.seq_len))
        self.cfg.validate()
        if init_cfg and tc.seq_len > init_cfg.max_seq_len:  # its positions past the checkpoint's were never trained
            self.log(f"--seq-len {tc.seq_len} is past {tc.init}'s context of {init_cfg.max_seq_len} tokens: the run's "
                     f"model (and its export's max_position_embeddings) takes {tc.seq_len}, its RoPE unchanged"
                     + (f" ({init_cfg.rope_type} scaling, factor {init_cfg.rope_factor:g} of "
                        f"{init_cfg.original_seq_len})" if init_cfg.rope_factor > 1 else ""))
        require_training_memory(self.cfg, tc, self.precision, self.device, self.mesh.ep, self.mesh.pp)
        self.sampler, self.eval_data = samplers(tc, self.data, self.mesh.dp_rank, self.mesh.dp)
        if getattr(self.sampler, "cut", 0):
            self.log(f"{self.sampler.cut} of {self.data.train.n_conversations} training conversations are longer "
                     f"than seq_len+1 = {tc.seq_len + 1} tokens: their rows keep the first {tc.seq_len + 1}")

        stages = (tc.pp_schedule, tc.seq_len, tc.indexer_train) if tc.pp > 1 else None  # as PipelineModel splits
        self.model = build_model(self.cfg, self.mesh, self.precision, tc.seed, tc.dispatcher, tc.fp8_dispatch,
                                 stages=stages, fp4=tc.fp4_experts, fp8_activation_cache=tc.fp8_activation_cache,
                                 recompute=tc.recompute)
        self.pipeline: PipelineModel | None = None
        if self.mesh.pp > 1:  # this rank keeps its stages; the rest of the model is freed
            overlap = None if tc.pp_overlap else False  # None: where it applies (dualpipev, ep > 1)
            self.model = self.pipeline = PipelineModel(self.model, self.mesh, tc.pp_schedule, self.micro_batches,
                                                       tc.batch_size, tc.seq_len, overlap=overlap,
                                                       indexer_train=tc.indexer_train)
        if tc.init and start is None:  # a resumed run has its own weights
            load_init_weights(self.model, tc.init)
        set_indexer_training(self.model, tc.indexer_train)  # before the optimizer: warm-up freezes the rest
        if tc.recompute != "none":  # (after the indexers' training is set: a DSA layer training one keeps its own)
            self.log(recompute_line(self.model))
        self.dpo: DpoObjective | None = None
        if tc.dpo:  # the frozen reference, init's weights again (a resumed run's too); MTP untrained (flyer.train.dpo)
            freeze_mtp(self.model)
            reference = build_model(self.cfg, self.mesh, self.precision, tc.seed, tc.dispatcher, fp4=tc.fp4_experts)
            load_init_weights(reference, tc.init)
            hold_reference(reference, self.precision)  # bf16: its GEMM weights in BF16, the same outputs
            self.dpo = DpoObjective(reference, tc.dpo_beta)
        self.optimizer = build_optimizer(self.model, tc, self.mesh)
        self.memory_written = False  # memory.json: after the first optimizer step
        # of a row width; DPO: the policy's training and the reference's forward (flyer.train.dpo)
        self.flops_per_token = functools.cache(
            functools.partial(dpo_flops_per_token, self.cfg) if tc.dpo else
            functools.partial(model_flops_per_token, self.cfg, indexer_train=tc.indexer_train))
        peak_dtype = torch.float32 if self.precision == "fp32" else torch.bfloat16
        # MFU against the fastest GEMM the device offers at this precision (``peak_gemm`` names it)
        self.peak_flops, self.peak_gemm = fastest_gemm(peak_dtype, self.device)
        if start is not None:
            self._resume(Path(start))
        elif tc.resume:
            self.log(f"no checkpoint in {self.ckpt_root}: starting from step 0")
        if self.rank0:
            ckpt.clean_temporaries(self.ckpt_root)  # left by a process that died mid-write; we own the directory
            start_metrics(self.out, None if start is None else self.step, self.log, self.unlogged)

    def close(self) -> None:
        """Release the run directory (``run()`` does at its end)."""
        if self.lock is not None:
            self.lock.close()
            self.lock = None

    # ---- checkpoints (the format and the work: flyer.train.checkpoint) -------------------------
    def _resume(self, path: Path) -> None:
        state = training_state.load_training(  # check_resumed_run: before anything is read into memory
            path, model=self.model, optimizer=self.optimizer, sampler=self.sampler, mesh=self.mesh, cfg=self.cfg,
            layout=self.layout, check=lambda: check_resumed_run(path, self.tc, self.precision, self.fingerprints))
        self.step = int(state["step"])
        self.bad_steps = int(state.get("bad_steps", 0))
        self.consecutive_bad = int(state.get("consecutive_bad", 0))  # a stop saved during a run of skipped steps
        self.resumed_from = path
        # the step's record a full disk kept out of the log: written now
        self.unlogged = state["unlogged"] if isinstance(state.get("unlogged"), dict) else None
        changes = "".join(f"; {k} {a:g} -> {b:g}" for k, (a, b) in state["stage_changes"].items())
        was = state.get("layout") or self.layout  # another pipeline, expert or ZeRO layout loads the state whole
        changes += "".join(f"; {k} {was.get(k)} -> {v}" for k, v in self.layout.items() if was.get(k) != v)
        saved = state.get("train_config") or {}
        for k in RESUME_SWITCHES:  # free to change on a resume (the FP32 masters are the state) but said
            if k in saved and saved[k] != getattr(self.tc, k):
                changes += f"; {k} {saved[k]} -> {getattr(self.tc, k)}"
        steps = saved.get("steps")
        if isinstance(steps, int) and steps != self.tc.steps and self.tc.schedule != "constant":
            # the decay reaches its end at the new last step: the next step's rate moves at once
            n = self.step + 1
            old, new = lr_at(dataclasses.replace(self.tc, steps=steps), n), lr_at(self.tc, n)
            changes += f"; steps {steps} -> {self.tc.steps} (the learning rate of step {n}: {old:.3g} -> {new:.3g})"
        self.log(f"resumed from {path} at step {self.step}{changes}")

    def save(self, unlogged: dict | None = None) -> Path | None:
        """Checkpoint this step (every rank calls it); the directory on rank 0, None elsewhere. ``unlogged``: the
        step's metrics record the log could not take, kept in the state for the resume to write."""
        for p in self.model.parameters():  # a bad state is never checkpointed
            if not torch.isfinite(p).all():
                raise TrainingError(f"refusing to checkpoint step {self.step}: non-finite parameters")
        return training_state.save_training(self.ckpt_root, self.step, model=self.model, optimizer=self.optimizer,
                                  sampler=self.sampler, mesh=self.mesh, cfg=self.cfg, tokenizer=self.data.tokenizer,
                                  bad_steps=self.bad_steps, train_config=asdict(self.tc), layout=self.layout,
                                  keep=self.tc.keep, settings=self.settings,
                                  extra={**self.state_extra, "consecutive_bad": self.consecutive_bad,
                                         "fingerprints": self.fingerprints, "precision": self.precision,
                                         **({"unlogged": strict_record(unlogged)} if unlogged is not None else {})},
                                  protect=(self.resumed_from,) if self.resumed_from else ())

    # ---- one optimizer step ---------------------------------------------------------------
    def _autocast(self):
        return autocast(self.precision, self.device)

    def _precision_label(self) -> str:
        if self.tc.precision != "auto":
            return self.precision
        why = "BF16 in hardware" if self.precision == "bf16" else "no BF16 matrix hardware on this device"
        return f"{self.precision} (auto: {why})"

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over ``grad_accum`` micro-batches (skipped when the loss or gradient
        norm is not finite); returns its metrics record (``metrics.jsonl`` fields). ``tokens_per_s`` and ``mfu``
        count the row positions the job ran (chat data without a pipeline: each batch's rows trimmed to its longest,
        ``flyer.data.chat_sampler.row_width``, so padding up to seq_len is not counted; the padding to that width
        is)."""
        tc = self.tc
        self.model.train()
        lr = lr_at(tc, self.step + 1)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        t0 = time.perf_counter()
        sums = self._pipeline_step() if self.pipeline is not None else self._local_step()
        tokens, flops = sums.pop("tokens"), sums.pop("flops")  # the job's row positions run, and their FLOPs
        grad_norm, indexer_norm = clip_gradients(self.model, self.mesh.clip_grad_norm_, tc.clip, tc.indexer_train)
        loads = expert_loads(self.model, self.mesh, self.pipeline is not None)
        self.step += 1
        record: dict[str, Any] = {"step": self.step, **sums, "lr": lr, "grad_norm": grad_norm}
        if tc.ramp_grad_accum is not None:  # a batch-size ramp: the micro-batches this step trained on
            record["grad_accum"] = grad_accum_at(tc, self.step)
        if indexer_norm is not None:
            record["indexer_grad_norm"] = indexer_norm
            grad_norm = grad_norm if math.isfinite(indexer_norm) else math.nan  # a non-finite one skips the step too
        if not (math.isfinite(sums["loss"]) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            for m in moe_layers(self.model):
                m.tokens_per_expert.zero_()
            self.bad_steps += 1
            self.consecutive_bad += 1
            record["skipped"] = True
            self.log(f"warning: step {self.step}: non-finite loss or gradient norm; step skipped "
                     f"({self.bad_steps} skipped so far)")
            if self.consecutive_bad >= tc.max_bad_steps:
                raise self._non_finite_end()
        else:
            self.consecutive_bad = 0
            if tc.indexer_train == "warmup":  # nothing but the indexers changes, the router biases neither
                for m in moe_layers(self.model):
                    m.tokens_per_expert.zero_()
            else:
                # the counts are the job's already (expert_loads summed them over the replicas): no group
                record.update(router_stats(update_router_bias(self.model), self.model, self.mesh,
                                           self.pipeline is not None))
            self.optimizer.step()
            if not self.memory_written:  # gradients and optimizer state both exist only here
                self._write_memory()
            self.optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        world = self.mesh.world
        record.update(tokens_per_s=tokens / dt, step_time_s=dt, skipped_total=self.bad_steps,
                      mfu=flops / world / dt / self.peak_flops, expert_load=loads)
        if world > 1:  # one process sends nothing: no traffic fields
            # job totals: this rank's, then summed over the ranks (pipeline ranks hold unequal numbers of MoE layers:
            # a per-layer reduction over the world mismatched, e.g. DeepSeek-V4's 3 and 1 + MTP)
            stats = comm_stats(self.model, reset=True)
            sums = self.mesh.mean({k: float(v) for k, v in stats.items() if not isinstance(v, list)})
            record.update({k: round(v * world) for k, v in sums.items()})
        return record

    @property
    def layout(self) -> dict[str, Any]:
        """The process layout a checkpoint records (a resume may change it: ``training_state.check_layout``)."""
        m = self.mesh
        return {"world": m.world, "pp": m.pp, "dp": m.dp, "ep": m.ep, "zero": self.tc.zero if m.world > 1 else 0,
                "pp_schedule": self.tc.pp_schedule if m.pp > 1 else None}

    def _write_memory(self) -> None:
        """Write ``OUT/memory.json`` on rank 0 (a collective): every rank's measured bytes of
        parameters, gradients and optimizer state (``flyer.parallel.memory``), as lists by global
        rank under the keys ``flyer plan --json`` prints, with the layout."""
        self.memory_written = True
        every = self.mesh.gather_object(measure_state_bytes(self.model, self.optimizer))
        if every is None:
            return
        out: dict[str, Any] = {"layout": self.layout, "step": self.step}
        for k in MEMORY_KEYS:
            out[f"{k}_per_rank"] = [r[k] for r in every]
            out[f"max_{k}_per_rank"] = max(r[k] for r in every)
        try:  # a report: a path in its way (a directory, a full disk) is said, and training goes on
            atomic_write(self.out / "memory.json", [json.dumps(out, indent=1, sort_keys=True).encode()])
        except OSError as e:
            self.log(f"warning: cannot write {self.out / 'memory.json'} ({e.strerror or e})")

    @property
    def micro_batches_per_step(self) -> int:
        """Micro-batches a step runs through the pipeline (1 without one; grad_accum counts apart)."""
        return self.micro_batches if self.pipeline is not None else 1

    def _local_step(self) -> dict[str, float]:
        """Forward and backward of ``grad_accum`` micro-batches (``grad_accum_at`` the step) on the whole model,
        gradients synced. The
        next-token loss and each MTP loss are means over the step's trained targets (not ``IGNORE_INDEX``) on
        every replica: the micro-batches are drawn first, their target counts summed over the job, and each
        micro-batch's mean weighted by its share; the balance loss (a mean over sequences, packed: documents) and the
        indexers' L_I (over real query positions) by each micro-batch's share of the job's sequences and real
        positions (equal shares, 1 / grad_accum, bit for bit as a plain average where all are alike). Also the job's
        ``tokens`` (row positions run: a trimmed chat row's width, its padding to the batch's longest row included;
        packed rows: their conversations' positions) and their training ``flops`` (attention's at each micro-batch's
        width; packed: at each conversation's length)."""
        tc = self.tc
        n = grad_accum_at(tc, self.step + 1)  # this step's micro-batches (a batch-size ramp's fewer)
        if self.dpo is not None:  # preference pairs: the DPO loss (flyer.train.dpo)
            return self.dpo.step(self.model, draw(self.sampler, n), self.mesh, self._autocast, self.flops_per_token)
        # indexer_loss: the indexers' L_I, their mean (each trains on its own: summed in loss)
        sums = StepSums("loss", "main_loss", "mtp_loss", "aux_loss",
                        *(("indexer_loss",) if tc.indexer_train != "off" else ()))
        batches = draw(self.sampler, n)
        # targets of depth 0 (next token, y) and k (MTP module k's, y[:, k:]); the balance loss is a mean over
        # sequences (packed: documents), L_I over real queries (MTP module k's: the positions reading tokens k..T-1;
        # packed: those i with i + k in i's document, ``depth_queries``): counted
        counted = [counts(b, self.cfg.mtp_depth) for b in batches]
        # per replica: the job's mean count, as sync_gradients averages the replicas' gradients (dp == world here)
        totals = self.mesh.mean({k: sum(c[k] for c in counted) for k in counted[0]})
        for (x, y, d), c in zip(batches, counted):
            valid = x >= 0  # chat rows pad with PAD_ID (flyer.data.chat_data): token 0, in no routing statistic
            d = None if d is None else d.to(self.device)
            padded = None if bool(valid.all()) else valid.to(self.device)  # L_I: over real queries only
            with self._autocast(), counting_only(self.model, None if d is not None else padded, d), \
                    real_queries(self.model, padded):
                out = self.model.compute_loss(x.clamp(min=0).to(self.device), y.to(self.device), d)
            terms = [loss_k * (c[str(k)] / totals[str(k)]) if c[str(k)] else loss_k.nan_to_num(0.0) * 0.0  # nan: none
                     for k, loss_k in enumerate([out.main_loss, *out.mtp_losses])]
            loss = terms[0] + (self.cfg.mtp_loss_weight * torch.stack(terms[1:]).mean() if terms[1:] else 0.0)
            # each micro-batch's mean weighted by its share of the job's sequences / queries: n times the share
            # is exactly 1.0 where every micro-batch and replica has as many (rows; text data)
            if out.aux_loss is not None:
                share = c["seqs"] * n / totals["seqs"]
                loss = loss + out.aux_loss * share / n
                sums.add("aux_loss", out.aux_loss, share / n)
            if out.indexer_losses:
                share = [c[f"q{k}"] * n / totals[f"q{k}"] if c[f"q{k}"] else 0.0 for k in indexer_depths(self.model)]
                kl = torch.stack(out.indexer_losses) * torch.tensor(share, device=self.device)
                loss = loss + kl.sum() / n
                sums.add("indexer_loss", kl.mean(), 1 / n)
            loss.backward()
            sums.add("loss", loss)
            sums.add("main_loss", terms[0])
            if terms[1:]:
                sums.add("mtp_loss", torch.stack(terms[1:]).mean())
        self.mesh.sync_gradients(self.model)
        tokens, flops = positions_run(batches, self.flops_per_token)
        sums = self.mesh.mean({**sums.floats(), "tokens": tokens, "flops": flops})
        return {**sums, "tokens": sums["tokens"] * self.mesh.world, "flops": sums["flops"] * self.mesh.world}

    def _pipeline_step(self) -> dict[str, float]:
        """Forward and backward of ``micro_batches`` micro-batches through the pipeline schedule,
        gradients synced (replicas, then the embedding's mirror); loss terms of the whole job. Chat data: each
        micro-batch's means weighted by its share of the step's trained targets, counted as ``_local_step`` does
        (packed rows: their document ids to every stage, each micro-batch's balance loss weighted by its share of the
        step's documents, tokens and FLOPs the conversations')."""
        batches = draw(self.sampler, self.micro_batches)
        x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        d = torch.cat([b[2] for b in batches]) if self.tc.pack else None  # packed rows' document ids
        totals = documents = query_totals = None
        if is_chat_data(self.tc.data):  # every rank's mean is the replicas': a replica's stages draw one batch
            # targets, real queries (the indexers' L_I) and packed rows' documents (the balance loss), as _local_step
            mean = self.mesh.mean(counts((x, y, d), self.cfg.mtp_depth))
            depths = range(self.cfg.mtp_depth + 1)
            totals, query_totals = [mean[str(k)] for k in depths], [mean[f"q{k}"] for k in depths]
            documents = mean["seqs"] if d is not None else None
        with self._autocast():
            terms = self.pipeline.train_step(x.to(self.device), y.to(self.device), totals,
                                             None if d is None else d.to(self.device), documents, query_totals)
        self.mesh.sync_gradients(self.model)
        self.pipeline.sync_mirrors()
        tokens, flops = positions_run([(x, y, d)], self.flops_per_token, self.tc.seq_len)  # the stages' row width
        # each term lives on the stage computing it (aux: a share on every stage): sum over ranks / replicas
        mean = self.mesh.mean({**terms, "tokens": float(tokens), "flops": flops})
        terms = {k: mean[k] * self.mesh.pp for k in terms}
        loss = terms["main_loss"] + self.cfg.mtp_loss_weight * terms["mtp_loss"] + terms["aux_loss"]
        layers, kl = terms.pop("indexer_layers"), terms.pop("indexer_loss")  # the job's trained indexers' L_I
        if layers:  # their sum joins the loss, their mean is logged (as ``_local_step``'s)
            loss, terms["indexer_loss"] = loss + kl, kl / layers
        return {"loss": loss, **terms, "tokens": mean["tokens"] * self.mesh.dp, "flops": mean["flops"] * self.mesh.dp}

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean next-token (main) loss over the validation batches, averaged over ranks (DPO: the DPO loss)."""
        if self.dpo is not None:
            return self.dpo.evaluate(self.model, self.eval_data, self.mesh, self._autocast)
        self.model.eval()
        total, count = 0.0, 0  # weighted by each batch's trained targets (chat data: assistant tokens)
        for x, y, *docs in self.eval_data:  # packed rows: their document ids too
            n = int((y != IGNORE_INDEX).sum())
            x, y = x.clamp(min=0).to(self.device), y.to(self.device)  # chat rows' padding (PAD_ID): no target
            d = docs[0].to(self.device) if docs else None
            with self._autocast():
                total += n * (self.pipeline.forward_loss(x, y, d) if self.pipeline is not None else
                              self.model.compute_loss(x, y, d).main_loss.item())
            count += n
        self.model.train()
        comm_stats(self.model, reset=True)  # evaluation traffic is not training traffic
        return self.mesh.mean({"v": total / count})["v"] * self.mesh.pp  # one stage has it

    # ---- the loop -----------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Train to ``tc.steps`` (validating, logging and checkpointing on the way); returns a
        summary: steps, final_loss (the objective), final_main_loss (its next-token term), val_loss,
        unigram_val_loss (DPO: reference_val_loss, ln 2), skipped_steps, out, and ``signal``
        (its number) when SIGTERM, SIGINT or SIGHUP stopped the run after checkpointing its last step."""
        with StopSignals() as stop:  # to the end: a signal after the last step's check lets the run finish
            return self._run(stop)

    def _run(self, stop: StopSignals) -> dict[str, Any]:
        tc = self.tc
        if self.step >= tc.steps:
            self.log(f"the run in {self.out} is already at step {self.step} (steps {tc.steps}): nothing to do")
            if not all((self.out / name).exists() for name in PLOTS):  # a stop after the last step left them undrawn
                self._plots()
            self.close()
            self.mesh.destroy()
            return {"steps": self.step, "final_loss": None, "val_loss": None, "out": str(self.out)}
        pc = param_counts(self.cfg)
        model = f"init {tc.init}" if tc.init else f"preset {tc.preset}"  # --init's config, not the preset's
        ramp = f" (from x{tc.ramp_grad_accum} over {tc.ramp_steps} steps)" if tc.ramp_grad_accum is not None else ""
        self.log(f"flyer train: {model}, {pc.total / 1e6:.1f}M params ({pc.activated / 1e6:.1f}M "
                 f"activated, MTP {pc.mtp / 1e6:.1f}M), {self._precision_label()}, batch {tc.batch_size}x{tc.seq_len}"
                 f"x{tc.grad_accum * self.micro_batches_per_step}{ramp}, {len(self.data.train):,} train tokens, "
                 f"vocab {self.cfg.vocab_size}")
        m = self.mesh
        if m.world > 1:  # how torchrun's ranks were mapped (nodes from LOCAL_WORLD_SIZE or --ranks-per-node)
            pipe = f", {tc.pp_schedule} over {self.micro_batches} micro-batches" if self.pipeline is not None else ""
            self.log(f"layout: {m.world} ranks on {m.n_nodes} node(s) of {m.ranks_per_node}: PP {m.pp} x DP {m.dp}, "
                     f"EP {m.ep}{pipe}")
        self.log(f"{self.data.baseline} {self.data.unigram_val_loss:.3f}")
        self.log(f"mfu: against {self.peak_gemm}, {self.peak_flops / 1e9:,.0f} GFLOP/s here")
        logs = [MetricsLog(self.out / "metrics.jsonl", enabled=self.rank0)]
        if self.tensorboard_dir is not None:
            logs.append(TensorBoardLog(self.tensorboard_dir, enabled=self.rank0, purge_step=self.step + 1))
        bar = None
        if self.rank0 and tc.progress:
            bar = tqdm(total=tc.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        val_loss, owed = None, False  # owed: a checkpoint due at a skipped step
        try:
            with collective_errors(self.mesh, tc.collective_timeout_s, lambda: self.step):
                while self.step < tc.steps and not self.stopped_by:
                    rec = self.train_step()
                    if self.step % tc.eval_every == 0 or self.step == tc.steps:
                        val_loss = self.evaluate()
                        rec["val_loss"] = val_loss
                    unwritten = None
                    try:
                        for log in logs:
                            log.write(rec)
                    except OSError as e:  # a full disk, an unwritable log: the step reached is saved, then the end
                        unwritten = e
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(progress_postfix(rec, val_loss))
                    # every rank stops together: on a signal, or on a log that rank 0 could not write (said even
                    # when a signal came too: the disk needs seeing to before a resume)
                    stop_code = self.mesh.max_int(LOG_FAILED if unwritten else stop.signum or 0)
                    self.stopped_by = stop_code if 0 < stop_code < LOG_FAILED else None
                    due = self.step % tc.ckpt_every == 0 or self.step == tc.steps or stop_code or owed
                    # after a skipped step the weights and optimizer are the last good step's: a stop saves them (the
                    # count of skipped steps with them), so no good step is lost; on schedule, the next good step does
                    saving = due and (self.consecutive_bad == 0 or stop_code)  # alike on every rank: save is collective
                    saved, owed = self.save(rec if unwritten else None) if saving else None, due and not saving
                    if stop_code >= LOG_FAILED:
                        why = f" ({unwritten.strerror or unwritten})" if unwritten is not None else ""
                        raise TrainingError(f"cannot write the run's logs after step {self.step}{why}; " + (
                            f"checkpoint {saved} saved: free space or fix them, then resume" if saved is not None
                            else "the step is not saved (non-finite)"))
                    if self.stopped_by:
                        self._say_stopped(saved)
        except BaseException:
            self.close()  # the run directory free again for the next run, in this process too
            raise
        finally:
            if bar is not None:
                bar.close()
            for log in logs:
                log.close()
        if self.stopped_by:
            self.close()
            self.mesh.destroy()
            return {"steps": self.step, "final_loss": None, "val_loss": None, "out": str(self.out),
                    "signal": self.stopped_by}
        if self.consecutive_bad:  # the last steps were skipped: the step reached has no checkpoint, nor a result
            self.close()
            raise self._non_finite_end()
        records = self._plots()
        last = next((r for r in reversed(records) if r.get("loss") is not None and not r.get("skipped")), {})
        # final_loss: the objective trained (next-token, MTP and balance terms); final_main_loss: its next-token
        # term, which val_loss and the unigram baseline measure too
        summary = {"steps": self.step, "final_loss": last.get("loss"), "final_main_loss": last.get("main_loss"),
                   "val_loss": val_loss,  # beside its baseline: DPO's is the reference's loss, ln 2
                   "reference_val_loss" if self.dpo else "unigram_val_loss": self.data.unigram_val_loss,
                   "skipped_steps": self.bad_steps, "out": str(self.out)}
        if stop.signum:  # after the last step's check: that step is saved, and the run is complete
            self.log(f"{signal.Signals(stop.signum).name}: received after the last step; the run is complete")
        if val_loss is not None:
            self.log(f"done: step {self.step}, validation loss {val_loss:.3f} vs {self.data.baseline} "
                     f"{self.data.unigram_val_loss:.3f}; metrics {self.out / 'metrics.jsonl'}")
        self.close()
        self.mesh.destroy()
        return summary

    def _plots(self) -> list[dict]:
        """The run's metrics records (rank 0; [] elsewhere), drawn as ``PLOTS`` where ``plots`` is set. The run is
        complete and saved by then: a plot that cannot be written or drawn (a record damaged inside) is said, not an
        error."""
        records = read_metrics(self.out / METRICS_NAME) if self.rank0 else []
        if self.rank0 and self.tc.plots:
            from flyer.train.plots import plot_expert_load, plot_loss  # matplotlib: heavy, only when plotting

            try:
                plot_loss(records, self.out / PLOTS[0], self.data.unigram_val_loss)
                plot_expert_load(records, self.out / PLOTS[1], n_mtp=self.cfg.mtp_depth)
            except OSError as e:
                self.log(f"warning: cannot write the plots in {self.out} ({e.strerror or e})")
            except (KeyError, TypeError, ValueError) as e:  # a record damaged inside (an expert_load row cut short)
                self.log(f"warning: cannot draw the plots from {self.out / METRICS_NAME}: a damaged record "
                         f"({type(e).__name__}: {e})")
        return records

    def _non_finite_end(self) -> TrainingError:
        """The error that ends a run on ``consecutive_bad`` skipped steps: ``max_bad_steps`` of them, or its last."""
        last = ckpt.newest_valid_checkpoint(self.ckpt_root)[0] if self.rank0 else None
        kept = f"the last checkpoint is {last.name}" if last else "no checkpoint was written"
        return every_rank(TrainingError(f"{self.consecutive_bad} consecutive steps with non-finite loss or gradient "
                                        f"norm up to step {self.step}, which is not checkpointed ({kept}); lower the "
                                        "learning rate or check the data"))  # the ranks' loss is one: rank 0 says it

    def _say_stopped(self, saved: Path | None) -> None:
        name = signal.Signals(self.stopped_by).name
        if saved is not None or not self.rank0:
            self.log(f"{name}: stopped after step {self.step}; checkpoint {saved} saved (continue with --resume)")
            return
        last = ckpt.newest_valid_checkpoint(self.ckpt_root)[0]
        self.log(f"{name}: stopped after step {self.step}, which is not saved (non-finite); "
                 + (f"the last checkpoint is {last}" if last else "no checkpoint was written"))
