"""Weights held in BF16 or FP8 (128x128 block scales) for inference, computed in FP32.

A decode step is bound by the bytes of weights it reads (the routed experts, the dense layers and
the head: ``bench/serve.py``'s ``weight_mb_per_token``), and published checkpoints are BF16 (or
FP8) already. ``hold_weights(model, torch.bfloat16)`` stores the GEMM weights of an FP32 model in
BF16: half the memory and half the bytes per step, while the activations, norms, attention and
every sum stay FP32. The kernels widen each weight exactly as they read it
(``kernels.grouped_mm`` / ``kernels.linear_held``), so the result is the FP32 model's on the
BF16-rounded weights up to the order of its sums: lossless for a BF16 checkpoint loaded in FP32.

Left in their dtype: the embedding (a gather reads a few rows, not the matrix), the norms and the
router (small, and the router picks experts), and MLA's ``wkv_b``, which the absorbed attention
splits into its per-head blocks and multiplies in batched GEMMs (0.2 MB a layer in the small preset),
and the DSA indexer's ``weights_proj`` (its per-head score weights, which transformers keeps in FP32).

``hold_weights(model, torch.float8_e4m3fn)`` holds them as DeepSeek's FP8 checkpoints store them:
E4M3 codes with one FP32 scale per 128x128 block (a quarter of FP32's bytes), the output head in
BF16 (as those checkpoints keep it). From such a checkpoint the codes and scales are the file's
own (``write_fp8_codes``), so nothing is rounded again: requantizing their dequantized values would
not give them back wherever a block's scale is not its amax / 448 (V3.1's power-of-two scales).
Other weights are quantized as DeepSeek's recipe does (amax / 448 per block): that rounding is the
one loss. The kernels widen each code and multiply it by its block's scale in FP32 as they read
it, so the model computes in FP32 on the dequantized weights.

DeepSeek-V4's FP8 checkpoints are held exactly too (``flyer.interop.v4_quant.held_e4m3_blocks``): an
E4M3 weight's UE8M0 block scales are powers of two, held as FP32; its FP4 routed experts become E4M3
codes under one power-of-two scale per 128x128 block (exact for any block whose group scales span at
most 15 binades; another is refused, never rounded). The GEMM weights such a checkpoint stores
unquantized (V4's compressors: BF16) are held as stored (``as_stored``), not quantized.

A checkpoint served with held weights is loaded into them: ``empty_held`` allocates the model
with its GEMM weights already held (never as FP32), and the loaders (``flyer.interop.load``) write
each tensor into it as they read it (``write_weight``, ``write_fp8_codes``). A BF16 checkpoint of
N parameters then loads in about 2N bytes, not the FP32 model's 4N.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from flyer import kernels
from flyer.config import ModelConfig
from flyer.fp8.quant import TILE, quantize_blocks_batched
from flyer.model.init import allocate
from flyer.model.experts import Experts, local_routed_no_grad, packed_w13
from flyer.model.lowp import Linear, grouped_linear
from flyer.model.transformer import Transformer

FP8 = torch.float8_e4m3fn
WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": FP8}
KEEP = ("wkv_b", "weights_proj")  # Linear names whose weights stay as they are (see the module docstring)


class HeldFP8Linear(Linear):
    """A ``Linear`` holding its weight as FP8 codes with 128x128 block scales (``weight_scale``),
    computed in FP32 (``kernels.linear_held``; inference only)."""

    weight_scale: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear_held(x, self.weight, self.bias, self.weight_scale)

    def grouped(self, x: torch.Tensor) -> torch.Tensor:
        return grouped_linear(x, self.weight, self.weight_scale)


class HeldFP8Experts(Experts):
    """Routed experts holding w1, w3 (E, F, D) and w2 (E, D, F) as FP8 codes with 128x128 block
    scales, computed in FP32 (``kernels.grouped_mm``; inference only). w1|w3 are one (E, 2F, D)
    tensor with one scale tensor when F is a whole number of blocks (one kernel call), else two."""

    w13: torch.Tensor | None
    w13_scale: torch.Tensor | None
    w1_scale: torch.Tensor
    w2_scale: torch.Tensor
    w3_scale: torch.Tensor

    def pack_w13_(self) -> None:
        pass  # packed when held, where the blocks allow

    def ffn(self, x_ND: torch.Tensor, counts: list[int], counts_E: torch.Tensor) -> torch.Tensor:
        """The experts on x's rows, sorted by expert (``counts`` rows each, also as ``counts_E``)."""
        if self.w13 is not None:
            h13 = kernels.grouped_mm(x_ND, counts, self.w13, counts_E, self.w13_scale)
        else:
            h13 = torch.cat([kernels.grouped_mm(x_ND, counts, self.w1, counts_E, self.w1_scale),
                             kernels.grouped_mm(x_ND, counts, self.w3, counts_E, self.w3_scale)], dim=1)
        return kernels.grouped_mm(kernels.swiglu(h13, self.swiglu_limit), counts, self.w2, counts_E, self.w2_scale)

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        return self.ffn(x_ND.float(), counts_E.tolist(), counts_E.cpu())

    def routed_local(self, x_TD: torch.Tensor, weights_TK: torch.Tensor, topk_ids_TK: torch.Tensor,
                     counts_E: torch.Tensor) -> torch.Tensor:
        return local_routed_no_grad(x_TD, weights_TK, topk_ids_TK, counts_E.tolist(), counts_E, torch.float32,
                                    self.ffn)


