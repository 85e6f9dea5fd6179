"""``flyer generate``: text generation from a trained checkpoint (or a Hugging Face model directory)
with a latent (MLA), per-head or DeepSeek-V4 hybrid cache, optional MTP speculative decoding and an on-disk
prefix cache."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import sys
import warnings

import torch

from flyer import kernels
from flyer.config import parse_size, resolve_config, resolve_device
from flyer.data.chat_template import chat_renderer, read_chat_template
from flyer.data.fim import fim_prompt
from flyer.errors import CheckpointError, FieldError, UserError
from flyer.fp8.fp4 import fp4_experts
from flyer.fp8.linear import convert_to_fp8
from flyer.infer.cache import ATTENTION_MODES
from flyer.infer.cache_fp8 import FP8, check_fp8_cache_flags
from flyer.infer.generate import GenerationConfig, check_hybrid_flags, generate, open_prefix_cache
from flyer.infer.prefix_cache_hybrid import check_block_ratios
from flyer.infer.weights import WEIGHT_DTYPES, hold_weights
from flyer.interop.hf import is_hf_model_dir, read_hf_config
from flyer.interop.load import fp4_trained, load_pretrained, loaded_bytes, stored_weight_dtype
from flyer.model.counts import param_counts
from flyer.model.transformer import Transformer
from flyer.parse import is_token_id, is_unicode
from flyer.runtime import check_threads, require_memory

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp8": FP8}  # --cache-dtype
STORED = "stored"  # --weight-dtype auto off the CPU: the checkpoint's own dtype (BF16 on a GPU), not held
ZERO_OK = {"temperature", "seed"}  # numeric flags that may be 0 (flyer.cli: the others must be > 0)
PATHS = {"ckpt", "prefix_cache"}  # paths that may not be empty (flyer.cli)
SIGNED = {"eos_id", "frequency_penalty", "presence_penalty"}  # eos_id -1: no stop token; penalties in [-2, 2]
FP4_NOTE = ("note: {ckpt} was trained with FP4 QAT (--fp4-experts): its routed experts run as their FP4 values, the "
            "model training optimised and validated (flyer export --masters writes the FP32 masters)")
DEFAULT_PREFIX_BLOCK = 64  # tokens a prefix cache block holds (--prefix-block)


class ByteTokenizer:
    """UTF-8 bytes as token ids (for ``--preset``: a randomly initialised model has no tokenizer)."""

    def encode_ids(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        return list(text.encode("utf-8"))  # bytes have no special tokens to add

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def eos_id(self) -> int | None:
        return None

    def eos_ids(self) -> tuple[int, ...]:
        return ()

    def fim_tokens(self) -> None:
        return None  # bytes have no fill-in-the-middle markers


def check_checkpoint_eos(tok, ckpt: str | None, vocab_size: int, remedy: str) -> None:
    """``CheckpointError`` naming the checkpoint when one of its end-of-text ids is outside the model's
    vocabulary (a stop that could never be sampled: generation would run to its limit); ``remedy``
    ends the message."""
    if (eos := next((e for e in tok.eos_ids() if not 0 <= e < vocab_size), None)) is not None:
        raise CheckpointError(f"{ckpt}: its end-of-text id {eos} (generation_config.json's eos_token_id, else "
                              f"config.json's or the tokenizer's) is outside this model's vocabulary "
                              f"[0, {vocab_size}); {remedy}")


def add_expert_threads_flag(p) -> None:
    p.add_argument("--expert-threads", type=int, default=torch.get_num_threads(),
                   help="threads the larger kernel calls of a step split over where --threads is 1: the routed "
                        "experts' and held weights' GEMMs, prefill chunks' among them, and attention over the "
                        "cache (default: all cores; at most 4 per core)")


def add_weight_dtype_flag(p) -> None:
    p.add_argument("--weight-dtype", choices=["auto", *WEIGHT_DTYPES], default="auto",
                   help="dtype the GEMM weights are held in, computing in FP32 (CPU): bf16 halves their memory "
                        "and the bytes a decode step reads (lossless for a BF16 checkpoint); fp8 holds them as "
                        "DeepSeek's FP8 checkpoints do, E4M3 with 128x128 block scales, a quarter of FP32 "
                        "(lossless for such a checkpoint, V3's or V4's: its own codes, V4's FP4 experts as the same "
                        "values in E4M3 blocks, its BF16 weights in BF16; others are quantized; flyer.infer.weights). "
                        "fp32: FP32 weights and compute, on any device. auto (default): on the CPU, the smallest that "
                        "holds the checkpoint's weights losslessly (faster than computing in BF16): fp8 for "
                        "DeepSeek's FP8 and FP8 with a scale per tensor or 128-multiple blocks (compressed-tensors, "
                        "ModelOpt); bf16 for a BF16 checkpoint, INT4/INT8 or per-channel FP8 with BF16 scales, "
                        "MXFP4; else fp32 (NVFP4, FP16/FP32 scales); on other devices the checkpoint's own dtype, "
                        "not held; fp32 with --precision fp8 and for --preset")


def resolve_weight_dtype(args, device: torch.device) -> str:
    """``--weight-dtype`` with auto settled (``add_weight_dtype_flag``): a key of ``WEIGHT_DTYPES``, or
    ``STORED`` (auto off the CPU: the checkpoint's own dtype, not held)."""
    if args.weight_dtype != "auto":
        return args.weight_dtype
    if args.precision == "fp8" or not args.ckpt:
        return "fp32"
    if device.type != "cpu":
        return STORED
    try:
        return stored_weight_dtype(args.ckpt)
    except (OSError, ValueError, KeyError) as e:
        raise FieldError("ckpt", f"cannot load checkpoint '{args.ckpt}': {_first_line(e)}") from None


@contextlib.contextmanager
def _library_warnings():
    """Re-issue the warnings raised inside once each: each loading step resolves the checkpoint,
    warning again about the same corrupt one."""
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            yield
    finally:  # an error after a warning (no valid checkpoint left) still shows the warning first
        seen = set()
        for w in caught:
            text = str(w.message)
            if text not in seen:
                seen.add(text)
                warnings.warn(text, w.category, stacklevel=3)


def _with_library_warnings(f):
    @functools.wraps(f)
    def wrapped(*args, **kwargs):
        with _library_warnings():
            return f(*args, **kwargs)
    return wrapped


def decodable(cfg, args) -> None:
    """Refuses, naming the flag's field, block sizes DeepSeek-V4's hybrid attention cannot take: ``flyer
    generate``'s --prefix-block under --prefix-cache (``check_hybrid_flags``), ``flyer serve``'s --block-size (its
    pool's blocks and its on-disk prefix cache's; unset: a default every ratio divides), unless every compression
    ratio divides it (``args``: either command's parsed flags)."""
    if cfg.attn != "hybrid":
        return
    if hasattr(args, "prefix_block"):
        check_hybrid_flags(cfg, args.prefix_cache, args.prefix_block)
    elif getattr(args, "block_size", None) is not None:
        check_block_ratios(cfg, args.block_size, "block_size")


@_with_library_warnings
def load_model(args, beside: tuple[str, str, int] | None = None):
    """(model, tokenizer) from ``args.ckpt`` or ``args.preset`` (random weights, byte tokens), on
    ``args.device``, FP8 linears with ``args.precision == 'fp8'``, GEMM weights held in
    ``args.weight_dtype`` (an FP32 model on the CPU). ``beside``: (field, what, bytes) the caller
    allocates on the device next (flyer serve's cache), refused up front with the model's bytes
    when both do not fit. A hybrid model under flags it cannot take is refused (``decodable``). A run trained
    with FP4 QAT loads its routed experts as their FP4 values (``flyer.interop.load``), and says so on stderr."""
    device = resolve_device(args.device)
    args.weight_dtype = resolve_weight_dtype(args, device)
    held = WEIGHT_DTYPES.get(args.weight_dtype, torch.float32)
    if held != torch.float32:
        if args.precision == "fp8":
            raise FieldError("weight_dtype", f"{args.weight_dtype} holds the weights for FP32 compute; --precision "
                                             "fp8 runs FP8 GEMMs on them: choose one")
        if device.type != "cpu":
            raise FieldError("weight_dtype", f"{args.weight_dtype}-held weights run on flyer's CPU kernels (device "
                                             f"is {device}): add --device cpu, or hold them in fp32")
    if args.ckpt:
        if is_hf_model_dir(args.ckpt):  # refused before the weights load (a run's config: as it loads)
            try:
                source = read_hf_config(args.ckpt)[0]
            except (OSError, ValueError, KeyError) as e:
                raise FieldError("ckpt", f"cannot load checkpoint '{args.ckpt}': {_first_line(e)}") from None
            decodable(source, args)
        # FP8 GEMMs requantize the weights in 128x128 blocks: from FP32 they are the file's FP8 blocks;
        # held weights are computed in FP32, and written as held while they load; only STORED keeps the file's dtype
        dtype = None if args.weight_dtype == STORED else torch.float32
        try:
            need = loaded_bytes(args.ckpt, dtype, held)
        except (OSError, ValueError, KeyError) as e:
            raise FieldError("ckpt", f"cannot load checkpoint '{args.ckpt}': {_first_line(e)}") from None
        require_memory(need, device, "ckpt", f"checkpoint '{args.ckpt}' as loaded (weights {args.weight_dtype})")
        _require_beside(need, device, beside)
        try:
            model, cfg, tok = load_pretrained(args.ckpt, device=device, dtype=dtype, held=held)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise FieldError("ckpt", f"cannot load checkpoint '{args.ckpt}': {_first_line(e)}") from None
        decodable(cfg, args)
        qat = fp4_trained(args.ckpt)
        if qat:
            print(FP4_NOTE.format(ckpt=args.ckpt), file=sys.stderr)
        if args.precision == "fp8":
            model = convert_to_fp8(model)
            if qat:  # FP8 experts as QAT trained them: power-of-two block scales, which hold the FP4 values exactly
                fp4_experts(model)
        return model, tok
    cfg = resolve_config(args.preset)
    decodable(cfg, args)
    if cfg.vocab_size < 256:
        raise FieldError("preset", f"{args.preset}: byte tokens need vocab_size >= 256 (got {cfg.vocab_size})")
    n = param_counts(cfg).total  # built in FP32 on the CPU, then moved
    require_memory(4 * n, "cpu", "preset", f"{args.preset} ({n / 1e9:,.1f}B parameters in FP32)")
    _require_beside(4 * n, device, beside)
    with torch.random.fork_rng(devices=[]):  # the preset's weights are seed 0's: --seed is the sampling's alone
        torch.manual_seed(0)
        model, tok = Transformer(cfg).to(device), ByteTokenizer()
    try:
        hold_weights(model, held)
    except ValueError as e:  # NaN weights
        raise FieldError("preset", str(e)) from None
    return model, tok


def _require_beside(model_bytes: int, device: torch.device, beside: tuple[str, str, int] | None) -> None:
    if beside is not None:
        field, what, nbytes = beside
        require_memory(model_bytes + nbytes, device, field, f"{what} beside the model's {model_bytes / 2**30:,.1f} GiB")


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


CACHE_DTYPE_HELP = ("auto: fp32 for a checkpoint computed in FP32 (a flyer run, or a Hugging Face directory stored in "
                    "FP32 or its weights held by --weight-dtype, auto's choice on the CPU), so greedy tokens match "
                    "transformers' FP32 model and a run's its FP32 export's; else bf16 (half the cache bytes per "
                    "token); fp8: MLA's latent in DeepSeek's FP8 rows (E4M3 with "
                    "a power-of-two FP32 scale per 128 values, the rope key in BF16: 656 bytes a token and layer in "
                    "V3, BF16's 1,152); DeepSeek-V4's window keys and compressed entries in its own FP8 rows (a "
                    "UE8M0 scale per 64 values, the rope part BF16: 584 bytes, BF16's 1,024)")


def auto_cache_dtype(ckpt: str | None, model: Transformer) -> str:
    """"fp32" for a checkpoint (an HF import, a flyer run) computed in FP32, so greedy tokens match transformers' (and
    a run's, its FP32 export's); "bf16" for a preset's random weights and a model computed in BF16."""
    return "fp32" if ckpt and model.embed.weight.dtype == torch.float32 else "bf16"


def parse_logit_bias(items: list[str]) -> tuple[tuple[int, float], ...]:
    """``--logit-bias ID=VALUE`` items as (token id, value) pairs; a token given twice keeps its last
    value, as OpenAI's JSON object would."""
    bias: dict[int, float] = {}
    for item in items:
        tid, sep, value = item.partition("=")
        try:
            if not (sep and is_token_id(tid)):
                raise ValueError
            bias[int(tid)] = float(value)
        except ValueError:
            raise FieldError("logit_bias", f"expected ID=VALUE, a token id and a number (got {item!r})") from None
    return tuple(bias.items())


def chat_prompts(tok, ckpt: str | None, prompts: list[str], system: str | None) -> list[list[int]]:
    """``--chat``: each prompt a user message (after ``system``'s), rendered by ``ckpt``'s chat template with the
    assistant's header, as ``flyer serve``'s chat route renders it (flyer's default template without one), and
    encoded as transformers encodes a rendered template: no special tokens but those it writes."""
    import jinja2  # for its errors; here, as chat_renderer imports it: ~40 ms every flyer command would pay at start

    named = getattr(tok, "special_tokens", None)  # byte tokens (a --preset) have none
    render = chat_renderer(read_chat_template(ckpt), named() if named is not None else {})
    head = [{"role": "system", "content": system}] if system is not None else []
    try:
        return [tok.encode_ids(render([*head, {"role": "user", "content": p}]), add_special_tokens=False)
                for p in prompts]
    except jinja2.TemplateError as e:
        raise FieldError("chat", f"the chat template cannot render the prompt: {e}") from None


def _run(args) -> int:
    if bool(args.ckpt) == bool(args.preset):
        raise UserError("give exactly one of --ckpt DIR (a trained run) or --preset NAME (random weights)")
    if args.chat and args.suffix is not None:
        raise UserError("--suffix fills in the middle of a plain prompt: not with --chat")
    if args.system is not None and not args.chat:
        raise UserError("--system is a chat's system message: give --chat with it")
    if args.prefix_block is not None and args.prefix_cache is None:  # it would change nothing
        raise UserError("--prefix-block sizes the prefix cache's blocks: give --prefix-cache DIR with it")
    args.prefix_block = DEFAULT_PREFIX_BLOCK if args.prefix_block is None else args.prefix_block
    if args.prefix_block < 1:
        raise FieldError("prefix_block", f"must be >= 1 (got {args.prefix_block})")
    check_threads(args.threads, "threads")
    check_threads(args.expert_threads, "expert_threads")
    dtype = DTYPES.get(args.cache_dtype, torch.bfloat16)  # "auto": settled once the model is loaded
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                           seed=args.seed, attention=args.attention, cache_dtype=dtype,
                           speculative=args.speculative, draft_tokens=args.draft_tokens,
                           prefill_chunk=args.prefill_chunk, logit_bias=parse_logit_bias(args.logit_bias),
                           frequency_penalty=args.frequency_penalty, presence_penalty=args.presence_penalty)
    gen.validate()  # before the model loads
    torch.set_num_threads(args.threads)
    kernels.set_expert_threads(args.expert_threads)
    model, tok = load_model(args)
    model.eval()
    cfg = model.cfg
    if args.cache_dtype == "auto":
        args.cache_dtype = auto_cache_dtype(args.ckpt, model)
        dtype = gen.cache_dtype = DTYPES[args.cache_dtype]
    if args.speculative == "mtp" and len(model.mtp) == 0:
        raise FieldError("speculative", "mtp needs a model trained with MTP (mtp_depth >= 1; this one has 0)")
    check_fp8_cache_flags(cfg, dtype, args.attention)
    if args.attention == "naive" and cfg.attn != "mla":
        raise FieldError("attention", f"naive applies to MLA models only (this model uses {cfg.attn.upper()})")
    for name, texts in (("prompt", args.prompt), ("suffix", [args.suffix or ""]), ("system", [args.system or ""])):
        if not all(is_unicode(t) for t in texts):  # a byte the shell passed that is no UTF-8 (surrogateescape)
            raise FieldError(name, "is not UTF-8 text")
    if args.chat:
        prompts = chat_prompts(tok, args.ckpt, args.prompt, args.system)
    else:  # --suffix: each prompt's fill-in-the-middle prompt (flyer.data.fim); "" as none, as the API takes it
        prompts = [fim_prompt(tok, p, args.suffix) if args.suffix else tok.encode_ids(p) for p in args.prompt]
    if any(len(p) == 0 for p in prompts):
        raise FieldError("prompt", "every prompt must encode to at least one token")
    V = cfg.vocab_size
    for i, p in enumerate(prompts):  # a tokenizer larger than the model's embedding
        if (bad := next((t for t in p if not 0 <= t < V), None)) is not None:
            raise FieldError("prompt", f"prompt {i + 1} encodes to token id {bad}, outside this model's "
                                       f"vocabulary [0, {V}): the tokenizer does not fit the model")
    # --eos-id replaces the checkpoint's stop ids (all of a list, e.g. Llama 3's two) with one, or none
    stops = tok.eos_ids() if args.eos_id is None else () if args.eos_id == -1 else (args.eos_id,)
    if args.eos_id is None:
        check_checkpoint_eos(tok, args.ckpt, V, "pass --eos-id ID, or -1 for none")
    elif (eos := next((e for e in stops if not 0 <= e < V), None)) is not None:
        raise FieldError("eos_id", f"must be a token id in [0, {V}) of this model (got {eos})")
    pc = None
    if args.prefix_cache:
        pc = open_prefix_cache(model, args.prefix_cache, attention=args.attention, cache_dtype=dtype,
                               block_size=args.prefix_block,
                               max_bytes=parse_size(args.prefix_cache_size, "prefix_cache_size"))
    res = generate(model, prompts, dataclasses.replace(gen, eos_id=stops[0] if stops else None, stop_ids=stops[1:],
                                                       prefix_cache=pc))
    texts = [tok.decode([t for t in toks if t not in stops]) for toks in res.tokens]
    totals = pc.record_stats() if pc is not None else None
    if args.json:
        out = {"text": texts[0], **({"texts": texts} if len(texts) > 1 else {}), "token_ids": res.tokens,
               **res.as_dict(),
               "attention": args.attention if cfg.attn == "mla" else cfg.attn, "cache_dtype": args.cache_dtype,
               "weight_dtype": args.weight_dtype}
        if args.speculative:
            out["speculative"] = args.speculative
        if totals is not None:
            out["prefix_cache_total"] = totals
        print(json.dumps(out))
        return 0
    for t in texts:
        print(t)
    sys.stdout.flush()  # the text first, then the statistics on stderr
    d = res.as_dict()
    line = (f"{d['new_tokens']} tokens, {d['tokens_per_s']:.1f} tokens/s ({d['decode_tokens_per_s']:.1f} decode), "
            f"prefill {d['prefill_s']:.3f}s, cache {d['cache_bytes_per_token']:,} bytes/token ({args.cache_dtype})"
            + (f" + {d['mtp_cache_bytes_per_token']:,} for the MTP module's" if d.get("mtp_cache_bytes_per_token")
               else ""))
    if res.acceptance_rate is not None:
        line += f", MTP acceptance {res.acceptance_rate:.1%}"
    print(line, file=sys.stderr)
    if pc is not None:
        print(pc.summary(), file=sys.stderr)
        print(f"prefix cache (all runs): hit rate {totals['hit_rate']:.1%} over {totals['lookups']} lookups",
              file=sys.stderr)
    return 0


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text with the latent KV cache (MTP speculation, prefix cache)")
    src = p.add_argument_group("model")
    src.add_argument("--ckpt", help="a training run directory (newest valid checkpoint), a step directory, "
                                    "or a Hugging Face model directory (config.json, safetensors, tokenizer.json)")
    src.add_argument("--preset", help="random weights of a preset, with UTF-8 byte tokens (no checkpoint needed)")
    p.add_argument("--prompt", action="append", required=True,
                   help="prompt text; repeat for a batch of prompts (of any lengths)")
    p.add_argument("--chat", action="store_true",
                   help="each --prompt is a user message, rendered by the checkpoint's chat template with the "
                        "assistant's header as flyer serve's chat route renders it (flyer's default template without "
                        "one)")
    p.add_argument("--system", default=None, help="with --chat: a system message before each prompt")
    p.add_argument("--suffix", default=None,
                   help="fill in the middle: the text after the generated one, for every prompt, in the PSM layout of "
                        "the tokenizer's FIM tokens (DeepSeek's or Qwen's; the text printed is the middle)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    p.add_argument("--logit-bias", action="append", default=[], metavar="ID=VALUE",
                   help="add VALUE (-100 to 100) to token ID's logit before choosing; repeatable (OpenAI's logit_bias)")
    p.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="lower a token's logit by this (-2 to 2) for each time it was generated (OpenAI's definition)")
    p.add_argument("--presence-penalty", type=float, default=0.0,
                   help="lower a token's logit by this (-2 to 2) once it was generated (OpenAI's definition)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--eos-id", type=int, default=None,
                   help="the one stop token (default: the checkpoint's EOS ids, else the tokenizer's end-of-text; -1: "
                        "none, generate every token)")
    p.add_argument("--speculative", choices=["mtp"], default=None,
                   help="draft with the MTP module and verify with the main model in one pass")
    p.add_argument("--draft-tokens", type=int, default=1, help="MTP drafts per step (default 1)")
    p.add_argument("--prefill-chunk", type=int, default=256,
                   help="prompt positions per prefill forward (attention's work is chunk x context, not the square)")
    p.add_argument("--prefix-cache", metavar="DIR", help="on-disk prefix cache directory (shared between runs)")
    p.add_argument("--prefix-cache-size", default="1G", help="size bound of the prefix cache (LRU), e.g. 512M")
    p.add_argument("--prefix-block", type=int, default=None,
                   help=f"prefix cache block size in tokens (with --prefix-cache; default {DEFAULT_PREFIX_BLOCK})")
    p.add_argument("--attention", choices=ATTENTION_MODES, default="absorbed",
                   help="absorbed = latent cache (default); naive = per-head K/V cache, for comparison")
    p.add_argument("--precision", choices=["auto", "fp8"], default="auto",
                   help="auto: FP32 compute on the CPU (weights held as --weight-dtype says) and with "
                        "--weight-dtype fp32, else the checkpoint's dtype (an FP8 checkpoint dequantized to bf16); "
                        "fp8: linear layers in FP8 (DeepSeek's 128x128 weight blocks, as an FP8 checkpoint stores "
                        "them)")
    p.add_argument("--cache-dtype", choices=["auto", *DTYPES], default="auto", help=CACHE_DTYPE_HELP)
    add_weight_dtype_flag(p)
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (default 1: decoding a small model is latency-bound; at most 4 per core)")
    add_expert_threads_flag(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_run)
