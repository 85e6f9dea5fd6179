"""FP8 fine-grained mixed precision (DeepSeek-V3 report, section 3.3): 1x128 / 128x128 scaled
E4M3 quantisation, GEMMs promoted to FP32 every 128 along K (CPU emulation and CUDA
``_scaled_mm``), the FP8 linear / grouped-expert autograd functions, ``convert_to_fp8``,
LogFMT-nBit, and DeepSeek-V4's FP4 (MXFP4) codec with the FP4 QAT of routed experts (``fp4``)."""

from flyer.fp8.gemm import (accumulation_experiment, cuda_fp8_supported, emulated_gemm_nt, fp8_gemm_nt,
                            limited_accumulator_gemm)
from flyer.fp8.linear import (FP8Experts, FP8Linear, FP8Recipe, convert_to_fp8, default_module_filter,
                              fp8_grouped_linear, fp8_linear, fp8_modules)
from flyer.fp8.quant import Quantized, dequantize, fake_quantize, quantize_blocks, quantize_tiles

__all__ = ["accumulation_experiment", "cuda_fp8_supported", "emulated_gemm_nt", "fp8_gemm_nt",
           "limited_accumulator_gemm", "FP8Experts", "FP8Linear", "FP8Recipe", "convert_to_fp8",
           "default_module_filter", "fp8_grouped_linear", "fp8_linear", "fp8_modules", "Quantized", "dequantize",
           "fake_quantize", "quantize_blocks", "quantize_tiles"]
