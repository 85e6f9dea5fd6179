"""``flyer serve``: load a checkpoint once and serve the OpenAI API until SIGTERM/SIGINT.

Prints one line ``flyer serve: ready on http://HOST:PORT (model NAME)`` when it accepts
requests (``--port 0`` picks a free port, shown in that line). A signal drains: the server stops accepting
connections (a request that reaches it in between answers 503), those in flight finish (``--drain-timeout``
seconds at most: those still running then end with a 503, a stream with its error event), then the process
exits 0.

The process that loads the model steps it (``flyer.serve.link.EngineHost``); HTTP is served by a
child process it starts (``serve_http``), joined to it by a socket pair, so the two never wait for
each other's GIL. The child is started after the model loads and ends with the link either way.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import math
import multiprocessing
import os
import signal
import socket
import sys
import warnings
from pathlib import Path

import torch

from flyer import kernels
from flyer.errors import FieldError, UserError
from flyer.config import parse_size
from flyer.data.chat_template import read_chat_template
from flyer.data.deepseek_encoding import ChatTemplate
from flyer.infer.cache_fp8 import check_fp8_cache_flags
from flyer.infer.cli import (CACHE_DTYPE_HELP, DTYPES, add_expert_threads_flag, add_weight_dtype_flag, auto_cache_dtype,
                             check_checkpoint_eos, load_model)
from flyer.runtime import check_threads
from flyer.serve.disk_tier import open_disk_prefix_cache
from flyer.serve.engine import Engine, EngineConfig, Limits
from flyer.serve.link import EngineClient, EngineHost
from flyer.serve.reasoning import PARSERS
from flyer.serve.sampling_defaults import generation_defaults
from flyer.serve.tools import TOOL_PARSERS

PATHS = {"ckpt", "prefix_cache"}  # paths that may not be empty (flyer.cli)
ZERO_OK = {"port"}  # --port 0: a free port (flyer.cli: other numeric flags must be > 0)
DEFAULT_BLOCK_SIZE = EngineConfig.block_size  # the engine's own default, one home for it


def default_block_size(cfg) -> int:
    """16 tokens, or for DeepSeek-V4 the least multiple of 16 that every compression ratio divides (its blocks
    hold whole compressed entries: ``flyer.serve.paged_hybrid``)."""
    if cfg.attn != "hybrid":
        return DEFAULT_BLOCK_SIZE
    return math.lcm(DEFAULT_BLOCK_SIZE, *(r for r in cfg.compress_ratios[:cfg.n_layers] if r > 0))


def http_url(host: str, port: int) -> str:
    """``http://host:port``, an IPv6 host in brackets (RFC 3986: ``http://[::1]:8000``)."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def open_warning(host: str, api_key: str | None) -> str | None:
    """The line said when the server listens beyond loopback without a key (``host``: the bound address): anyone
    who reaches the port may use the model, which ``--host`` alone does not make plain."""
    ip = ipaddress.ip_address(host.split("%")[0])  # (an IPv6 link-local address's zone)
    if api_key is not None or (getattr(ip, "ipv4_mapped", None) or ip).is_loopback:
        return None
    return (f"flyer serve: warning: listening on {host}, beyond loopback, without --api-key: whoever reaches the "
            "port may use the model")


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port); port 0: a free one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        # no such name or no such local address: the host's; in use or refused: the port's
        field = "host" if isinstance(e, socket.gaierror) or e.errno == errno.EADDRNOTAVAIL else "port"
        raise FieldError(field, f"cannot listen on {http_url(host, port)[7:]} ({e.strerror or e})") from None
    sock.listen(2048)
    return sock


def _as_flags(e: FieldError) -> FieldError:
    """``e`` naming the flag that sets its engine field (the pool's size is ``--kv-cache-memory``'s)."""
    return FieldError("kv_cache_memory", e.problem) if e.field == "kv_cache_bytes" else e


