"""Serving benchmark: ``flyer serve`` under concurrent clients, against transformers in the same run.

1. Saves the ``small`` preset with random weights (seed 0) as a flyer run (``--weight-dtype bf16``,
   the default: rounded to BF16 values, as a published checkpoint stores them), starts
   ``flyer serve --ckpt --weight-dtype`` on it (bf16: the GEMM weights held in BF16, FP32 compute;
   fp8: on the run exported in DeepSeek's FP8 format, its codes and block scales held as stored;
   127.0.0.1, a free port) and drives it with N concurrent clients (``--concurrency``), each
   sending ``--requests-per-client`` streaming completions one after another (a steady load, not
   one burst) of a realistic mix: a shared system prompt, then a
   private part (``--prompt-min``..``--prompt-max`` tokens in all), ``--new-min``..``--new-max``
   new tokens. Fewer than 16 clients send as many requests as 16 do, of the same lengths (fresh
   tokens after the system prompt), so the rates of 1 and 16 clients are rates of one workload.
   Per concurrency: output tokens/s (all clients), TTFT and TPOT p50/p99, the
   server's prefix hit rate, and from its step times (``flyer_step_seconds`` in /metrics) the share of the run's wall
   time the engine was stepping (``busy_share_c*``: the rest it waited for requests) and its mean step
   (``step_ms_c*``, beside the engine alone's ``engine_step_ms_c*``: steps slower than those point at contention for
   the host); on a GPU the share of its steps replayed from CUDA graphs (``graph_step_share_c*``) and the graphs it
   captured (``cuda_graphs_served``). The clients run in a child process at nice 10: they
   stand in for remote users, so on a host of a few cores they must not preempt the server.
2. The peer, on the same weight values exported with ``flyer export`` (FP32) and the same requests at
   the highest concurrency: ``transformers serve --continuous-batching`` when it starts here (its
   completions take text: the prompts' ids decoded by the exported tokenizer), else transformers'
   batched ``generate`` (left-padded, greedy, static batches of the concurrency in arrival order)
   with the reason in ``peer_note``: the server's own error. transformers 5.25 (``accelerate`` installed by
   ``pip install -e '.[bench]'``) serves DeepseekV3's MLA; 5.24 started but failed the first request (its
   continuous-batching cache allotted every layer per-head keys and values of one width, where MLA's keys take
   nope + rope dims and its values v dims); without ``accelerate`` it does not start.
3. The weight bytes a decode step reads per token at 1 and 16 rows, as held (dense weights plus the
   routed experts the tokens choose, expected under uniform routing), and their ratio: where a step is
   bound by memory traffic, the most 16 clients can gain over 1 (``ratio_c16_vs_c1_memory_bound``).
4. The engine alone, in this process (flyer serve's weights, threads and engine settings, no HTTP):
   the clients' requests at 1 and 16 in the same closed loop (``engine_tokens_per_s_c*``: what
   HTTP, SSE and the client processes cost end to end; ``engine_prefill_step_share_c*``: the share
   of its time in steps that carry prompt tokens; ``engine_ms_per_step_c16``, ``_per_decode_row``,
   ``_per_prompt_token``: a least-squares fit of its step times at 16, and ``engine_prompt_share_c16``:
   the prompt tokens' share of its time by that fit), and decode-only steps of 1 and 16 requests
   (``decode_step_ms_b*``: the batching gain before prefill takes its share), steps of 16 decoding requests and
   a ``--prefill-chunk``-token prompt (``mixed_step_ms_b16``); ``engine_prefix_hit_rate_c*``.
5. The MLA payoff: at one ``--kv-cache-memory``, how many 2K-token sequences the engine admits at
   once for the MLA model and for a GQA model of similar size (``bench/decode.py``'s GQA_BENCH),
   against the ratio of their cache bytes per token.

``--preset tiny-v4``: DeepSeek-V4's hybrid attention (window, CSA and HCA layers; ``flyer serve`` pages it with
``flyer.serve.paged_hybrid``), the same clients and keys, with two differences. Its peer is transformers'
DeepseekV4 ``generate`` one request at a time, without padding: its compressors pool each row's tokens by their
place in the padded batch, so a left-padded row pools pad tokens into its compressed entries and shifts their
windows, and its greedy tokens are not those of the request alone. The bench checks that on the first batch
(``peer_padded_rows_agree`` of ``peer_padded_rows``) and takes batched generate as the peer only where every
row agrees. In place of the MLA/GQA payoff it reports its cache bytes per token (``flyer.model.counts``), a
slot's fixed bytes, and the sequences of its whole context (1024 tokens) the engine admits at once at
``--payoff-memory``. Smaller default sizes (``V4_SIZES``).
``flyer_peer_outputs_agree`` (both presets): of the highest concurrency's ``flyer_peer_outputs`` requests,
those whose greedy tokens from the engine alone equal the peer's; V4's can part only where the indexer's
scores tie exactly (at 0, every head's ReLU zero) at its top-k cut: flyer keeps the earliest entries
(``flyer.model.attention.select_topk``), transformers' ``topk`` may keep others.

``--speculative mtp`` (both presets): flyer serve drafts with the model's MTP module (``draft_acceptance_c*``: the
share of the HTTP run's drafts kept). The engine alone (4.) replays each concurrency's requests also without
speculation and, with sharing on, with ``--no-prefix-sharing`` (``engine_tokens_per_s_no_spec_c*``,
``engine_speedup_vs_no_spec_c*``; ``_no_sharing``), and counts the requests whose greedy tokens are the same in
all three (``engine_variants_agree_c*`` of ``engine_variants_requests_c*``). A random MTP module's drafts are almost
never kept: ``--train-steps N`` serves the preset after N steps of ``flyer train`` on its default text
(``bench/decode.py``'s run; ``train_s``), by default ``V4_TRAIN_STEPS`` for tiny-v4 with ``--speculative``.
``--speculative-max-batch N`` serves with that batch cutoff (a step of more than N decoding requests drafts none:
``spec_off_steps_c*``, such steps of the HTTP run; ``engine_spec_off_steps_c*``, the engine's), and the engine alone
replays each concurrency without the cutoff too (``engine_tokens_per_s_no_cutoff_c*``,
``engine_speedup_vs_no_cutoff_c*``).

The default run is sized for a 2-core CPU (about three minutes each preset); ``--full`` runs the issue's sizes
(1/4/16/64 clients, prompts of 64-1024 tokens, 64-256 new tokens). Prints one JSON object.
    python bench/serve.py [--preset small|tiny-v4] [--full] [--threads N] [--weight-dtype bf16|fp32|fp8]
                          [--device cpu|cuda] [--speculative mtp [--draft-tokens N] [--speculative-max-batch N]]
                          [--train-steps N]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch
from tokenizers import Tokenizer

from decode import train_checkpoint  # bench/decode.py, beside this script
from _serve_capacity import TOKEN_RANGE, hybrid_capacity, max_seqs, weight_bytes_per_token  # beside it too
from _serve_engine import MAX_BATCH, decode_steps, engine_replay, mixed_steps, speculation_variants

from flyer import kernels
from flyer.config import parse_size, preset, resolve_device
from flyer.data.tokenizer import train_bpe
from flyer.interop.export import export, export_model
from flyer.interop.hf import load_hf
from flyer.interop.load import load_pretrained
from flyer.infer.weights import WEIGHT_DTYPES, hold_weights
from flyer.model.transformer import Transformer
from flyer.train.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
GQA_BENCH = dict(attn="gqa", n_heads=16, n_kv_heads=4, head_dim=32)
CLIENT_NICE = 10  # the client processes' niceness (``_drive``)
# up to this many clients, every concurrency sends requests of the same shapes (prompt and output
# lengths), as many as this many clients send: ``ratio_c16_vs_c1`` compares one workload
RATIO_CLIENTS = 16
BENCH_PRESETS = ("small", "tiny-v4")  # --preset: DeepSeek-V3's MLA, DeepSeek-V4's hybrid attention
# tiny-v4's default run (not --full): 64 requests of up to 32 new tokens a concurrency, since its peer
# decodes them one at a time (``_peer_hybrid``); about three minutes on 2 cores
V4_SIZES = dict(requests_per_client=4, new_max=32)
# tiny-v4 with --speculative: its MTP module trained to draft (``_trained``); after 300 steps it keeps ~3/4 of its
# drafts on this bench's prompts, after 150 a twentieth (about a minute and a half of training on 2 cores)
V4_TRAIN_STEPS = 300


def _trained(name: str, steps: int, threads: int, run: Path) -> dict[str, torch.Tensor]:
    """The weights of preset ``name`` after ``steps`` steps of ``flyer train`` on its default text into ``run``
    (``bench/decode.py``'s ``train_checkpoint``: sequences of 64, FP32, main and MTP losses), so that its MTP module
    drafts what the model goes on to say (tiny-v4 after 300 steps keeps most of its drafts on this bench's
    prompts)."""
    train_checkpoint(run, steps, threads, name)
    model, cfg, _ = load_pretrained(run)
    if cfg != preset(name):
        raise RuntimeError(f"flyer train --preset {name} saved another config than the preset's")
    return model.state_dict()


def _model(name: str, weight_dtype: str, state: dict[str, torch.Tensor] | None = None) -> Transformer:
    """Preset ``name``, random weights (seed 0) or ``state`` (``_trained``); with held weights, rounded to BF16
    first (a BF16 checkpoint, the source of an FP8 one): flyer holds them exactly, and the peer's FP32 export has
    the same values."""
    torch.manual_seed(0)
    model = Transformer(preset(name))
    if state is not None:
        model.load_state_dict(state)
    if weight_dtype != "fp32":
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.bfloat16())
    return model


def _fp8_checkpoint(run: Path, out: Path) -> tuple[Path, Transformer]:
    """``run`` exported in DeepSeek's FP8 format (``flyer export --dtype fp8``), what ``flyer serve
    --weight-dtype fp8`` serves; and that checkpoint loaded here as flyer serve loads it (its codes
    and scales held as stored) for the engine-alone runs."""
    export(run, out, dtype="fp8")
    return out, load_hf(out, dtype=torch.float32, held=WEIGHT_DTYPES["fp8"])[0]


def _save_run(out: Path, name: str, weight_dtype: str, state: dict[str, torch.Tensor] | None) -> Path:
    model = _model(name, weight_dtype, state)
    tok = train_bpe(["the quick brown fox jumps over the lazy dog, serving many requests at once"] * 50, 512)
    save_checkpoint(out / "checkpoints", 1, {"model.safetensors": model.state_dict(),
                                             "config.json": model.cfg.to_dict(),
                                             "tokenizer.json": json.loads(tok.to_str())})
    return out


@contextlib.contextmanager
def _engine_model(name: str, weight_dtype: str, serve_threads: int | None, cores: int, device: torch.device,
                  fp8: Transformer | None = None, state: dict[str, torch.Tensor] | None = None):
    """The bench's model (``state``: its trained weights) as ``flyer serve`` runs it, in this process: weights
    held as ``--weight-dtype``, torch on ``--threads`` (its default: all ``cores`` but one), the experts on all
    cores (``--expert-threads``' default), on ``device``. ``fp8``: the FP8 checkpoint loaded, its codes and
    scales held (``_fp8_checkpoint``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(serve_threads or max(1, cores - 1))
    kernels.set_expert_threads(cores)
    if fp8 is not None:
        model = fp8
    else:
        model = _model(name, weight_dtype, state).eval()
        hold_weights(model, WEIGHT_DTYPES[weight_dtype])
    model.to(device)
    try:
        yield model
    finally:
        torch.set_num_threads(threads)
        kernels.set_expert_threads(1)


def _shapes(n: int, args, rng: random.Random, system: list[int]) -> list[tuple[int, int]]:
    """(private prompt tokens, new tokens) of n requests: prompts of ``--prompt-min``..``--prompt-max``
    tokens in all, the shared system prompt included."""
    return [(max(rng.randint(args.prompt_min, args.prompt_max) - len(system), 1),
             rng.randint(args.new_min, args.new_max)) for _ in range(n)]


def _requests(shapes: list[tuple[int, int]], rng: random.Random, system: list[int]) -> list[tuple[list[int], int]]:
    """Requests of those shapes: the system prompt, then fresh random tokens (so that a concurrency
    finds only the system prompt in the prefix cache, not an earlier concurrency's prompts)."""
    return [(system + [rng.randrange(TOKEN_RANGE) for _ in range(own)], new) for own, new in shapes]


def _one(client: httpx.Client, url: str, model: str, prompt: list[int] | str, n: int) -> dict:
    """One streaming completion; (ttft, tpot, tokens) from the client's clock and the usage (else
    the number of chunks)."""
    body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = last = None
    tokens = chunks = 0
    with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            now = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk.get("choices"):
                first = first or now
                last = now
                chunks += 1
    tokens = tokens or chunks
    ttft = (first or last) - t0
    return {"ttft": ttft, "tpot": ((last - first) / max(tokens - 1, 1)) if first else 0.0, "tokens": tokens}


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _client(concurrency: int) -> httpx.Client:
    """The clients' one connection pool, kept alive across requests as API clients (``openai``'s
    among them) keep theirs: a new ``httpx.Client`` per request costs ~30 ms of CPU (its TLS
    context) on the cores the server runs on, and as much again on each request's TTFT."""
    return httpx.Client(timeout=3600, limits=httpx.Limits(max_connections=concurrency,
                                                            max_keepalive_connections=concurrency))


def _drive_here(url: str, model: str, reqs, concurrency: int) -> dict:
    t0 = time.perf_counter()
    with _client(concurrency) as client, ThreadPoolExecutor(concurrency) as pool:
        res = list(pool.map(lambda r: _one(client, url, model, *r), reqs))
    wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in res)
    return {"tokens_per_s": tokens / wall, "ttft_p50_ms": 1e3 * _pct([r["ttft"] for r in res], 0.5),
            "ttft_p99_ms": 1e3 * _pct([r["ttft"] for r in res], 0.99),
            "tpot_p50_ms": 1e3 * _pct([r["tpot"] for r in res], 0.5),
            "tpot_p99_ms": 1e3 * _pct([r["tpot"] for r in res], 0.99), "tokens": tokens, "wall_s": wall}


def _drive(url: str, model: str, reqs, concurrency: int) -> dict:
    """``_drive_here`` in a child process at nice ``CLIENT_NICE``: the clients stand in for remote
    users, so on a host of a few cores they take what the server leaves instead of preempting its
    model thread (the peer's server gets the same clients)."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1, initializer=os.nice, initargs=(CLIENT_NICE,)) as pool:
        return pool.apply(_drive_here, (url, model, reqs, concurrency))


def _start_flyer(run: Path, args) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    cmd = [sys.executable, "-m", "flyer", "serve", "--ckpt", str(run), "--port", "0", "--kv-cache-memory",
           args.kv_cache_memory, "--cache-dtype", "fp32", "--model-name", args.preset,
           "--max-batch-size", str(MAX_BATCH), "--prefill-chunk", str(args.prefill_chunk),
           "--weight-dtype", args.weight_dtype, "--device", args.device]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.speculative:
        cmd += ["--speculative", args.speculative, "--draft-tokens", str(args.draft_tokens)]
    if args.speculative_max_batch:
        cmd += ["--speculative-max-batch", str(args.speculative_max_batch)]
    if not args.prefix_sharing:
        cmd += ["--no-prefix-sharing"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    if "ready on" not in line:
        proc.kill()
        raise RuntimeError(f"flyer serve did not start: {line}{proc.stderr.read()[-2000:]}")
    return proc, line.split()[4]


def _metrics(url: str, *names: str) -> list[float]:
    """The server's current value of each Prometheus metric (0 when absent)."""
    text = httpx.get(url + "/metrics").text
    return [float(m.group(1)) if (m := re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)) else 0.0
            for name in names]


def _hf_model(hf_dir: Path, threads: int, device: torch.device):
    """The peer: transformers' model of the export, FP32, on ``threads`` torch threads."""
    from transformers import AutoModelForCausalLM  # noqa: F401 the peer's import, only when it runs

    torch.set_num_threads(threads)
    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval().to(device)


def _hf_batch(model, batch, device: torch.device) -> list[list[int]]:
    """Each (prompt, n) of ``batch``'s n greedy tokens from one ``generate``: left-padded to the longest
    prompt (none with one request), every row run to the batch's largest n."""
    T = max(len(p) for p, _ in batch)
    ids = torch.zeros(len(batch), T, dtype=torch.long)
    mask = torch.zeros(len(batch), T, dtype=torch.long)
    for i, (p, _) in enumerate(batch):
        ids[i, T - len(p):] = torch.tensor(p)
        mask[i, T - len(p):] = 1
    n = max(k for _, k in batch)
    with torch.inference_mode():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, pad_token_id=0)
    return [out[i, T:T + k].tolist() for i, (_, k) in enumerate(batch)]  # past a request's own n: waste