@torch.no_grad()
def hold_weights(model: Transformer, dtype: torch.dtype, as_stored: Mapping[str, torch.dtype] | None = None) -> int:
    """Store ``model``'s GEMM weights in ``dtype`` in place (inference only: they no longer take
    gradients); the model computes in its own dtype. Returns the bytes it saves (FP32 to BF16: half
    of those weights'). FP32 is a no-op; BF16 and FP8 need an FP32 model on the CPU (the kernels'
    case; or on the meta device, to count bytes). FP8 (``torch.float8_e4m3fn``): the weights
    quantized in 128x128 blocks (see the module docstring; a checkpoint's own FP8 codes are held as
    they are by loading it into ``empty_held``'s model instead). ``as_stored``: with FP8, weights held
    in another dtype instead, by state-dict key (an expert stack by any of its w1/w2/w3): bfloat16
    held in BF16, float32 left as it is (an FP8 checkpoint's unquantized weights, held as it stores them)."""
    return _hold_all(model, dtype, None, as_stored or {})


def empty_held(cfg: ModelConfig, dtype: torch.dtype, device: str | torch.device = "cpu",
               as_stored: Mapping[str, torch.dtype] | None = None) -> Transformer:
    """An uninitialised FP32 model (``flyer.model.init.allocate``) whose GEMM weights are
    already held in ``dtype`` (``as_stored``: as ``hold_weights``), for a checkpoint to be loaded into
    (``write_weight``, ``write_fp8_codes``): the held weights are allocated as held, so loading never
    takes the FP32 weights' memory (four bytes a parameter, against BF16's two and FP8's one)."""
    if dtype != torch.float32 and torch.device(device).type != "cpu":
        raise ValueError(f"held weights run on flyer's CPU kernels (device is {device})")
    with torch.device("meta"):
        model = Transformer(cfg)
    _hold_all(model, dtype, torch.device(device), as_stored or {})
    return allocate(model, device).eval()


def held_scale(model: nn.Module, key: str, expert: int | None = None) -> torch.Tensor | None:
    """The 128x128 block scales of state-dict entry ``key`` (its slice ``expert`` of a stack) where
    ``model`` holds it as FP8 codes (``HeldFP8Linear``, ``HeldFP8Experts``), else None."""
    path, _, attr = key.rpartition(".")
    m = model.get_submodule(path)
    if not isinstance(m, (HeldFP8Linear, HeldFP8Experts)):
        return None
    scale = getattr(m, f"{attr}_scale")
    return scale if expert is None else scale[expert]


