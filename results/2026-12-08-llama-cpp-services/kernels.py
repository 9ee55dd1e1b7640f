"""One 8960 x 1536 linear (the 1.5B's MLP shape) on each CPU kernel torch offers here, ms per
call at 1-16 rows, 2 threads, medians of 40: bfloat16 (oneDNN), int8 and int4 weight-only, fbgemm's
int8 x int8 (Int8Rows, `--dtype gguf-int8`'s kernel) and oneDNN's int8 x int8 qlinear (AMX where
the CPU has it), each activation row on its own 8-bit scale.

PYTHONPATH=. python results/2026-12-08-llama-cpp-services/kernels.py
"""

import statistics
import time

import numpy as np
import torch

from specdec.engine.cpu_quant_linear import Int8Rows

N, K = 8960, 1536


class OneDnnRows(torch.nn.Module):
    """As Int8Rows, on oneDNN: each row scaled to [-127, 127] on its own, the int8 GEMM, scaled back."""

    def __init__(self, weight: np.ndarray):
        super().__init__()
        w = torch.from_numpy(weight)
        self.scale = (w.abs().amax(1) / 127).clamp_min(1e-30).float()
        q = torch.round(w / self.scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.packed = torch.ops.onednn.qlinear_prepack(q, [1, w.shape[1]])
        self.zero = torch.zeros(w.shape[0], dtype=torch.int32)

    def forward(self, x):
        x = x.float()
        row_max = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
        qx = (torch.round(x * (127 / row_max)) + 128).to(torch.uint8)
        y = torch.ops.onednn.qlinear_pointwise(
            qx, 1.0, 128, self.packed, self.scale, self.zero, None, 1.0, 0, torch.float32, "none", [], ""
        )
        return y * (row_max / 127)


def ms(f, x, repeats=40) -> float:
    for _ in range(5):
        f(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        f(x)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    torch.set_num_threads(2)
    w = (np.random.default_rng(0).standard_normal((N, K)) * 0.02).astype(np.float32)
    wb = torch.from_numpy(w).to(torch.bfloat16)
    scale8 = torch.from_numpy(w).abs().amax(1) / 127
    w8 = torch.round(torch.from_numpy(w) / scale8[:, None]).to(torch.int8)
    w4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (N, K), dtype=torch.int32), 1)
    scale_zero = torch.rand(K // 32, N, 2, dtype=torch.bfloat16)
    kernels = {
        "bfloat16": lambda x: torch.nn.functional.linear(x.to(torch.bfloat16), wb),
        "int8 weight-only": lambda x: torch.ops.aten._weight_int8pack_mm(
            x.to(torch.bfloat16), w8, scale8.to(torch.bfloat16)
        ),
        "int4 weight-only": lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.to(torch.bfloat16), w4, 32, scale_zero
        ),
        "fbgemm int8 x int8": Int8Rows(w),
        "oneDNN int8 x int8": OneDnnRows(w),
    }
    print("| kernel | " + " | ".join(f"{m} rows" for m in (1, 2, 4, 8, 16)) + " |")
    print("|---|---|---|---|---|---|")
    for name, f in kernels.items():
        print(f"| {name} | " + " | ".join(f"{ms(f, torch.randn(m, K)):.2f}" for m in (1, 2, 4, 8, 16)) + " |")


if __name__ == "__main__":
    main()
