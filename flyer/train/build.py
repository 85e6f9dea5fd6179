"""What the trainer trains: the model as one rank holds it (``build_model``), its optimizer (``build_optimizer``),
and a lower bound on one rank's training memory (``training_memory_bytes``, which the trainer checks before
allocating, ``require_training_memory``, and ``flyer plan`` reports)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from flyer.config import ModelConfig
from flyer.fp8 import FP8Recipe, convert_to_fp8
from flyer.data import eval_batches_bytes
from flyer.data.chat_pack import PACKED_TENSORS
from flyer.data.sampler import TEXT_TENSORS
from flyer.errors import CheckpointError, ConfigError, FieldError
from flyer.fp8.fp4 import FP4_GROUP, fp4_experts
from flyer.interop.load import init_source
from flyer.model.counts import indexer_param_total, param_counts, routed_expert_params
from flyer.model.dispatch import match_wire_scales
from flyer.model.recompute import set_recompute
from flyer.model.transformer import Transformer
from flyer.optim.muon import muon_param_ids, optimizer_class, optimizer_groups
from flyer.parallel.dispatch import dispatcher_factory
from flyer.parallel.memory import activation_bytes
from flyer.parallel.mesh import LocalMesh, Mesh
from flyer.parallel.stages import held_modules
from flyer.parallel.zero import ShardedOptimizer
from flyer.runtime import require_memory
from flyer.train.config import TrainConfig
from flyer.train.dpo import reference_bytes


def training_memory_bytes(cfg: ModelConfig, tc: TrainConfig, precision: str, ep: int = 1, pp: int = 1) -> float:
    """A lower bound on one rank's training memory: FP32 weights of the model and its MTP modules (routed experts
    split over ``ep``, the rest over ``pp`` stages), gradients and the optimizer's moments (AdamW two, Muon at
    least one) of those that train (``tc.indexer_train``: DSA indexers frozen, or trained alone in the warm-up),
    and what one micro-batch saves for backward: every block's saved activations and its routed experts' GEMM
    weights (``flyer.parallel.memory.activation_bytes``, the whole batch through the whole model: a pipeline holds
    about ``pp`` micro-batches of its 1/pp of the layers), and what the main and MTP heads' losses keep. DPO
    (``tc.dpo``) adds its frozen reference's weights as held (``flyer.train.dpo.reference_bytes``: FP32, the GEMM
    weights BF16 under bf16; DPO runs with ep = pp = 1); the reference's forward (no gradients) runs before the
    policy's in each micro-batch, so its transient activations are freed before the policy saves any and add
    nothing to the peak; the policy's MTP modules are frozen and never run (``flyer.train.dpo``): weights only.
    Attention scores and allocator slack come on top."""

    def held(c: ModelConfig) -> float:  # this rank's parameters of ``c``
        pc, routed = param_counts(c), routed_expert_params(c)
        return (pc.total + pc.mtp - routed + routed / ep) / pp

    run = cfg.replace(mtp_depth=0) if tc.dpo else cfg  # what runs and may train
    params, live, indexers = held(cfg), held(run), indexer_param_total(run) / pp
    trained = {"off": live - indexers, "sparse": live, "warmup": indexers}[tc.indexer_train]
    saved = activation_bytes(run, 1, 0, "1f1b", tc.seq_len, tc.batch_size, precision, ep, tc.recompute,
                             tc.fp8_activation_cache, tc.indexer_train, tc.pack)
    per_param = 16 if tc.optimizer == "adamw" else 12  # 4 of them the weight's
    reference = reference_bytes(cfg, precision, tc.fp4_experts) if tc.dpo else 0
    return 4 * params + (per_param - 4) * trained + reference + saved


def require_training_memory(cfg: ModelConfig, tc: TrainConfig, precision: str, device: torch.device, ep: int,
                            pp: int) -> None:
    """Refuse, before allocating, a run whose training state or validation batches cannot fit,
    blaming the setting that overflows first: the model alone, one sequence, the batch, then the
    validation batches (host memory, shared with training on a CPU device)."""
    params = f"training {param_counts(cfg).total / 1e6:,.1f}M parameters"
    params += " beside a frozen reference copy (DPO)" if tc.dpo else ""
    for field, batch in (("init" if tc.init else "preset", 0), ("seq_len", 1), ("batch_size", tc.batch_size)):
        need = training_memory_bytes(cfg, dataclasses.replace(tc, batch_size=batch), precision, ep, pp)
        require_memory(need, device, field, f"{params} at batch {batch} x {tc.seq_len}" if batch else params)
    evals = f"{tc.eval_batches:,} validation batches of {tc.batch_size} x {tc.seq_len}"
    on_host = device.type == "cpu"
    tensors = PACKED_TENSORS if tc.pack else TEXT_TENSORS  # packed rows carry their document ids too
    held = eval_batches_bytes(tc.batch_size, tc.seq_len, tc.eval_batches, tensors)
    require_memory(held + (need if on_host else 0), "cpu", "eval_batches",
                   f"{params} and {evals}" if on_host else evals)


def read_inputs(tc: TrainConfig) -> tuple[ModelConfig | None, Path | None]:
    """``--init``'s (model config, tokenizer file) (None, None without one), once ``--init``, ``--data`` and
    ``--tokenizer`` are checked to be there (a tokenizer a file): each problem a ``FieldError`` naming its flag, the
    checkpoint's own (a config flyer cannot compute, no valid checkpoint) named as ``--init``."""
    for field in ("init", "data", "tokenizer"):
        path = getattr(tc, field)
        if not path:
            continue
        if not Path(path).expanduser().exists():
            raise FieldError(field, f"{path} does not exist")
        if field == "tokenizer" and not Path(path).expanduser().is_file():  # a folder, a device
            raise FieldError(field, f"{path} is not a file (a tokenizer.json)")
    if not tc.init:
        return None, None
    try:
        return init_source(tc.init)
    except (ConfigError, CheckpointError) as e:
        raise FieldError("init", f"cannot load checkpoint '{tc.init}': {e}") from None


