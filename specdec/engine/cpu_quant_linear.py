"""Weight-only quantized linear layers on the CPU: a GGUF file's weights as shipped.

A one-row decode reads every weight once, so it costs what the weights weigh: torch's weight-only
kernels read 4 or 8 bits a weight where bfloat16 reads 16. Measured on a 2-core Xeon (AVX-512),
one 8960 x 1536 linear, bfloat16 activations, ms per call:

    rows      1     2     3     4     5     9    16    64   256
    int4   0.54  0.70  0.85  0.99  1.99  2.96  4.41  15.5  64.0
    int8   0.64  0.72  0.86  0.96  1.91  2.98  6.22  16.4  64.0
    bf16   1.60  1.45  1.61  1.85  2.07  2.84  7.43  13.4  50.3

Both kernels step up past 4 rows, so a verify block of 5 to 16 rows runs fastest as calls of a
few rows each. Each layer times its own kernel at 1 to 16 rows once at load and splits a pass
into the calls that cost least (RowPlan); from 17 rows on (prefill) one call, about 1.25x a
bfloat16 GEMM, so no second, dense copy of the weights is kept.

int4: `aten._weight_int4pack_mm_for_cpu`, groups of 32 weights along the input with a bfloat16
scale and zero each, w = (q - 8) * scale + zero (checked against a plain matmul in the tests):
GGUF's Q4_0, Q4_1 and Q4_K store exactly such 32-weight groups. int8: `aten._weight_int8pack_mm`,
one scale per output row: the other GGUF types are put on that grid (specdec.engine.gguf_weights).
`--dtype gguf-int8` adds a third kernel, faster than both: fbgemm's int8 GEMM (Int8Rows), on a
copy of the layer's weights with one int8 scale per output row, each activation row rounded to
8 bits on its own scale. Each layer times it at one row beside its own kernel at load
(plan_row_splits) and, where it is faster, runs every pass on it (so a row's result never
depends on how many rows its pass has). Qwen2.5-Coder-1.5B Q4_K_M in process, AMD EPYC with
AVX-512 VNNI, 2 cores: every layer took it; decode 78-89 against 94-110 ms a token, a 200-token
prefill 1.6-1.7 against 5.1-5.6 s, verify(k=4) 1.14-1.23 against 1.65-2.23 decodes. It costs
accuracy, which is why it is opt-in: 8-bit activations put about twice bfloat16's rounding on
the logits (tests/test_gguf_weights.py), and an 8-bit rounding flips on the tiny float
differences between a verify pass and a decode, so greedy speculation leaves the target alone
more often (6 of 14 benchmark prompts kept at k=2, results/2026-12-02-gguf-int8-vs-llama-cpp/).

Tried instead: an 8-bit grid of 32-weight groups as two 4-bit planes in one int4 call (finer).
Decode cost the same; the services' decode and prefill got slower (171 against 149 ms a token,
2.0 against 1.7 s to prefill; the planes double the kernel's work), so it was taken out.
"""

from __future__ import annotations

import functools
import statistics
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

INT4_GROUP = 32  # weights per scale and zero along the input
INT4_ROWS_MULTIPLE = 16  # the int4 packing needs output rows in multiples of 16
PLANNED_ROWS = 16  # passes up to this many rows are split by measured cost; longer run as one call


@dataclass
class Int4Grid:
    """w[n, k] = q[n, k] * scale[n, k // 32] + minimum[n, k // 32], q in 0..15: GGUF's 4-bit types."""

    q: np.ndarray  # uint8 [N, K]
    scale: np.ndarray  # float32 [N, K / 32]
    minimum: np.ndarray  # float32 [N, K / 32]

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape

    def dequantize(self) -> np.ndarray:
        g = lambda a: np.repeat(a, INT4_GROUP, axis=1)  # noqa: E731
        return self.q.astype(np.float32) * g(self.scale) + g(self.minimum)

    def rows(self, index: np.ndarray) -> "Int4Grid":
        return Int4Grid(self.q[index], self.scale[index], self.minimum[index])

    @staticmethod
    def concat(grids: list["Int4Grid"]) -> "Int4Grid":
        return Int4Grid(*(np.concatenate([getattr(g, f) for g in grids]) for f in ("q", "scale", "minimum")))


