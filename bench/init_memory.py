"""Peak resident memory of building the model to train: a pipeline or expert-parallel rank against
one process.

Each measurement runs in fresh processes (ranks over gloo on the CPU) and counts from the resident
memory after the imports (``base``) to the high-water mark (``VmHWM``):

- peer ``one_process``: ``torch.manual_seed(0); Transformer(cfg)``, the whole model as one process
  builds it;
- ``pp2_rank0`` / ``pp2_rank1``: ``build_model(stages=("1f1b", seq))`` and ``PipelineModel`` on a
  pp 2 mesh: a rank's stages only, initialised as the one process initialises them (the build's
  random draws replayed module by module, ``flyer.parallel.grads.init_like_single_process``);
- ``ep2_rank0``: ``build_model`` on an EP 2 mesh: the dense weights and half of the experts.

Prints one JSON object: GiB per measurement, the GiB of parameters each holds, and ``ratio_*`` =
a rank's peak over the one process's.
    python bench/init_memory.py [--layers 12]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
from pathlib import Path

import torch

from flyer.config import preset
from flyer.parallel.launch import run_ranks

GIB = 1 << 30


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _cfg(layers: int):
    # the small preset widened to 945M parameters at 12 layers, its MTP module's 78M among them (3.52 GiB in
    # FP32): 64 experts of 512
    return preset("small", n_layers=layers, dim=768, n_routed_experts=64, moe_inter_dim=512)


def _one_process(layers: int) -> dict:
    from flyer.model.transformer import Transformer

    torch.set_num_threads(1)
    base = _status("VmRSS")
    torch.manual_seed(0)
    model = Transformer(_cfg(layers))
    return {"peak_gib": (_status("VmHWM") - base) / GIB, "holds_gib": _gib(model)}


def _rank(rank: int, layers: int, pp: int, ep: int) -> dict:
    from flyer.parallel.mesh import destroy, init_distributed
    from flyer.parallel.pipeline import PipelineModel
    from flyer.train.build import build_model

    torch.set_num_threads(1)
    base = _status("VmRSS")
    cfg = _cfg(layers)
    mesh = init_distributed(cfg, ep=ep, pp=pp, timeout_s=600)
    seq = 64
    model = build_model(cfg, mesh, "fp32", seed=0, stages=("1f1b", seq) if pp > 1 else None)
    if pp > 1:
        model = PipelineModel(model, mesh, "1f1b", pp, 1, seq)
    out = {"peak_gib": (_status("VmHWM") - base) / GIB, "holds_gib": _gib(model)}
    destroy(mesh)  # joins the groups' threads: one left at exit can abort the rank
    return out


def _gib(model: torch.nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / GIB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12, help="layers of the widened small preset (12: 945M parameters)")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        one = pool.apply(_one_process, (args.layers,))
    out = {"layers": args.layers, "one_process_peak_gib": one["peak_gib"], "one_process_holds_gib": one["holds_gib"]}
    for name, pp, ep in (("pp2", 2, 1), ("ep2", 1, 2)):
        for r, res in enumerate(run_ranks(_rank, 2, args.layers, pp, ep)):
            if name == "ep2" and r:  # EP ranks are alike
                continue
            out[f"{name}_rank{r}_peak_gib"] = res["peak_gib"]
            out[f"{name}_rank{r}_holds_gib"] = res["holds_gib"]
            out[f"ratio_{name}_rank{r}_vs_one_process"] = res["peak_gib"] / one["peak_gib"]
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}))


if __name__ == "__main__":
    main()
