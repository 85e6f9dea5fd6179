"""``flyer plan`` (training cost and memory) and ``flyer net`` (topology, ep, latency, simulate,
storage, pipeline). Every subcommand prints a readable table, or JSON with ``--json``."""

from __future__ import annotations

import dataclasses
import json
import math

from flyer.cluster import topology as T
from flyer.cluster.comm import EPScenario, RDMAIssue, ep_decode, ibgda_sweep, latency_table
from flyer.cluster.costs import Layout, Throughput, auto_layout, plan
from flyer.cluster.flags import MAX_RUN_WORLD, SIGNED, ZERO_OK, check_ranges  # noqa: F401 (flyer.cli reads ZERO_OK, SIGNED here)
from flyer.cluster.hardware import FABRICS, GPUS, fabric, gpu_spec
from flyer.cluster.netsim import MAX_MESSAGE_BYTES, ROUTINGS, TOPOLOGIES, simulate
from flyer.cluster.pipeline import SCHEDULES, compare, pipeline_report
from flyer.cluster.plots import simulate_chart, topology_chart
from flyer.cluster.storage import StorageCluster, storage_model
from flyer.config import PRESETS, ModelConfig, resolve_config
from flyer.errors import FieldError
from flyer.runtime import PRECISIONS

PATHS = {"config", "plot"}  # paths that may not be empty (flyer.cli)


def _checked(command):
    """``command`` run only after ``check_ranges``: the one place a cluster flag's range is checked."""
    def run(args) -> int:
        check_ranges(args)
        return command(args)
    return run


def _emit(args, obj, table) -> int:
    if args.json:
        print(json.dumps(obj))
    else:
        table(obj)
    return 0


def _num(x: float, digits: int = 2) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.{digits}f}{unit}"
    return f"{x:.{digits}f}"


def _rows(rows: list[tuple[str, str]]) -> None:
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{w}}  {v}")


