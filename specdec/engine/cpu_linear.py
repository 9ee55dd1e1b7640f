"""Float32 linear layers through oneDNN on the CPU.

MKL's float32 GEMM, which nn.Linear uses, is fast for one row and 2-3x slower for 2 to 9 rows
(measured on Qwen2.5-1.5B's shapes: 3.6 ms for 1 row, 8.0 ms for 5; the LM head 61 ms and 158 ms).
Verifying a block of k + 1 tokens then costs twice a decode step, which is the whole margin of
speculation. oneDNN's inner product with the weight converted once to its own format costs about
the same for 1 to 9 rows (2.4 and 2.7 ms; LM head 26 and 44 ms). bfloat16 linears already run on
oneDNN, and float64 (tests) has no oneDNN kernel, so only float32 is converted.
"""

from __future__ import annotations

import torch
from torch import nn


class OneDnnLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.register_buffer("weight", linear.weight.detach().to_mkldnn())  # [out, in], oneDNN layout
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def onednn_available() -> bool:
    """True when this torch build has the op and it agrees with nn.Linear on a small case."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    try:
        linear = nn.Linear(64, 32)
        x = torch.randn(3, 64)
        with torch.inference_mode():
            return torch.allclose(OneDnnLinear(linear)(x), linear(x), atol=1e-4)
    except RuntimeError:
        return False


def use_onednn_linears(model: nn.Module) -> int:
    """Replaces the model's float32 CPU nn.Linear layers, one at a time (no second copy of the
    model); returns how many. A tied LM head gets its own oneDNN copy, as the embedding lookup
    still needs the plain table."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if (
                isinstance(child, nn.Linear)
                and child.weight.dtype == torch.float32
                and child.weight.device.type == "cpu"
            ):
                setattr(parent, name, OneDnnLinear(child))
                replaced += 1
    return replaced