@torch.no_grad()
def write_weight(dest: torch.Tensor, value: torch.Tensor, scale: torch.Tensor | None = None) -> None:
    """Write a checkpoint's ``value`` into the parameter (or slice) ``dest`` as it is held: with
    its FP8 block ``scale`` (``held_scale``), quantized in 128x128 blocks into codes and scales as
    ``hold_weights`` quantizes; else copied, rounded to its dtype as ``.to()`` rounds."""
    if scale is None:
        dest.copy_(value)
        return
    codes, s = _quantize(value.float())
    write_fp8_codes(dest, scale, codes, s)


@torch.no_grad()
def write_fp8_codes(dest: torch.Tensor, scale: torch.Tensor, codes: torch.Tensor, codes_scale: torch.Tensor) -> None:
    """E4M3 ``codes`` and their 128x128 block scales into held ones (``dest``, ``scale``) unchanged, so
    a checkpoint's own are not rounded again (requantizing their values would not give them back
    wherever a block's scale is not its amax / 448). NaN codes are refused (the kernels do not look
    for them)."""
    if nan := _nan_codes(codes):
        raise ValueError(f"{nan} of its FP8 codes are NaN (a corrupt checkpoint, or NaN weights)")
    dest.copy_(codes)
    scale.copy_(codes_scale)