def _run(args) -> int:
    if bool(args.ckpt) == bool(args.preset):
        raise UserError("give exactly one of --ckpt PATH (a trained run or HF directory) or --preset NAME")
    cfg = EngineConfig(kv_cache_bytes=parse_size(args.kv_cache_memory, "kv_cache_memory"),
                       block_size=DEFAULT_BLOCK_SIZE if args.block_size is None else args.block_size,
                       max_batch_size=args.max_batch_size, max_queue=args.max_queue,
                       prefill_chunk=args.prefill_chunk, prefix_sharing=not args.no_prefix_sharing,
                       speculative=args.speculative, draft_tokens=args.draft_tokens,
                       speculative_max_batch=args.speculative_max_batch,
                       cuda_graphs={"auto": None, "on": True, "off": False}[args.cuda_graphs])
    try:
        cfg.validate()
    except FieldError as e:
        raise _as_flags(e) from None
    if not 0 <= args.port < 65536:
        raise FieldError("port", f"must be in [0, 65535] (got {args.port})")
    if not args.host.strip():  # the socket would take "" as every interface; refused before the model loads
        raise FieldError("host", "must name an address (an empty one listens on every interface: say 0.0.0.0)")
    # an empty key would admit "Authorization: Bearer " alone; the server compares keys stripped of spaces
    if args.api_key is not None and (not args.api_key.strip() or args.api_key != args.api_key.strip()):
        raise FieldError("api_key", "must be a key without surrounding spaces, not empty (leave the flag out for "
                                    "no key)")
    if args.model_name is not None and (not args.model_name.strip() or args.model_name != args.model_name.strip()):
        raise FieldError("model_name", f"must name the model, without surrounding spaces (got {args.model_name!r})")
    if not 0 < args.drain_timeout < math.inf:
        raise FieldError("drain_timeout", f"must be a positive number of seconds (got {args.drain_timeout})")
    check_threads(args.threads, "threads")
    check_threads(args.expert_threads, "expert_threads")
    torch.set_num_threads(args.threads)
    kernels.set_expert_threads(args.expert_threads)
    args.precision, args.seed = "auto", 0
    # the cache is allocated whole at start: checked with the model before either is
    cache = f"{cfg.kv_cache_bytes / 2**30:,.1f} GiB of cache"
    model, tok = load_model(args, beside=("kv_cache_memory", cache, cfg.kv_cache_bytes))
    check_checkpoint_eos(tok, args.ckpt, model.cfg.vocab_size, "fix its eos_token_id")
    with warnings.catch_warnings():  # load_model has reported any corrupt checkpoint passed over, once
        warnings.simplefilter("ignore")
        chat_template = read_chat_template(args.ckpt)
    if args.block_size is None:
        cfg.block_size = default_block_size(model.cfg)
    cfg.cache_dtype = DTYPES[auto_cache_dtype(args.ckpt, model) if args.cache_dtype == "auto" else args.cache_dtype]
    check_fp8_cache_flags(model.cfg, cfg.cache_dtype, "absorbed")
    name = args.model_name if args.model_name is not None else Path(args.ckpt).resolve().name if args.ckpt \
        else args.preset
    defaults = generation_defaults(args.ckpt) if args.generation_config == "auto" else {}
    if defaults:  # said once: a request without them samples otherwise than OpenAI's defaults would
        print(f"flyer serve: sampling defaults from generation_config.json: "
              f"{', '.join(f'{k} {v}' for k, v in defaults.items())} (--generation-config none: OpenAI's)",
              file=sys.stderr, flush=True)
    if args.prefix_cache:
        cfg.prefix_cache = open_disk_prefix_cache(model, args.prefix_cache, cfg.cache_dtype, cfg.block_size,
                                                  parse_size(args.prefix_cache_size, "prefix_cache_size"))
    try:
        engine = Engine(model, cfg, tokenizer=tok)  # tok: structured outputs' grammars (flyer.serve.grammar)
    except FieldError as e:
        raise _as_flags(e) from None
    if engine.window_blocks > engine.alloc.capacity:  # said once to whoever runs it: clients see only refusals
        print(f"flyer serve: every layer slides: a request holds up to {engine.window_blocks} blocks (its window and "
              f"a --prefill-chunk of {cfg.prefill_chunk}), more than the cache's {engine.alloc.capacity}, so rows "
              f"past {engine.alloc.capacity} blocks are refused: raise --kv-cache-memory or lower --prefill-chunk",
              file=sys.stderr, flush=True)
    sock = bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    if (line := open_warning(host, args.api_key)) is not None:
        print(line, file=sys.stderr, flush=True)
    link, their_end = socket.socketpair()
    http = multiprocessing.get_context("spawn").Process(
        target=serve_http, name="flyer-http", daemon=True,
        args=(their_end, sock, engine.limits, tok, name, args.api_key, chat_template,
              http_url(host, port), args.reasoning_parser, args.tool_call_parser, defaults, args.drain_timeout))
    http.start()
    their_end.close()
    sock.close()

    # a signal drains the HTTP side (which stops taking requests, waits for those in flight, then
    # closes the link) while this process steps the engine until the link closes; Ctrl-C signals both
    def drain(*_) -> None:
        if http.is_alive():
            os.kill(http.pid, signal.SIGTERM)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, drain)
    try:
        EngineHost(engine, link).serve()
    finally:
        link.close()
        http.join()
    if http.exitcode != 0:
        print(f"flyer serve: the HTTP process ended with exit code {http.exitcode}", file=sys.stderr, flush=True)
        return 1
    print("flyer serve: stopped", flush=True)
    return 0


