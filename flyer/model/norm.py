"""RMSNorm that runs the fused kernel under autocast (weight cast to the activation dtype)."""

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)