def check_fp4_experts(fp4: bool, cfg: ModelConfig) -> None:
    """FP4 QAT (``fp4``) needs routed experts whose rows are whole groups of 32 inputs (w1 / w3: dim, w2:
    moe_inter_dim): ``FieldError`` naming ``fp4_experts`` otherwise."""
    if not fp4:
        return
    if not cfg.is_moe:
        raise FieldError("fp4_experts", f"quantizes routed experts, and this model has none "
                                        f"(n_routed_experts {cfg.n_routed_experts})")
    for name in ("dim", "moe_inter_dim"):
        if getattr(cfg, name) % FP4_GROUP:
            raise FieldError("fp4_experts", f"needs the model's {name} to be a multiple of {FP4_GROUP} (one FP4 "
                                            f"scale per {FP4_GROUP} inputs), got {getattr(cfg, name)}")


def build_model(cfg: ModelConfig, mesh: Mesh | LocalMesh, precision: str = "fp32", seed: int = 0,
                dispatcher: str = "hierarchical", fp8_dispatch: bool = False,
                stages: tuple[str, int] | tuple[str, int, str] | None = None, fp4: bool = False,
                fp8_activation_cache: str = "fp8", recompute: str = "none") -> Transformer:
    """The model to train, on ``mesh.device``, initialised exactly as ``torch.manual_seed(seed);
    Transformer(cfg)`` in one process (each rank keeps its slice of the experts).

    precision: 'fp8' converts the linear layers to FP8 (any other value: left as built; autocast
    is the caller's). dispatcher: 'local', 'flat' or 'hierarchical', how tokens reach experts on
    other ranks; fp8_dispatch: FP8 payload on that wire (none without expert parallelism: no row crosses ranks).
    stages: the pipeline's (schedule, seq_len[, indexer_train: "off" left out]) under pp > 1: only this rank's
    modules (``held_modules``) get memory, the others stay on the meta device for ``PipelineModel``.
    fp4: DeepSeek-V4's FP4 QAT of the routed experts, in any precision (``flyer.fp8.fp4.fp4_experts``).
    recompute: ``flyer.model.recompute.MODES`` (``TrainConfig`` refuses it under a schedule that splits backward).
    """
    torch.manual_seed(seed)
    make_dispatcher = dispatcher_factory(cfg, mesh, kind=dispatcher, fp8=fp8_dispatch and mesh.ep > 1)
    if stages is not None and mesh.pp > 1:
        with torch.device("meta"):
            model = Transformer(cfg, make_dispatcher=make_dispatcher)
        for module in held_modules(model, mesh.pp, mesh.pp_rank, *stages).values():
            module.to_empty(device=mesh.device)
            for b in module.buffers():  # every buffer of the model starts at zero (tests/test_model.py)
                b.zero_()
        if cfg.tie_embeddings and not model.head.weight.is_meta:  # to_empty gave the head a weight of its own
            model.head.weight = model.embed.weight  # held with the head (``_needs_embedding``)
    else:
        model = Transformer(cfg, make_dispatcher=make_dispatcher).to(mesh.device)
    mesh.init_like_single_process(model, seed)
    if precision == "fp8":
        convert_to_fp8(model, recipe=FP8Recipe(activation_cache=fp8_activation_cache))
    if fp4:
        fp4_experts(model)
    match_wire_scales(model)  # the FP8 dispatch's scales as the FP8 experts quantize their inputs
    set_recompute(model, recompute)
    return model


def build_optimizer(model: torch.nn.Module, tc: TrainConfig, mesh: Mesh | LocalMesh | None = None):
    """``tc.optimizer`` with ``tc``'s lr, betas and weight decay: AdamW (matrices decay, vectors --
    norms, biases -- do not) or Muon (``flyer.optim.muon``: Muon for the matrices it routes, AdamW for
    the rest). With ``tc.zero == 1`` on a multi-rank ``mesh``, its state is sharded over each
    parameter's replicas (``flyer.parallel.zero.ShardedOptimizer``; the same updates, bit for bit)."""
    betas = (tc.beta1, tc.beta2)
    if tc.zero == 1 and mesh is not None and mesh.world > 1:
        return ShardedOptimizer(model, mesh, lr=tc.lr, betas=betas, weight_decay=tc.weight_decay, kind=tc.optimizer)
    params = [p for _, p in model.named_parameters()]  # deduplicates tied weights
    if tc.indexer_train == "warmup":  # the indexers' dense warm-up: the optimizer sees theirs only
        params = [p for p in params if p.requires_grad]
    muon = muon_param_ids(model) if tc.optimizer == "muon" else {}
    return optimizer_class(tc.optimizer)(optimizer_groups(tc.optimizer, params, muon, tc.weight_decay), lr=tc.lr,
                                         betas=betas, eps=1e-8, fused=params[0].device.type in ("cpu", "cuda"))


__all__ = ["build_model", "build_optimizer", "training_memory_bytes"]