def serve_http(link: socket.socket, sock: socket.socket, limits: Limits, tok, name: str, api_key: str | None,
               chat_template: ChatTemplate, url: str, reasoning_parser: str | None = None,
               tool_call_parser: str = "auto", sampling_defaults: dict[str, float] | None = None,
               drain_timeout: float = 60.0) -> None:
    """The HTTP process: the API over the engine's link on ``sock``, with the ready line once it accepts."""
    from flyer.serve.api import Api  # FastAPI and uvicorn: 0.4 s of every flyer command's start otherwise
    from flyer.serve.app import Server  # (uvicorn: as above)

    # uvicorn takes SIGINT/SIGTERM while it serves (draining) and raises them again after: to these, once drained
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server = Server(Api(EngineClient(link, limits), tok, name, api_key, chat_template, reasoning_parser,
                        tool_call_parser, sampling_defaults), graceful_s=drain_timeout)

    async def main():
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not serving.done():
            await asyncio.sleep(0.02)
        if server.started:
            print(f"flyer serve: ready on {url} (model {name})", flush=True)
        await serving
    # uvicorn's loop (uvloop where installed, as uvicorn.run picks it): the event loop's share of the CPU is per token
    with asyncio.Runner(loop_factory=server.config.get_loop_factory()) as runner:
        runner.run(main())


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve the OpenAI API with continuous batching over a paged latent KV cache")
    src = p.add_argument_group("model")
    src.add_argument("--ckpt", help="a training run directory, a step directory, or a Hugging Face model directory")
    src.add_argument("--preset", help="random weights of a preset, with UTF-8 byte tokens (benchmarks)")
    p.add_argument("--model-name", help="the model id clients send (default: the checkpoint directory's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: a free one, shown in the ready line)")
    p.add_argument("--kv-cache-memory", default="2G", help="paged KV cache size, e.g. 512M or 2G (all layers)")
    p.add_argument("--block-size", type=int, default=None,
                   help="tokens per cache block (default 16; DeepSeek-V4: a multiple of its compression ratios, "
                        "default the least multiple of 16, e.g. 128)")
    p.add_argument("--max-batch-size", type=int, default=64, help="requests decoded together at most")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before new ones get 429")
    p.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens prefilled per scheduler step")
    p.add_argument("--speculative", choices=["mtp"], default=None,
                   help="MTP drafts per request and step, verified in the batch (greedy output unchanged)")
    p.add_argument("--draft-tokens", type=int, default=1,
                   help="MTP drafts per request and step (default 1; more reapply the MTP module to its own output)")
    p.add_argument("--speculative-max-batch", type=int, default=None, metavar="N",
                   help="with --speculative: a step with more than N decoding requests drafts for none of them "
                        "(they decode plainly): where a step is bound by compute (a CPU, a GPU at a large batch) "
                        "verifying the drafts costs more than the kept ones win back (default: always draft)")
    p.add_argument("--no-prefix-sharing", action="store_true",
                   help="recompute shared prompt prefixes (DeepSeek-V4: its blocks and slot snapshots too)")
    p.add_argument("--prefix-cache", metavar="DIR",
                   help="on-disk prefix cache under the in-memory one (shared with flyer generate --prefix-block "
                        "BLOCK_SIZE, with or without --speculative mtp: under it the blocks hold the MTP cache too, "
                        "and blocks without it are recomputed once; DeepSeek-V4: with its boundary snapshots)")
    p.add_argument("--prefix-cache-size", default="1G", help="size bound of the on-disk prefix cache (LRU)")
    p.add_argument("--cache-dtype", choices=["auto", *DTYPES], default="auto", help=CACHE_DTYPE_HELP)
    add_weight_dtype_flag(p)
    # off by default, as vLLM / SGLang: the split changes the answer's shape, a deployment's choice, and a template's
    # <think> says the model can reason, not that its clients read reasoning_content
    p.add_argument("--reasoning-parser", choices=sorted(PARSERS), default=None,
                   help="chat: return the text between <think> and </think> as message.reasoning_content (a "
                        "stream's delta.reasoning_content), the rest as content: deepseek (DeepSeek-R1, V3.1 / V3.2 "
                        "thinking); kimi_k2 (Kimi K2-Thinking / K2.5: a tool-calls section opened inside the "
                        "reasoning ends it too, its calls parsed as calls)")
    p.add_argument("--tool-call-parser", choices=["auto", *TOOL_PARSERS], default="auto",
                   help="the format tool calls are constrained to and parsed in: auto (default) reads it off the chat "
                        "template (DSML for DeepSeek-V3.2's / V4's encodings); deepseek_v31 (V3.1 / V3.2-Exp's), "
                        "deepseek_v3 (V3-0324 / R1's: a fenced json block), deepseek_v32 or deepseek_v4 (their DSML), "
                        "kimi_k2 (Kimi K2 / K2-Thinking / K2.5's) forces one, as vLLM's parsers of those names read it")
    p.add_argument("--cuda-graphs", choices=["auto", "on", "off"], default="auto",
                   help="serving steps in fixed shapes, replayed from CUDA graphs: auto (default) on a GPU for "
                        "MLA and GQA models (not DSA's or DeepSeek-V4's, which select slots by value); on: also on "
                        "the CPU, run eagerly (as tests check them), and an error for a model without them; off")
    p.add_argument("--generation-config", choices=["auto", "none"], default="auto",
                   help="auto (default): a request's unset temperature, top_p, top_k, min_p and repetition_penalty "
                        "take the checkpoint's generation_config.json values, as vLLM's --generation-config auto; "
                        "none: OpenAI's defaults (temperature 1, top_p 1)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--drain-timeout", type=float, default=60.0, metavar="S",
                   help="on SIGTERM/SIGINT, seconds the requests in flight may take to finish; those still running "
                        "then end with a 503 (a stream: its error event)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=max(1, torch.get_num_threads() - 1),
                   help="torch threads stepping the model (default: all cores but one, which the HTTP process gets; at "
                        "most 4 per core)")
    add_expert_threads_flag(p)
    p.set_defaults(func=_run)
