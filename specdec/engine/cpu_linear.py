"""Linear layers on the CPU: the kernel choice that makes a verify pass cost about one decode.

float32: MKL's GEMM, which nn.Linear uses, is fast for one row and 2-3x slower for 2 to 9 rows
(Qwen2.5-1.5B's shapes: 3.6 ms for 1 row, 8.0 ms for 5; the LM head 61 ms and 158 ms), so
verifying k + 1 tokens cost twice a decode. oneDNN's inner product with the weight converted
once to its format costs about the same for 1 to 9 rows (2.4 and 2.7 ms; LM head 26 and 44 ms).

bfloat16: nn.Linear already runs on oneDNN, but for some shapes its one-row kernel is slower than
its two-row one (1.5B: gate/up 3.5 vs 2.7 ms, LM head 31 vs 23 ms; 0.5B: no gain). Each shape is
timed once at load and a single row is computed as two where that is clearly faster.

float64 (the tests) has no oneDNN kernel and stays as it is.

oneDNN builds a kernel (a primitive) for each row count, for bfloat16 too (nn.Linear's matmul),
and keeps every one it has built in its caches (ideep's and oneDNN's, 1024 entries each). Prefill
chunks of every length made RSS climb for hundreds of requests (+300 MiB for the SmolLM2-135M
float32 target; caches of 16 entries kept it flat but rebuilt kernels 5x slower). So a call pads
its rows to one of a bounded set of counts (padded_rows): at most 16 + 8 per power of two, under
1024 for every shape together, and the caches stop growing once those have been seen.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

PAD_WHEN_FASTER_BY = 0.9  # pad only where two rows take under 90 % of one row's time
EXACT_ROWS = 16  # decode and verify passes: every row count its own primitive
STEPS_PER_OCTAVE = 8  # above, counts padded to 8 steps between powers of two: under 12.5 % waste


def padded_rows(rows: int) -> int:
    """The row count a oneDNN call of `rows` rows runs at: rows itself up to EXACT_ROWS, else
    rounded up to a multiple of 2^floor(log2 rows) / STEPS_PER_OCTAVE."""
    if rows <= EXACT_ROWS:
        return rows
    step = (1 << (rows.bit_length() - 1)) // STEPS_PER_OCTAVE
    return -(-rows // step) * step


def run_padded(linear, x: torch.Tensor) -> torch.Tensor:
    """linear(x) computed at padded_rows(rows) rows. The zero rows' outputs are dropped."""
    rows = x.shape[-2]
    padded = padded_rows(rows)
    if padded == rows:
        return linear(x)
    return linear(F.pad(x, (0, 0, 0, padded - rows)))[..., :rows, :]


class OneDnnLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.register_buffer("weight", linear.weight.detach().to_mkldnn())  # [out, in], oneDNN layout
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_padded(self.inner_product, x)

    def inner_product(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


class BFloat16Linear(nn.Module):
    """nn.Linear at padded row counts; a lone row computed as two identical rows where the two-row
    kernel is the faster one."""

    def __init__(self, linear: nn.Linear, lone_row_as_two: bool):
        super().__init__()
        self.linear = linear
        self.lone_row_as_two = lone_row_as_two

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] == 1 and self.lone_row_as_two:
            return self.linear(torch.cat((x, x), dim=-2))[..., :1, :]  # contiguous: a strided copy is slow
        return run_padded(self.linear, x)


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


def prepare_cpu_linears(model: nn.Module) -> dict[str, int]:
    """Swaps the model's linear layers for the faster CPU variant of their dtype, one at a time
    (no second copy of the model). A tied LM head gets its own oneDNN copy in float32, as the
    embedding lookup still needs the plain table. Returns how many layers took each variant."""
    counts = {"onednn": 0, "bfloat16": 0, "two_row": 0}
    two_row_shapes: dict[tuple[int, int], bool] = {}
    use_onednn = onednn_available()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear) or child.weight.device.type != "cpu":
                continue
            if child.weight.dtype == torch.float32 and use_onednn:
                setattr(parent, name, OneDnnLinear(child))
                counts["onednn"] += 1
            elif child.weight.dtype == torch.bfloat16:
                shape = tuple(child.weight.shape)
                if shape not in two_row_shapes:
                    two_row_shapes[shape] = _two_rows_faster(child)
                setattr(parent, name, BFloat16Linear(child, two_row_shapes[shape]))
                counts["bfloat16"] += 1
                counts["two_row"] += two_row_shapes[shape]
    return counts


@torch.inference_mode()
def _two_rows_faster(linear: nn.Linear, repeats: int = 9) -> bool:
    one = torch.randn(1, 1, linear.in_features, dtype=linear.weight.dtype)
    two = torch.cat((one, one), dim=1)

    def median_seconds(x: torch.Tensor) -> float:
        for _ in range(2):
            F.linear(x, linear.weight, linear.bias)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            F.linear(x, linear.weight, linear.bias)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    return median_seconds(two) < PAD_WHEN_FASTER_BY * median_seconds(one)