def int4_fits(shape: tuple[int, int]) -> bool:
    return shape[0] % INT4_ROWS_MULTIPLE == 0 and shape[1] % INT4_GROUP == 0


class Int4Block(nn.Module):
    def __init__(self, grid: Int4Grid):
        super().__init__()
        q = torch.from_numpy(np.ascontiguousarray(grid.q)).to(torch.int32)
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        scale = torch.from_numpy(grid.scale)
        zero = torch.from_numpy(grid.minimum) + 8 * scale  # the kernel computes (q - 8) * scale + zero
        self.register_buffer("scale_zero", torch.stack((scale.T, zero.T), dim=-1).to(torch.bfloat16).contiguous())
        self.out_features = grid.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, INT4_GROUP, self.scale_zero)


class Int8Block(nn.Module):
    """One scale per output row: scale = max |w| / 127 over the row, q = round(w / scale)."""

    def __init__(self, weight: np.ndarray):
        super().__init__()
        w = torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32))
        scale = (w.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
        self.register_buffer("weight", (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.out_features = weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.weight, self.scale)


@functools.cache
def fbgemm_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines


@functools.cache
def _has_vnni() -> bool:
    """VNNI's int8 dot product accumulates in 32 bits; without it fbgemm's AVX2 path can saturate
    16-bit sums, which 7-bit activations (reduce_range) avoid."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx512_vnni" in flags or " avx_vnni" in flags


class Int8Rows(nn.Module):
    """fbgemm's dynamic int8 linear, each row independent of the others in its call.

    The weight is rounded to int8 with one scale per output row (max |w| / 127). fbgemm quantizes
    a call's input to 8 bits over the range of all its rows, so a row's result would depend on
    the rows beside it, and a verify row would not equal the decode of the same token. So each row
    is first divided by its own max |x|, and two guard columns (+1 and -1, against zero weights)
    pin every call's range to [-1, 1]: every row meets the same grid, the int32 sums are exact,
    and the result is multiplied back by the row's max.
    """

    def __init__(self, weight: np.ndarray):
        super().__init__()
        w = torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32))
        scale = (w.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny).double()
        w = torch.cat((w, w.new_zeros(w.shape[0], 2)), dim=1)  # the guard columns' weights
        with warnings.catch_warnings():  # quantized tensors are deprecated in torch, not yet removed
            warnings.simplefilter("ignore", UserWarning)
            q = torch.quantize_per_channel(w, scale, torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)
        self.packed = torch.ops.quantized.linear_prepack(q, None)
        self.reduce_range = not _has_vnni()
        self.out_features = weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        row_max = x.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        guards = x.new_tensor([1.0, -1.0]).expand(x.shape[0], 2)
        y = torch.ops.quantized.linear_dynamic(torch.cat((x / row_max, guards), dim=1), self.packed, self.reduce_range)
        return (y * row_max).to(torch.bfloat16)


class WeightOnlyLinear(nn.Module):
    """y = x W^T + b over bfloat16 rows, W held as blocks of output rows, each int4 or int8 (a
    fused q/k/v whose v is stored at higher precision than q and k is two blocks)."""

    def __init__(self, blocks: list[nn.Module], bias: torch.Tensor | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.bias = None if bias is None else nn.Parameter(bias.to(torch.bfloat16), requires_grad=False)
        self.in_features = None
        self.out_features = sum(b.out_features for b in blocks)
        self.plan = RowPlan.single()
        self.int8_rows: Int8Rows | None = None  # fbgemm's copy: when set, it runs every pass

    @classmethod
    def from_parts(
        cls, parts: list[Int4Grid | np.ndarray], bias: torch.Tensor | None, int8_rows: bool = False
    ) -> "WeightOnlyLinear":
        """parts: the output rows in order, as 4-bit grids or float weights [rows, in]. Adjacent
        parts of one kind share a block; a grid the int4 kernel cannot take goes to int8.
        int8_rows: also make fbgemm's copy (plan_row_splits keeps it where it is faster)."""
        runs: list[list] = []
        for part in parts:
            if isinstance(part, Int4Grid) and not int4_fits(part.shape):
                part = part.dequantize()
            if runs and isinstance(runs[-1][0], Int4Grid) == isinstance(part, Int4Grid):
                runs[-1].append(part)
            else:
                runs.append([part])
        blocks = [
            Int4Block(Int4Grid.concat(run)) if isinstance(run[0], Int4Grid) else Int8Block(np.concatenate(run))
            for run in runs
        ]
        linear = cls(blocks, bias)
        linear.in_features = parts[0].shape[1]
        if int8_rows and fbgemm_available():
            dense = [p.dequantize() if isinstance(p, Int4Grid) else p for p in parts]
            linear.int8_rows = Int8Rows(np.concatenate(dense))
        return linear

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.blocks) == 1:
            return self.blocks[0](x)
        return torch.cat([block(x) for block in self.blocks], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 0:  # a pass that wants no logits still calls the head
            y = x.new_empty((0, self.out_features))
            return y if self.bias is None else y + self.bias
        if self.int8_rows is not None:
            y = self.int8_rows(x)
            return y if self.bias is None else y + self.bias
        calls = self.plan.calls(x.shape[0])
        if len(calls) == 1:
            y = self.matmul(x)
        else:
            y = torch.cat([self.matmul(rows) for rows in x.split(calls)])
        return y if self.bias is None else y + self.bias


@dataclass(frozen=True)
class RowPlan:
    """How a pass of up to PLANNED_ROWS rows is split into kernel calls: best[m] is the first
    call's size for m rows, chosen from the kernel's measured time at 1 to PLANNED_ROWS rows."""

    first_call: tuple[int, ...]  # index m: rows of the first call for a pass of m rows

    @classmethod
    def single(cls) -> "RowPlan":
        return cls(tuple(range(PLANNED_ROWS + 1)))

    @classmethod
    def from_times(cls, seconds: list[float]) -> "RowPlan":
        """seconds[m - 1]: one call of m rows. A dynamic programme over the splits of m rows."""
        best_cost, first = [0.0], [0]
        for m in range(1, len(seconds) + 1):
            cost, call = min((seconds[c - 1] + best_cost[m - c], c) for c in range(m, 0, -1))
            best_cost.append(cost)
            first.append(call)
        return cls(tuple(first))

    def calls(self, rows: int) -> list[int]:
        if rows >= len(self.first_call):
            return [rows]
        sizes = []
        while rows:
            sizes.append(self.first_call[rows])
            rows -= sizes[-1]
        return sizes


@torch.inference_mode()
def plan_row_splits(model: nn.Module, repeats: int = 5) -> int:
    """Times every WeightOnlyLinear shape once. A layer with fbgemm's copy keeps it where it
    decodes (one row) faster than the weights as shipped, and then runs every pass on it, so that
    a row's result never depends on how many rows its pass has; elsewhere the copy is dropped and
    the shipped kernel, timed at 1..PLANNED_ROWS rows, gets its RowPlan. Returns how many shapes
    were timed."""
    plans: dict[tuple, tuple[RowPlan, bool]] = {}
    for layer in model.modules():
        if not isinstance(layer, WeightOnlyLinear):
            continue
        blocks = tuple((type(b).__name__, b.out_features) for b in layer.blocks)
        key = (layer.in_features, blocks, layer.int8_rows is None)
        if key not in plans:
            one_row = _median_seconds(layer.matmul, layer.in_features, 1, repeats)
            faster = layer.int8_rows is not None and (
                _median_seconds(layer.int8_rows, layer.in_features, 1, repeats) < one_row
            )
            plan = RowPlan.single()  # the fbgemm copy runs a pass in one call; no splits to time
            if not faster:
                more = [
                    _median_seconds(layer.matmul, layer.in_features, m, repeats) for m in range(2, PLANNED_ROWS + 1)
                ]
                plan = RowPlan.from_times([one_row, *more])
            plans[key] = (plan, faster)
        layer.plan, faster = plans[key]
        if not faster:
            layer.int8_rows = None
    return len(plans)


def _median_seconds(matmul, in_features: int, rows: int, repeats: int) -> float:
    x = torch.randn(rows, in_features, dtype=torch.bfloat16)
    matmul(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)