def _quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (..., R, C) and block scales (..., ceil(R / 128), ceil(C / 128)) of ``w`` quantized in
    128x128 blocks (DeepSeek's recipe: amax / 448 per block)."""
    codes, scale = quantize_blocks_batched(w.detach().reshape(-1, *w.shape[-2:]))
    codes = codes[..., :w.shape[-1]].reshape(w.shape)
    return codes, scale.reshape(*w.shape[:-2], *scale.shape[-2:])


def _nan_codes(codes: torch.Tensor) -> int:
    return 0 if codes.is_meta else int((codes.view(torch.uint8) & 0x7F).eq(0x7F).sum())


def _held(w: torch.Tensor, dtype: torch.dtype, device: torch.device | None) -> torch.Tensor:
    """``w`` in ``dtype``; with a ``device`` (``empty_held``: ``w`` is on the meta device) new,
    uninitialised memory there instead."""
    return w.detach().to(dtype) if device is None else torch.empty(w.shape, dtype=dtype, device=device)


def _hold_all(model: Transformer, dtype: torch.dtype, device: torch.device | None,
              as_stored: Mapping[str, torch.dtype]) -> int:
    """``hold_weights``; with a ``device``, ``empty_held``'s allocation of the held weights there."""
    if dtype == torch.float32:
        return 0
    if dtype not in (torch.bfloat16, FP8):
        raise ValueError(f"weights can be held in float32, bfloat16 or float8_e4m3fn (got {dtype})")
    if model.embed.weight.dtype != torch.float32 or model.embed.weight.device.type not in ("cpu", "meta"):
        raise ValueError(f"held weights need an FP32 model on the CPU (this one is "
                         f"{model.embed.weight.dtype} on {model.embed.weight.device.type})")
    if dtype == FP8:
        return _hold_fp8(model, device, as_stored)
    saved = 0
    tied = model.head.weight if model.cfg.tie_embeddings else None
    for name, m in model.named_modules():
        if type(m) is Experts:  # not FP8Experts: FP8 weights are held as FP8
            saved += _hold_experts(m, dtype, device)
        elif isinstance(m, Linear) and m.weight is not tied and name.rsplit(".", 1)[-1] not in KEEP:
            saved += _hold(m, "weight", dtype, device)
    return saved


def _hold_experts(m: Experts, dtype: torch.dtype, device: torch.device | None) -> int:
    """Routed experts held in BF16, w1|w3 as one tensor so the kernel reads them in one call."""
    m.pack_w13_()
    w13 = packed_w13(m.w1, m.w3)
    saved = _hold(m, "w2", dtype, device)
    half = m.w1.shape[1]
    held = _held(w13, dtype, device)
    m.w1, m.w3 = (nn.Parameter(held[:, :half], requires_grad=False),
                  nn.Parameter(held[:, half:], requires_grad=False))
    return saved + w13.numel() * (w13.element_size() - held.element_size())


def _fp8_codes(name: str, w: torch.Tensor, device: torch.device | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (..., R, C) and block scales (..., ceil(R / 128), ceil(C / 128)) of the weight ``name``:
    ``w`` quantized in 128x128 blocks (NaN codes refused), or, with a ``device``, uninitialised there."""
    if device is not None:
        blocks = (*w.shape[:-2], -(-w.shape[-2] // TILE), -(-w.shape[-1] // TILE))
        return torch.empty(w.shape, dtype=FP8, device=device), torch.empty(blocks, device=device)
    codes, scale = _quantize(w)
    if nan := _nan_codes(codes):
        raise ValueError(f"{name}: {nan} of its FP8 codes are NaN (a corrupt checkpoint, or NaN weights)")
    return codes.contiguous(), scale.contiguous()


def _hold_fp8(model: Transformer, device: torch.device | None, as_stored: Mapping[str, torch.dtype]) -> int:
    """``hold_weights`` in FP8: the linears (but ``KEEP``'s and the head, held in BF16) and the
    routed experts as FP8 codes with their block scales; those ``as_stored`` names in BF16 (or left)."""
    tied = model.head.weight if model.cfg.tie_embeddings else None
    saved = 0 if model.head.weight is tied else _hold(model.head, "weight", torch.bfloat16, device)
    for name, m in model.named_modules():
        if type(m) is Experts:
            keys = [f"{name}.{w}" for w in ("w1", "w2", "w3")]
        elif (isinstance(m, Linear) and m is not model.head and m.weight is not tied
              and name.rsplit(".", 1)[-1] not in KEEP):
            keys = [f"{name}.weight"]
        else:
            continue
        stored = {as_stored[k] for k in keys if k in as_stored}
        if stored:  # as the checkpoint stores it: BF16, else left in FP32
            if stored == {torch.bfloat16}:
                saved += (_hold_experts(m, torch.bfloat16, device) if type(m) is Experts
                          else _hold(m, "weight", torch.bfloat16, device))
        elif type(m) is Experts:
            saved += _hold_experts_fp8(m, name, device)
        else:
            codes, scale = _fp8_codes(f"{name}.weight", m.weight, device)
            saved += m.weight.numel() * (m.weight.element_size() - 1) - scale.numel() * 4
            m.weight = nn.Parameter(codes, requires_grad=False)
            m.register_buffer("weight_scale", scale, persistent=False)
            m.__class__ = HeldFP8Linear
    return saved


def _hold_experts_fp8(m: Experts, name: str, device: torch.device | None) -> int:
    F_ = m.w1.shape[1]
    before = sum(w.numel() * w.element_size() for w in (m.w1, m.w2, m.w3))
    (c1, s1), (c2, s2), (c3, s3) = (_fp8_codes(f"{name}.{w}", getattr(m, w), device) for w in ("w1", "w2", "w3"))
    m.w13 = m.w13_scale = None
    if F_ % TILE == 0:  # w1|w3 one tensor, and their blocks one scale tensor: one kernel call
        m.w13, m.w13_scale = torch.cat([c1, c3], dim=1), torch.cat([s1, s3], dim=1)
        c1, c3, s1, s3 = m.w13[:, :F_], m.w13[:, F_:], m.w13_scale[:, :F_ // TILE], m.w13_scale[:, F_ // TILE:]
    m.w1, m.w2, m.w3 = (nn.Parameter(c, requires_grad=False) for c in (c1, c2, c3))
    for attr, t in (("w1_scale", s1), ("w2_scale", s2), ("w3_scale", s3)):
        m.register_buffer(attr, t, persistent=False)
    m.__class__ = HeldFP8Experts
    return before - sum(w.numel() + s.numel() * 4 for w, s in ((c1, s1), (c2, s2), (c3, s3)))


def _hold(m: nn.Module, attr: str, dtype: torch.dtype, device: torch.device | None) -> int:
    w = getattr(m, attr)
    held = _held(w, dtype, device)
    setattr(m, attr, nn.Parameter(held, requires_grad=False))
    return w.numel() * (w.element_size() - held.element_size())


__all__ = ["FP8", "WEIGHT_DTYPES", "HeldFP8Experts", "HeldFP8Linear", "empty_held", "held_scale", "hold_weights",
           "write_fp8_codes", "write_weight"]