def _peer_generate(model, reqs, rows: int, device: torch.device) -> dict:
    """transformers' generate on the same requests: greedy batches of ``rows`` requests in arrival order,
    one after another (static batching; ``rows`` 1: each request alone, unpadded), after a warm-up request
    (flyer serve gets one too: the first calls of a fresh model pay one-time setup). Output tokens/s and
    each request's tokens."""
    _hf_batch(model, [(reqs[0][0], 2)], device)
    outputs, t0 = [], time.perf_counter()
    for b in range(0, len(reqs), rows):
        outputs += _hf_batch(model, reqs[b:b + rows], device)
    wall = time.perf_counter() - t0
    useful = sum(len(o) for o in outputs)
    return {"tokens_per_s": useful / wall, "wall_s": wall, "tokens": useful, "outputs": outputs}


def _peer_hybrid(model, reqs, concurrency: int, device: torch.device, out: dict) -> dict:
    """The V4 peer: its batched generate where left padding leaves every row of the first batch its
    unpadded tokens, else each request alone (what is correct), with the reason in ``out["peer_note"]``."""
    alone = _peer_generate(model, reqs, 1, device)
    first = reqs[:concurrency]
    padded = _hf_batch(model, first, device)
    agree = sum(a == b for a, b in zip(padded, alone["outputs"]))
    out.update(peer_padded_rows_agree=agree, peer_padded_rows=len(first))
    if agree == len(first):
        out["peer"] = "transformers generate (batched)"
        return _peer_generate(model, reqs, concurrency, device)
    out["peer"] = "transformers generate (per request, unpadded)"
    why = (f"batched generate is not V4 with padding: {len(first) - agree} of {len(first)} left-padded rows of the "
           "first batch gave other greedy tokens than the request alone (DeepseekV4's compressors pool tokens by "
           "their place in the padded row, pads included, and place their windows from there); the peer is "
           "generate on each request alone")
    out["peer_note"] = "; ".join(filter(None, (out.get("peer_note"), why)))
    return alone