def _grid(rows: list[dict], cols: list[tuple[str, str, str]]) -> None:
    """Print ``rows`` as columns; ``cols`` = (header, key, format spec)."""
    cells = [[h for h, _, _ in cols]] + [[format(r[k], f) if r.get(k) is not None else "-" for _, k, f in cols]
                                         for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    for c in cells:
        print("  " + "  ".join(x.rjust(wd) for x, wd in zip(c, widths)))


# ---- flyer plan ---------------------------------------------------------------------------------
# any of them: a flyer run's per-rank bytes
RUN_FLAGS = ("zero", "dp", "pp_schedule", "precision", "vocab_size", "optimizer", "recompute", "fp8_activation_cache")


def _check_run_world(gpus: int, gpus_per_node: int) -> None:
    """Refuse, before any work, a world ``flyer train``'s per-rank bytes cannot be listed for."""
    if gpus > MAX_RUN_WORLD:
        raise FieldError("gpus", f"per-rank bytes are listed for at most {MAX_RUN_WORLD:,} ranks (a three-tier fat "
                                 f"tree of {T.PAPER_RADIX}-port switches; got {gpus:,}); drop --zero, --dp, "
                                 "--pp-schedule, --precision, --vocab-size, --optimizer, --recompute and "
                                 "--fp8-activation-cache for the cluster-wide plan")
    if gpus > gpus_per_node and gpus % gpus_per_node:  # torchrun starts the same number of ranks on every node
        raise FieldError("gpus", f"a flyer train run needs whole nodes: a multiple of the {gpus_per_node} GPUs per "
                                 f"node, or at most one node (got {gpus})")


def _size(gib: float) -> str:
    """A size given in GiB, written in the largest unit that shows it whole (a small preset's rows read 0.00 GiB)."""
    for unit, scale in (("GiB", 1), ("MiB", 1 << 10), ("KiB", 1 << 20)):
        if gib * scale >= 1 or unit == "KiB":
            return f"{gib * scale:.2f} {unit}"


def _run_memory(args, cfg: ModelConfig, pp: int, ep: int, gpus_per_node: int) -> dict:
    """Per-rank bytes of parameters, gradients and optimizer state of ``flyer train`` on this layout
    (``flyer.parallel.memory``: equal to what a run measures), activations estimated beside them."""
    # here, not at the top: the model and torch.distributed.pipelining add seconds to every flyer start
    from flyer.parallel.memory import plan_state_bytes  # heavy: see above
    from flyer.parallel.mesh import validate_layout as validate_run_layout  # heavy: see above
    from flyer.parallel.stages import (SPLIT_SCHEDULES, check_indexer_stages, min_micro_batches,  # heavy: see above
                                       validate_pipeline)
    from flyer.optim.muon import OPTIMIZERS  # heavy: see above
    from flyer.model.recompute import MODES as RECOMPUTE_MODES  # heavy: see above
    from flyer.fp8.linear import ACTIVATION_CACHES  # heavy: see above

    zero, schedule = args.zero or 0, args.pp_schedule or "1f1b"
    precision, optimizer = args.precision or "bf16", args.optimizer or "adamw"
    recompute, cache = args.recompute or "none", args.fp8_activation_cache or "fp8"
    if cache not in ACTIVATION_CACHES:
        raise FieldError("fp8_activation_cache", f"must be one of {', '.join(ACTIVATION_CACHES)} (got {cache!r})")
    if recompute not in RECOMPUTE_MODES:
        raise FieldError("recompute", f"must be one of {', '.join(RECOMPUTE_MODES)} (got {recompute!r})")
    if recompute != "none" and pp > 1 and schedule in SPLIT_SCHEDULES:  # as flyer train refuses it
        raise FieldError("recompute", "is not taken with {pp_schedule} zb or dualpipev: their split weight backward "
                                      "would recompute each MLA layer once per parameter group; use 1f1b or "
                                      f"interleaved (got {recompute!r})", ("pp_schedule",))
    if optimizer not in OPTIMIZERS:
        raise FieldError("optimizer", f"must be one of {', '.join(OPTIMIZERS)} (got {optimizer!r})")
    if zero not in (0, 1):
        raise FieldError("zero", f"must be 0 or 1 (ZeRO-1: optimizer state sharded; got {zero})")
    if precision not in PRECISIONS or precision == "auto":
        raise FieldError("precision", f"must be one of {', '.join(p for p in PRECISIONS if p != 'auto')} "
                                      f"(got {precision!r})")
    dp = args.gpus // pp
    if args.dp is not None and args.dp != dp:
        raise FieldError("dp", f"must be gpus / pp = {args.gpus} / {pp} = {dp} (got {args.dp})")
    rpn = min(gpus_per_node, args.gpus)  # fewer GPUs than a node: one partly used node
    validate_pipeline(cfg, 1, schedule, 1)  # the schedule's name first
    validate_run_layout(cfg, args.gpus, ep, rpn, pp)
    validate_pipeline(cfg, pp, schedule, min_micro_batches(schedule, pp))
    check_indexer_stages(cfg, pp, schedule, args.seq_len, args.indexer_train)  # as flyer train refuses it
    mem = plan_state_bytes(cfg, pp, dp, ep, zero, schedule, args.seq_len, args.micro_batch, precision, optimizer,
                           recompute, cache, args.indexer_train)
    return {"run_layout": {"world": args.gpus, "pp": pp, "dp": dp, "ep": ep, "zero": zero,
                           "pp_schedule": schedule if pp > 1 else None, "precision": precision,
                           "optimizer": optimizer, "recompute": recompute,
                           "fp8_activation_cache": cache if precision == "fp8" else None}, **mem}


def _plan(args) -> int:
    overrides = {}
    for item in args.hw or []:
        if "=" not in item:
            raise FieldError("hw", f"expects FIELD=VALUE (got {item!r})")
        k, v = item.split("=", 1)
        overrides[k.strip()] = v.strip()
    if args.gpus_per_node is not None:  # the flag, checked (check_ranges) as the --hw field it overrides
        overrides["gpus_per_node"] = str(args.gpus_per_node)
    gpu = gpu_spec(args.gpu, overrides)
    cfg = resolve_config(args.preset, args.config)
    if args.vocab_size is not None:
        cfg = cfg.replace(vocab_size=args.vocab_size)
    pp, ep, schedule = args.pp, args.ep, args.schedule
    if pp is None and ep is None and schedule is None:  # auto: DeepSeek-V3's layout when it applies
        pp, ep, schedule = auto_layout(cfg, args.gpus)
    run = any(getattr(args, k) is not None for k in RUN_FLAGS)
    if run:
        _check_run_world(args.gpus, gpu.gpus_per_node)
    lay = Layout(gpus=args.gpus, pp=pp or 1, ep=ep or 1, micro_batch=args.micro_batch, schedule=schedule or "1f1b",
                 recompute=not args.no_recompute)
    if (args.step_seconds is None) != (args.batch_size is None):
        raise FieldError("batch_size" if args.batch_size is None else "step_seconds",
                         "goes with --step-seconds and --batch-size both: a measured step's time and the sequences "
                         "it trains on")
    batch_tokens = None if args.batch_size is None else args.batch_size * args.seq_len
    out = plan(cfg, gpu, lay, args.tokens, args.seq_len,
               Throughput(args.tokens_per_day, args.mfu, args.step_seconds, batch_tokens),
               args.price_per_gpu_hour, args.extra_gpu_hours, args.indexer_train)
    out = {"preset": args.preset, "config": args.config, **out}
    if run:
        out.update(_run_memory(args, cfg, pp or 1, ep or 1, gpu.gpus_per_node))

    def table(o):
        m = o["memory"]
        print(f"{o['preset'] or o['config']} on {o['gpus']:,} x {o['gpu']}, {_num(o['tokens'])} tokens at sequence "
              f"{o['seq_len']}")
        _rows([
            ("total / activated params", f"{_num(o['total_params'])} / {_num(o['activated_params'])} "
                                         f"(MTP +{_num(o['mtp_params'])}, {_num(o['mtp_params_stored'])} as "
                                         f"stored)"),
            ("activated, no embedding", f"{_num(o['activated_params_without_embedding'])} (a lookup: DeepSeek's "
                                        f"papers' count)"),
            ("FLOPs / token causal", f"{o['flops_per_token_causal'] / 1e9:.2f} GFLOPs (main model; MTP +"
                                     f"{o['flops_per_token_mtp'] / 1e9:.2f} GFLOPs, not in MFU"
                                     + ("" if o["indexer_train"] == "off" else f"; indexers {o['indexer_train']}")
                                     + ")"),
            ("FLOPs / token non-causal", f"{o['flops_per_token_noncausal'] / 1e9:.2f} GFLOPs"),
            ("throughput", f"{_num(o['tokens_per_day'])} tokens/day, {o['tokens_per_s_per_gpu']:.0f} tokens/s/GPU "
                           f"({o['throughput_source']})"),
            ("TFLOPS / GPU causal | non-causal",
             f"{o['tflops_per_gpu_causal']:.1f} | {o['tflops_per_gpu_noncausal']:.1f}"),
            ("MFU causal | non-causal",
             f"{o['mfu_causal']:.2%} | {o['mfu_noncausal']:.2%} of {o['peak_bf16_tflops']:.0f} TFLOPS BF16"),
            ("GPU-hours", f"{o['gpu_hours']:,.0f} ({o['gpu_hours_per_trillion_tokens']:,.0f} per trillion tokens"
                          + (f", +{o['extra_gpu_hours']:,.0f} extra)" if o['extra_gpu_hours'] else ")")),
            ("days", f"{o['days']:.2f}"),
            ("cost", f"${o['cost_usd']:,.0f} at ${o['price_per_gpu_hour']}/GPU-hour"),
            ("KV cache / token", f"{o['kv_cache_bytes_per_token']:,} bytes"),
        ])
        print(f"memory per GPU, DeepSeek-V3's recipe (whatever --precision): PP {m['pp']} x EP {m['ep']} x DP "
              f"{m['dp']} (ZeRO-1), {m['schedule']}, {m['layers_per_stage']} layers/stage, micro-batch "
              f"{m['micro_batch']}, the MTP module not counted")
        _rows([
            ("weights (BF16)", _size(m["weights_gib"])),
            ("gradients (FP32)", _size(m["gradients_gib"])),
            ("optimizer (ZeRO-1)", _size(m["optimizer_gib"])),
            ("activations (estimate)", _size(m["activations_gib"])),
            ("total", f"{_size(m['total_gib'])} of {m['hbm_gib']:.0f} GiB HBM "
                      f"({'fits' if m['fits'] else 'does NOT fit'})"),
        ])
        if "run_layout" in o:
            lay = o["run_layout"]
            opt = "Muon" if lay["optimizer"] == "muon" else "AdamW"
            print(f"flyer train per rank: PP {lay['pp']} x DP {lay['dp']} (EP {lay['ep']}), ZeRO-{lay['zero']}, "
                  f"{lay['pp_schedule'] or 'no pipeline'}; FP32 weights and {opt}, exact bytes (activations: estimate)")
            rows = [{"rank": r, "params": o["param_bytes_per_rank"][r], "grads": o["grad_bytes_per_rank"][r],
                     "optimizer": o["optimizer_bytes_per_rank"][r],
                     "activations": o["activation_bytes_per_rank_estimate"][r]} for r in range(lay["world"])]
            _grid(rows, [("rank", "rank", "d"), ("param bytes", "params", ","), ("grad bytes", "grads", ","),
                         ("optimizer bytes", "optimizer", ","), ("activations (est.)", "activations", ",")])

    return _emit(args, out, table)


# ---- flyer net ----------------------------------------------------------------------------------
def _topology(args) -> int:
    prices = T.Prices(args.switch_price_per_port, args.switch_price_base, args.endpoint_link_usd,
                      args.switch_link_usd)
    df = None
    if any(v is not None for v in (args.df_a, args.df_p, args.df_h, args.df_g)):
        a0, p0, h0, g0 = T.dragonfly_for_radix(args.radix)
        df = (args.df_a or a0, args.df_p or p0, args.df_h or h0, args.df_g or g0)
    names = tuple(n.strip() for n in args.topologies.split(",") if n.strip())
    topos = T.compare(args.radix, args.planes, args.sf_q, df, names, args.rails)
    rows = [t.as_dict(prices) for t in topos]
    for r in rows:
        if r["name"] == "sf":
            r["params"]["buildable_q"] = T.slim_fly_q_for_radix(args.radix, prime_power=True)
    if args.plot:
        topology_chart(rows, args.plot)

    def table(rs):
        print(f"topologies from {args.radix}-port switches (switch {prices.switch(args.radix):,.0f} USD, "
              f"endpoint link {prices.endpoint_link:,.0f}, switch link {prices.switch_link:,.0f})")
        _grid(rs, [("name", "name", ""), ("endpoints", "endpoints", ","), ("switches", "switches", ","),
                   ("links", "links", ","), ("diameter", "diameter", "d"), ("cost USD", "cost_usd", ",.0f"),
                   ("USD/endpoint", "cost_per_endpoint_usd", ",.0f")])
        for r in rs:
            if r["note"]:
                print(f"  note ({r['name']}): {r['note']}")
        if args.plot:
            print(f"  chart: {args.plot}")

    return _emit(args, rows, table)


def _ep(args) -> int:
    kw = {}
    if args.preset:  # take the model's own sizes instead of the ISCA paper's rounded scenario
        cfg = resolve_config(args.preset)
        if not cfg.is_moe:
            raise FieldError("preset", f"{args.preset} is a dense model: it has no experts to dispatch tokens to")
        kw = dict(hidden=cfg.dim, layers=cfg.n_layers, experts_per_token=cfg.n_activated_experts + cfg.n_shared_experts)
    else:
        cfg = resolve_config("dsv3")
        kw = dict(layers=cfg.n_layers, experts_per_token=cfg.n_activated_experts + cfg.n_shared_experts)
    for name in ("hidden", "layers", "experts_per_token"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    scen = EPScenario(tokens_per_device=args.tokens_per_device, dispatch_bytes=args.dispatch_bytes,
                      combine_bytes=args.combine_bytes, micro_batches=args.micro_batches,
                      node_limit=args.node_limit, dispatch_scale_bytes=4 / 128 if args.fp8_scales else 0.0, **kw)
    nvlink = None
    if args.node_limit:
        try:
            nvlink = fabric("nvlink", args.nvlink_gb_s)
        except FieldError as e:  # the bandwidth given is --nvlink-gb-s here, not --bandwidth-gb-s
            raise FieldError("nvlink_gb_s", e.problem) from None
    out = ep_decode(scen, fabric(args.fabric, args.bandwidth_gb_s, args.latency_us), nvlink)

    def table(o):
        copies = (f" (node-limited to {o['node_limit']} nodes: {o['scaleout_copies_per_token']} copies a token on "
                  f"{o['fabric']}, NVLink forwards them to the experts)" if o.get("node_limit") else "")
        print(f"EP decode on {o['fabric']} at {o['bandwidth_gb_s']:g} GB/s: {o['tokens_per_device']} tokens/device x "
              f"{o['experts_per_token']} experts x hidden {o['hidden']}, {o['layers']} layers, "
              f"{o['micro_batches']} micro-batches{copies}")
        _rows([
            ("bytes per EP step", f"{o['bytes_per_step']:,.0f}"),
            ("dispatch | combine", f"{o['dispatch_us']:.2f} | {o['combine_us']:.2f} us"),
            *([("NVLink fan-out (overlapped)", f"{o['nvlink_us']:.2f} us")] if o.get("node_limit") else []),
            ("EP step (bandwidth bound)", f"{o['step_us']:.2f} us"),
            ("layer", f"{o['layer_us']:.2f} us"),
            ("time per output token", f"{o['tpot_ms']:.2f} ms"),
            ("tokens/s", f"{o['tokens_per_s']:.1f}"),
            ("with latency (alpha-beta)", f"step {o['step_us_alpha_beta']:.2f} us, "
                                          f"TPOT {o['tpot_ms_alpha_beta']:.2f} ms, "
                                          f"{o['tokens_per_s_alpha_beta']:.1f} tokens/s"),
        ])

    return _emit(args, out, table)


def _latency(args) -> int:
    try:
        sizes = [float(s) for s in args.sizes.split(",")]
    except ValueError:
        sizes = [math.nan]
    if not all(s.is_integer() and 1 <= s <= MAX_MESSAGE_BYTES for s in sizes):  # not inf, nan, 0.5
        raise FieldError("sizes", f"must be comma-separated whole byte counts from 1 to {MAX_MESSAGE_BYTES:,.0f} (got "
                                  f"{args.sizes[:80]!r})")
    out = {
        "latency": latency_table(args.bytes),
        "ibgda": ibgda_sweep([int(s) for s in sizes], args.messages, fabric(args.fabric), args.nic_msg_rate,
                             RDMAIssue("cpu_proxy", args.proxy_overhead_us, args.proxy_threads, args.proxy_latency_us),
                             RDMAIssue("ibgda", args.gpu_overhead_us, args.gpu_issuers, 0.0)),
    }

    def table(o):
        print(f"{args.bytes}-byte end-to-end latency")
        _grid(o["latency"], [("fabric", "fabric", ""), ("path", "path", ""), ("switches", "switches", "d"),
                             ("latency us", "latency_us", ".2f")])
        g = o["ibgda"]
        print(f"{g['messages']} RDMA writes on {g['link']}: CPU proxy {_num(g['proxy_msg_rate'])} msg/s, "
              f"IBGDA {_num(g['ibgda_msg_rate'])} msg/s; the proxy caps messages below "
              f"{g['proxy_bandwidth_bound_from_bytes']:,} bytes")
        _grid(g["rows"], [("bytes", "bytes", ","), ("proxy us", "proxy_us", ".1f"), ("IBGDA us", "ibgda_us", ".1f"),
                          ("speedup", "speedup", ".2f"), ("proxy GB/s", "proxy_gb_s", ".1f"),
                          ("IBGDA GB/s", "ibgda_gb_s", ".1f")])

    return _emit(args, out, table)


def _simulate(args) -> int:
    topos = TOPOLOGIES if args.topology == "all" else (args.topology,)
    routings = ROUTINGS if args.routing == "all" else (args.routing,)
    rows = [simulate(t, r, nodes=args.nodes, gpus_per_node=args.gpus_per_node, radix=args.radix,
                     forwarding=args.forwarding, message_bytes=args.message_bytes, seed=args.seed,
                     nic_gb_s=args.nic_gb_s) for t in topos for r in routings]
    if args.plot:
        simulate_chart(rows, args.plot)

    def table(rs):
        print(f"all-to-all of {args.nodes} nodes x {args.gpus_per_node} GPUs, {_num(args.message_bytes)}B per pair, "
              f"{args.nic_gb_s:g} GB/s NICs (max-min fair, event-driven)")
        _grid(rs, [("topology", "topology", ""), ("routing", "routing", ""), ("forwarding", "forwarding", ""),
                   ("radix", "radix", "d"), ("flows", "flows", ","), ("GB/s per GPU", "bandwidth_per_gpu_gb_s", ".1f"),
                   ("of NIC", "fraction_of_nic", ".1%"), ("time us", "completion_us", ",.0f")])
        if args.plot:
            print(f"  chart: {args.plot}")

    return _emit(args, rows, table)


# ``net storage``'s flags: one per ``StorageCluster`` field
_STORAGE_HELP = {
    "nodes": "storage nodes", "nics_per_node": "NICs per storage node",
    "nic_gbit_s": "line rate of each storage NIC (Gbit/s)", "ssds_per_node": "SSDs per storage node",
    "ssd_tib": "capacity of each SSD (TiB)", "ssd_read_gb_s": "read bandwidth of each SSD (GB/s)",
    "ssd_write_gb_s": "write bandwidth of each SSD (GB/s)", "replicas": "copies of each chunk (CRAQ chain length)",
    "clients": "client nodes reading", "client_nic_gbit_s": "line rate of each client's NIC (Gbit/s)",
    "efficiency": "achievable share of line rate", "fill": "used share of the raw capacity (what a lost node held)",
    "recovery_share": "share of bandwidth recovery may take from foreground I/O"}


def _storage(args) -> int:
    c = StorageCluster(**{f.name: getattr(args, f.name) for f in dataclasses.fields(StorageCluster)})
    out = storage_model(c)

    def table(o):
        print(f"3FS-style cluster: {o['nodes']} nodes x {o['nics_per_node']} x {o['nic_gbit_s']:g} Gb/s, "
              f"{o['ssds_per_node']} x {o['ssd_tib']:g} TiB SSDs, {o['replicas']} replicas, {o['clients']} clients")
        _rows([
            ("aggregate read", f"{o['read_tib_s']:.2f} TiB/s ({o['read_gb_s']:,.0f} GB/s, bound by {o['read_bound']}; "
                               f"{o['read_line_tib_s']:.2f} at line rate)"),
            ("aggregate write",
             f"{o['write_tib_s']:.2f} TiB/s ({o['write_gb_s']:,.0f} GB/s, bound by {o['write_bound']})"),
            ("capacity raw | usable", f"{o['raw_capacity_pib']:.2f} | {o['usable_capacity_pib']:.2f} PiB"),
            ("recovery after a node loss", f"{o['recovery_tib']:.1f} TiB copied back into it in "
                                           f"{o['recovery_min']:.1f} min at {o['recovery_gb_s']:.1f} GB/s"
             if o["recovery_min"] is not None else f"{o['recovery_tib']:.1f} TiB lost (no surviving node)"),
        ])

    return _emit(args, out, table)


def _pipeline(args) -> int:
    if args.schedule == "all":
        rows = compare(args.pp, args.f, args.b, args.w, args.fb, args.stage_param_gib, args.microbatch_activation_gib)
    else:
        rows = [pipeline_report(args.schedule, args.pp, args.f, args.b, args.w, args.fb, args.stage_param_gib,
                                args.microbatch_activation_gib)]

    def table(rs):
        print(f"PP {args.pp}, F={args.f:g} B={args.b:g} W={args.w:g} F&B={rs[0]['fb']:g}")
        _grid(rs, [("schedule", "schedule", ""), ("bubble", "bubble", ".2f"), ("params", "param_copies", "d"),
                   ("activations", "activation_microbatches", "g"), ("param GiB", "param_memory_gib", ".2f"),
                   ("activation GiB", "activation_memory_gib", ".2f")])
        if any(r["schedule"] == "dualpipev" for r in rs) and args.pp % 2 == 0:  # devices here, stages in its README
            print(f"  dualpipev: {args.pp} devices of two half-stages each, in units of a whole stage's F and B "
                  f"(DualPipe's README lists it by stages: {args.pp} stages on {args.pp // 2} devices)")

    return _emit(args, rows, table)


def register(sub) -> None:
    p = sub.add_parser("plan", help="training FLOPs, GPU-hours, cost and per-GPU memory on a cluster")
    p.add_argument("--preset", default="dsv3", choices=list(PRESETS), metavar="PRESET",
                   help=f"one of: {', '.join(PRESETS)}")
    p.add_argument("--config", help="a config file overriding the preset's fields")
    p.add_argument("--gpu", default="h800", help=f"one of: {', '.join(GPUS)}")
    p.add_argument("--hw", action="append", metavar="FIELD=VALUE", help="override a hardware field (repeatable)")
    p.add_argument("--gpus", type=int, default=2048, help="GPUs in the cluster")
    p.add_argument("--gpus-per-node", type=int, help="default: the GPU's NVLink domain")
    p.add_argument("--tokens", type=float, default=14.8e12, help="token budget")
    p.add_argument("--seq-len", type=int, default=4096, help="tokens per training sequence")
    t = p.add_mutually_exclusive_group()
    t.add_argument("--tokens-per-day", type=float, help="measured cluster throughput")
    t.add_argument("--mfu", type=float, help="assumed MFU against the BF16 dense peak (default 0.4)")
    t.add_argument("--step-seconds", type=float, help="a measured optimizer step's seconds (with --batch-size)")
    p.add_argument("--batch-size", type=int, help="sequences per optimizer step (with --step-seconds)")
    p.add_argument("--price-per-gpu-hour", type=float, default=2.0,
                   help="USD per GPU-hour (the V3 report's rental price)")
    p.add_argument("--extra-gpu-hours", type=float, default=0.0, help="GPU-hours of other stages added to the total")
    p.add_argument("--pp", type=int, help="pipeline stages (default: see --schedule)")
    p.add_argument("--ep", type=int, help="expert-parallel ranks")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch")
    p.add_argument("--schedule", choices=SCHEDULES,
                   help="pipeline schedule; with none of --pp/--ep/--schedule given, DeepSeek-V3's PP 16 x EP 64 "
                        "DualPipe when the model and GPU count allow it, else PP 1 x EP 1 1F1B")
    p.add_argument("--no-recompute", action="store_true", help="save every activation (no V3-style recomputation)")
    p.add_argument("--indexer-train", default="off",
                   help="flyer train's --indexer-train: how DSA indexers count in the FLOPs: off (default: frozen, "
                        "forward where they select), warmup or sparse")
    r = p.add_argument_group("a flyer train run's per-rank bytes (any of these flags adds them)")
    r.add_argument("--pp-schedule", help="flyer train's --pp-schedule: 1f1b (default), interleaved, zb or dualpipev")
    r.add_argument("--dp", type=int, help="data-parallel ranks per stage: must be gpus / pp")
    r.add_argument("--zero", type=int, help="1: optimizer state sharded over data-parallel ranks (ZeRO-1)")
    r.add_argument("--precision", help="fp32, bf16 or fp8 (the activation estimate; weights are FP32)")
    r.add_argument("--vocab-size", type=int, help="the run's vocabulary (flyer train caps presets at 8192)")
    r.add_argument("--optimizer", help="flyer train's --optimizer: adamw (default) or muon (one momentum buffer "
                                       "for Muon's matrices)")
    r.add_argument("--recompute", help="flyer train's --recompute: none (default) or mla (the activation estimate)")
    r.add_argument("--fp8-activation-cache", help="flyer train's --fp8-activation-cache under --precision fp8: fp8 "
                                                  "(default) or input (the activation estimate)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_checked(_plan))

    net = sub.add_parser("net", help="network topology, EP communication, latency, simulation, storage, pipeline")
    ns = net.add_subparsers(dest="net_command", metavar="SUBCOMMAND", required=True)

    q = ns.add_parser("topology", help="endpoints, switches, links and cost of FT2/MPFT/FT3/SF/DF at one radix")
    q.add_argument("--radix", type=int, default=T.PAPER_RADIX, help="ports per switch")
    q.add_argument("--topologies", default="ft2,mpft,ft3,sf,df", help="comma list of ft2, mpft, mrft, ft3, sf, df")
    q.add_argument("--planes", type=int, default=8, help="MPFT planes (one NIC each per endpoint)")
    q.add_argument("--rails", type=int, default=8, help="MRFT rails")
    q.add_argument("--sf-q", type=int, help="Slim Fly q (default: the largest that fits the radix, 28 at 64)")
    q.add_argument("--df-a", type=int,
                   help="Dragonfly routers per group (default: radix / 2, the paper's)")
    q.add_argument("--df-p", type=int, help="Dragonfly endpoints per router (default: radix / 4)")
    q.add_argument("--df-h", type=int, help="Dragonfly global links per router (default: radix / 4)")
    q.add_argument("--df-g", type=int, help="Dragonfly groups (default a*h-1, the paper's 511 at radix 64)")
    q.add_argument("--switch-price-per-port", type=float, default=350.4,
                   help="USD a switch costs per port (a linear fit)")
    q.add_argument("--switch-price-base", type=float, default=-892.3,
                   help="USD a switch costs beside its ports (the fit's intercept)")
    q.add_argument("--endpoint-link-usd", type=float, default=981.0,
                   help="USD per endpoint-to-switch link (cable and transceivers)")
    q.add_argument("--switch-link-usd", type=float, default=2405.0, help="USD per switch-to-switch link")
    q.add_argument("--plot", metavar="PNG", help="write a cost/endpoint chart")
    q.add_argument("--json", action="store_true", help="print a JSON array, an object per topology")
    q.set_defaults(func=_checked(_topology))

    q = ns.add_parser("ep", help="EP dispatch/combine time per layer and decode tokens/s (alpha-beta)")
    q.add_argument("--preset", choices=list(PRESETS), metavar="PRESET",
                   help="take hidden/layers/experts from a preset (default: the ISCA paper's scenario, hidden 7000)")
    q.add_argument("--tokens-per-device", type=int, default=32, help="tokens each GPU decodes in one EP step")
    q.add_argument("--hidden", type=int,
                   help="hidden size of the dispatched rows (default: the preset's; without --preset the paper's 7K)")
    q.add_argument("--layers", type=int, help="layers a token passes (default: the preset's, or V3's 61)")
    q.add_argument("--experts-per-token", type=int, help="routed + shared experts each token reaches")
    q.add_argument("--dispatch-bytes", type=float, default=1.0, help="bytes per element on dispatch (FP8 = 1)")
    q.add_argument("--combine-bytes", type=float, default=2.0, help="bytes per element on combine (BF16 = 2)")
    q.add_argument("--fp8-scales", action="store_true", help="add one FP32 scale per 128 dispatched elements")
    q.add_argument("--micro-batches", type=int, default=2,
                   help="micro-batches whose compute hides each other's all-to-all")
    q.add_argument("--node-limit", type=int, default=0,
                   help="M nodes per token (hierarchical over NVLink); 0 = the paper's bound")
    q.add_argument("--fabric", default="ib", help=f"one of: {', '.join(FABRICS)}")
    q.add_argument("--bandwidth-gb-s", type=float, help="override the fabric's bandwidth (GB/s)")
    q.add_argument("--latency-us", type=float, help="override the fabric's latency")
    q.add_argument("--nvlink-gb-s", type=float, help="NVLink bandwidth for --node-limit (default H800's 200)")
    q.add_argument("--json", action="store_true", help="print one JSON object")
    q.set_defaults(func=_checked(_ep))

    q = ns.add_parser("latency", help="small-message latency per fabric and CPU proxy vs IBGDA")
    q.add_argument("--bytes", type=int, default=64, help="message size of the end-to-end latency table")
    q.add_argument("--sizes", default="64,512,4096,7168,32768,262144,1048576", help="message sizes for the IBGDA sweep")
    q.add_argument("--messages", type=int, default=256, help="messages sent back to back per sweep point")
    q.add_argument("--fabric", default="ib", help=f"one of: {', '.join(FABRICS)}")
    q.add_argument("--nic-msg-rate", type=float, default=200e6, help="NIC message rate cap (messages/s)")
    q.add_argument("--proxy-overhead-us", type=float, default=0.5,
                   help="CPU proxy: microseconds of host work per message")
    q.add_argument("--proxy-threads", type=int, default=1, help="CPU proxy threads issuing in parallel")
    q.add_argument("--proxy-latency-us", type=float, default=2.0,
                   help="CPU proxy: the GPU-to-host signal and polling delay added to each message")
    q.add_argument("--gpu-overhead-us", type=float, default=0.2,
                   help="IBGDA: microseconds a GPU thread takes to post a message")
    q.add_argument("--gpu-issuers", type=int, default=128, help="IBGDA: GPU warps posting in parallel")
    q.add_argument("--json", action="store_true", help="print one JSON object")
    q.set_defaults(func=_checked(_latency))

    q = ns.add_parser("simulate", help="flow-level all-to-all on small MPFT/MRFT/FT3 with ECMP/static/adaptive routing")
    q.add_argument("--topology", default="all", choices=("all", *TOPOLOGIES), help="the topology to simulate")
    q.add_argument("--routing", default="all", choices=("all", *ROUTINGS), help="how flows pick their paths")
    q.add_argument("--nodes", type=int, default=16, help="nodes in the simulated cluster")
    q.add_argument("--gpus-per-node", type=int, default=4, help="GPUs (and NICs) per node")
    q.add_argument("--radix", type=int, help="switch radix (default: the smallest that holds the cluster)")
    q.add_argument("--forwarding", choices=("pxn", "direct"), help="default: pxn on mpft/mrft, direct on ft3")
    q.add_argument("--message-bytes", type=float, default=1e6, help="bytes each GPU sends each other GPU")
    q.add_argument("--nic-gb-s", type=float, default=50.0, help="NIC bandwidth (GB/s)")
    q.add_argument("--seed", type=int, default=0, help="seed of ECMP's path choices")
    q.add_argument("--plot", metavar="PNG", help="write a chart of the completion times")
    q.add_argument("--json", action="store_true", help="print a JSON array, an object per topology and routing")
    q.set_defaults(func=_checked(_simulate))

    q = ns.add_parser("storage", help="3FS-style aggregate read/write bounds and recovery")
    for f in dataclasses.fields(StorageCluster):  # a flag per field, its default the cluster's
        q.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                       help=_STORAGE_HELP[f.name])
    q.add_argument("--json", action="store_true", help="print one JSON object")
    q.set_defaults(func=_checked(_storage))

    q = ns.add_parser("pipeline", help="bubble and memory per device for 1F1B, ZB1P, DualPipe and DualPipeV")
    q.add_argument("--pp", type=int, default=16, help="pipeline ranks")
    q.add_argument("--f", type=float, default=1.0, help="forward chunk time")
    q.add_argument("--b", type=float, default=2.0, help="full backward chunk time")
    q.add_argument("--w", type=float, default=1.0, help="weight-gradient part of B")
    q.add_argument("--fb", type=float, help="overlapped forward+backward pair (default F+B)")
    q.add_argument("--schedule", default="all", choices=("all", *SCHEDULES), help="the schedule to tabulate")
    q.add_argument("--stage-param-gib", type=float, default=0.0, help="parameter memory of one stage")
    q.add_argument("--microbatch-activation-gib", type=float, default=0.0,
                   help="activations of one micro-batch on a stage")
    q.add_argument("--json", action="store_true", help="print a JSON array, an object per schedule")
    q.set_defaults(func=_checked(_pipeline))