def _peer_serve(hf_dir: Path, reqs, concurrency: int, threads: int, device: torch.device) -> dict:
    """``transformers serve --continuous-batching`` on the exported weights, same clients. Raises
    with the server's own message when it does not start or fails its first request."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    with socket.socket() as s:  # a free port for it (it takes no port 0)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # its completions take text prompts only: the same token ids, decoded by the exported tokenizer
    tok = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    reqs = [(tok.decode(p), n) for p, n in reqs]
    proc = subprocess.Popen([sys.executable, "-m", "transformers.cli.transformers", "serve", "--continuous-batching",
                             "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--device", str(device),
                             str(hf_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            if proc.poll() is not None:
                raise RuntimeError(proc.stdout.read()[-1500:])
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        first = httpx.post(url + "/v1/completions", timeout=600,
                           json={"model": str(hf_dir), "prompt": reqs[0][0], "max_tokens": 2, "temperature": 0})
        if first.status_code != 200 or not first.json().get("choices"):
            raise RuntimeError(f"its first completion answered {first.status_code}: {first.text[:400]}")
        return _drive(url, str(hf_dir), reqs, concurrency)
    finally:
        # its continuous-batching worker thread can outlive SIGTERM (seen here after a failed
        # request, the process holding 12 GB): killed after a grace period, never left behind
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=BENCH_PRESETS, default="small",
                    help="the served model: small (DeepSeek-V3's MLA) or tiny-v4 (DeepSeek-V4's hybrid attention)")
    ap.add_argument("--full", action="store_true", help="the issue's sizes (long on a small CPU)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=None)
    ap.add_argument("--requests-per-client", type=int, default=None,
                    help="requests each client sends, one after another (steady load, not one burst; default 16, "
                         "--full 4); fewer than 16 clients send as many requests as 16 do, of the same prompt and "
                         "output lengths")
    ap.add_argument("--system-prompt", type=int, default=None, help="shared system prompt tokens")
    ap.add_argument("--prompt-min", type=int, default=None)
    ap.add_argument("--prompt-max", type=int, default=None)
    ap.add_argument("--new-min", type=int, default=None)
    ap.add_argument("--new-max", type=int, default=None)
    ap.add_argument("--kv-cache-memory", default="512M")
    ap.add_argument("--payoff-memory", default="256M", help="cache size of the MLA/GQA sequence count")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of flyer serve and of the peer (default: each its own: flyer serve all "
                         "cores but one, left to HTTP; the peer, in-process without HTTP, all cores)")
    ap.add_argument("--prefill-chunk", type=int, default=256, help="flyer serve's prompt tokens per scheduler step")
    ap.add_argument("--weight-dtype", choices=list(WEIGHT_DTYPES), default=None,
                    help="flyer serve --weight-dtype (bf16, the CPU's default: the weights saved as BF16 values, held "
                         "in BF16 and computed in FP32; the peer computes in FP32 on the same values; fp32 on CUDA; "
                         "fp8: served from the run exported in DeepSeek's FP8 format, the peer on its values in FP32)")
    ap.add_argument("--device", default="cpu", help="flyer serve --device, the engine's and the peer's (cpu or cuda)")
    ap.add_argument("--decode-context", type=int, default=None,
                    help="context of the in-process decode-step keys (default: the prompts' mean length)")
    ap.add_argument("--speculative", choices=["mtp"], default=None, help="flyer serve --speculative (the engine's too)")
    ap.add_argument("--draft-tokens", type=int, default=1, help="flyer serve --draft-tokens (with --speculative)")
    ap.add_argument("--speculative-max-batch", type=int, default=None, metavar="N",
                    help="flyer serve --speculative-max-batch (with --speculative; the engine's too, which also "
                         "replays the requests without it)")
    ap.add_argument("--train-steps", type=int, default=None,
                    help="serve the preset trained this many steps (bench/decode.py's flyer train run; default "
                         f"{V4_TRAIN_STEPS} for tiny-v4 with --speculative, whose random MTP module drafts nothing it "
                         "keeps, else 0: random weights)")
    ap.add_argument("--no-prefix-sharing", dest="prefix_sharing", action="store_false",
                    help="flyer serve --no-prefix-sharing (the engine's too)")
    ap.add_argument("--no-peer-serve", dest="peer_serve", action="store_false",
                    help="skip transformers serve --continuous-batching (tried first by default)")
    args = ap.parse_args()
    device = resolve_device(args.device)
    hybrid = preset(args.preset).attn == "hybrid"
    if args.train_steps is None:
        args.train_steps = V4_TRAIN_STEPS if hybrid and args.speculative else 0
    if args.speculative_max_batch is not None and (args.speculative_max_batch < 1 or not args.speculative):
        ap.error(f"--speculative-max-batch: must be >= 1 and needs --speculative (got {args.speculative_max_batch})")
    if args.train_steps < 0:
        ap.error(f"--train-steps: must be >= 0 (0: random weights), got {args.train_steps}")
    if args.weight_dtype is None:
        args.weight_dtype = "bf16" if device.type == "cpu" else "fp32"  # held BF16 weights are a CPU kernel path
    # 16 requests a client: with 4, the batch shrinking from 16 requests to none after the last
    # submission took 30% of a 16-client run's steps (7% with 16); --full's are longer already
    sizes = dict(concurrency=[1, 4, 16, 64], system_prompt=48, prompt_min=64, prompt_max=1024, new_min=64,
                 new_max=256, requests_per_client=4) if args.full else \
        dict(concurrency=[1, 4, 16], system_prompt=32, prompt_min=48, prompt_max=128, new_min=16, new_max=48,
             requests_per_client=16)
    if hybrid and not args.full:
        sizes.update(V4_SIZES)
    for k, v in sizes.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    cores = torch.get_num_threads()  # before --threads: flyer serve's own defaults count from it
    if args.threads:
        torch.set_num_threads(args.threads)
    out: dict = {"preset": args.preset, "device": str(device), "threads": args.threads or "default",
                 "kv_cache_memory": args.kv_cache_memory, "weight_dtype": args.weight_dtype,
                 "prompt_tokens": [args.prompt_min, args.prompt_max], "new_tokens": [args.new_min, args.new_max],
                 "system_prompt_tokens": args.system_prompt, "speculative": args.speculative,
                 "draft_tokens": args.draft_tokens if args.speculative else None,
                 "speculative_max_batch": args.speculative_max_batch,
                 "prefix_sharing": args.prefix_sharing, "train_steps": args.train_steps}
    rng = random.Random(0)
    system = [rng.randrange(TOKEN_RANGE) for _ in range(args.system_prompt)]
    shapes = _shapes(max(max(args.concurrency), RATIO_CLIENTS) * args.requests_per_client, args, rng, system)
    sent: dict[int, list] = {}  # the requests the clients sent, per concurrency
    with tempfile.TemporaryDirectory() as tmp:
        state = None
        if args.train_steps:
            t0 = time.perf_counter()
            state = _trained(args.preset, args.train_steps, args.threads or cores, Path(tmp) / "trained")
            out["train_s"] = time.perf_counter() - t0
        run = ckpt = _save_run(Path(tmp) / "run", args.preset, args.weight_dtype, state)
        fp8 = None
        if args.weight_dtype == "fp8":  # served as DeepSeek publishes its checkpoints, FP8 held as stored
            ckpt, fp8 = _fp8_checkpoint(run, Path(tmp) / "fp8")
        proc, url = _start_flyer(ckpt, args)
        try:
            with _client(1) as client:
                _one(client, url, args.preset, system + [1, 2, 3], 4)  # warm-up
            spec = ("flyer_spec_draft_tokens_total", "flyer_spec_accepted_tokens_total", "flyer_spec_off_steps_total")
            steps = ("flyer_step_seconds_sum", "flyer_step_seconds_count",
                     'flyer_fixed_shape_steps_total{how="cuda_graph"}')
            for c in args.concurrency:
                reqs = _requests(shapes[:max(c, RATIO_CLIENTS) * args.requests_per_client], rng, system)
                before = _metrics(url, *spec, *steps)
                res = _drive(url, args.preset, reqs, c)
                out[f"tokens_per_s_c{c}"] = res["tokens_per_s"]
                for k in ("ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms"):
                    out[f"{k}_c{c}"] = res[k]
                hit_rate, drafted, accepted, off, busy, n_steps, graphed = _metrics(
                    url, "flyer_prefix_cache_hit_rate", *spec, *steps)
                out[f"prefix_hit_rate_c{c}"] = hit_rate
                out[f"busy_share_c{c}"] = (busy - before[3]) / res["wall_s"]
                out[f"step_ms_c{c}"] = 1e3 * (busy - before[3]) / max(n_steps - before[4], 1)
                out[f"graph_step_share_c{c}"] = (graphed - before[5]) / max(n_steps - before[4], 1)
                if args.speculative:  # this concurrency's drafts: accepted / verified
                    out[f"draft_acceptance_c{c}"] = round((accepted - before[1]) / max(drafted - before[0], 1), 4)
                if args.speculative_max_batch:  # its steps over the cutoff
                    out[f"spec_off_steps_c{c}"] = int(off - before[2])
                sent[c] = reqs
            out["cuda_graphs_served"] = int(_metrics(url, "flyer_cuda_graphs")[0])
        finally:
            proc.terminate()
            out["flyer_exit_code"] = proc.wait(timeout=120)
        cmax = max(args.concurrency)
        peer_reqs = sent[cmax]
        hf_dir = Path(tmp) / "hf"
        if fp8 is not None:  # the FP8 checkpoint's values, in FP32
            model, _, tok = load_hf(ckpt, dtype=torch.float32)
            export_model(model, tok, hf_dir, "fp32")
            del model
        else:
            export(run, hf_dir, dtype="fp32")
        peer = None
        fallback = "the peer is transformers' " + ("generate on the same requests, batched where padding allows"
                                                   if hybrid else "batched generate on the same requests")
        if args.peer_serve:
            try:
                peer = _peer_serve(hf_dir, peer_reqs, cmax, torch.get_num_threads(), device)
                out["peer"] = "transformers serve --continuous-batching"
            except Exception as e:  # the reason goes into the JSON
                last = [ln for ln in str(e).splitlines() if ln.strip()][-1:] or [type(e).__name__]
                out["peer_note"] = (f"transformers serve --continuous-batching did not serve here ({last[0][:400]}); "
                                    f"{fallback}")
        else:
            out["peer_note"] = f"--no-peer-serve: {fallback}"
        if peer is None:
            model = _hf_model(hf_dir, torch.get_num_threads(), device)
            if hybrid:
                peer = _peer_hybrid(model, peer_reqs, cmax, device, out)
            else:
                peer = _peer_generate(model, peer_reqs, cmax, device)
                out["peer"] = "transformers generate (batched)"
            del model
        out[f"peer_tokens_per_s_c{cmax}"] = peer["tokens_per_s"]
    if "tokens_per_s_c16" in out and "peer_tokens_per_s_c16" in out:
        out["ratio_c16_vs_peer"] = out["tokens_per_s_c16"] / out["peer_tokens_per_s_c16"]
    if "tokens_per_s_c1" in out and "tokens_per_s_c16" in out:
        out["ratio_c16_vs_c1"] = out["tokens_per_s_c16"] / out["tokens_per_s_c1"]
        out["weight_mb_per_token_c1"], out["weight_mb_per_token_c16"] = (
            weight_bytes_per_token(args.preset, n, args.weight_dtype) / 1e6 for n in (1, 16))
        out["ratio_c16_vs_c1_memory_bound"] = out["weight_mb_per_token_c1"] / out["weight_mb_per_token_c16"]
        context = args.decode_context or (args.prompt_min + args.prompt_max) // 2
        out["decode_context"] = context
        with _engine_model(args.preset, args.weight_dtype, args.threads, cores, device, fp8, state) as model:
            for c in (1, 16):
                stats, outputs = engine_replay(model, sent[c], c, args)
                if args.speculative:  # the same requests without speculation, and without sharing
                    stats.update(speculation_variants(model, sent[c], c, args, stats, outputs))
                for k, v in stats.items():
                    out[f"engine_{k}_c{c}"] = v
                if c == cmax and "outputs" in peer:  # the same requests' greedy tokens, flyer's and the peer's
                    out["flyer_peer_outputs_agree"] = sum(a == b for a, b in zip(outputs, peer["outputs"]))
                    out["flyer_peer_outputs"] = len(outputs)
            out.update(decode_steps(model, (1, 16), context))
            out.update(mixed_steps(model, 16, context, args.prefill_chunk))
        out["engine_ratio_c16_vs_c1"] = out["engine_tokens_per_s_c16"] / out["engine_tokens_per_s_c1"]
        out["ratio_decode_b16_vs_b1"] = 16 * out["decode_step_ms_b1"] / out["decode_step_ms_b16"]
        if "decode_step_ms_b16_gathered" in out:
            out["speedup_in_place_vs_gathered_b16"] = out["decode_step_ms_b16_gathered"] / out["decode_step_ms_b16"]
    memory = parse_size(args.payoff_memory, "payoff_memory")
    out["payoff_memory"] = args.payoff_memory
    if hybrid:
        out.update(hybrid_capacity(memory))
    else:
        (mla, mla_bpt), (gqa, gqa_bpt) = (max_seqs(over, memory, 2048) for over in ({}, GQA_BENCH))
        out.update(max_seqs_mla=mla, max_seqs_gqa=gqa, cache_bytes_per_token_mla=mla_bpt,
                   cache_bytes_per_token_gqa=gqa_bpt, seqs_ratio=mla / max(gqa, 1), bytes_ratio=gqa_bpt / mla_bpt)
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}))


if __name__ == "__main__":
    main()
