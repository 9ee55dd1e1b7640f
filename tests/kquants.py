"""Q4_K and Q6_K writers for tests (the gguf package reads every type but writes no K-quant).

Plain rounding onto each format's grid, not llama.cpp's error-minimising search: what a test
needs is valid blocks that gguf.quants.dequantize reads back to within one step of the weights
(tests/test_gguf_weights.py checks that). Layouts as ggml-common.h defines them:
- Q4_K, 256 weights, 144 bytes: fp16 d, fp16 dmin, 12 bytes of 6-bit scales and mins of eight
  32-weight groups, 128 bytes of nibbles (each 32 bytes: group 2c low, group 2c + 1 high);
  w = d * sc * q - dmin * m, q in 0..15.
- Q6_K, 256 weights, 210 bytes: 128 bytes of low nibbles, 64 bytes of high 2-bit pairs, sixteen
  int8 scales of 16-weight groups, fp16 d; w = d * sc * (q - 32), q in 0..63.
"""

from __future__ import annotations

import numpy as np

TINY = np.float32(1e-8)


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.astype(np.float16)).view(np.uint8)


def quantize_q4_k(w: np.ndarray) -> np.ndarray:
    """[rows, K] float32, K a multiple of 256 -> [rows, K / 256 * 144] uint8."""
    n = w.shape[0]
    g = w.reshape(n, -1, 8, 32).astype(np.float32)
    low = np.minimum(g.min(-1), 0)  # w = step * q - offset with q >= 0: the offset covers the minimum
    step = (g.max(-1) - low) / 15
    d = np.maximum(step.max(-1, keepdims=True) / 63, TINY).astype(np.float16)
    dmin = np.maximum((-low).max(-1, keepdims=True) / 63, TINY).astype(np.float16)
    sc = np.clip(np.round(step / d.astype(np.float32)), 1, 63).astype(np.uint8)
    m = np.clip(np.round(-low / dmin.astype(np.float32)), 0, 63).astype(np.uint8)
    true_step = (d.astype(np.float32) * sc)[..., None]
    offset = (dmin.astype(np.float32) * m)[..., None]
    q = np.clip(np.round((g + offset) / true_step), 0, 15).astype(np.uint8)
    scales = np.concatenate(
        (sc[..., :4] | ((sc[..., 4:] >> 4) << 6), m[..., :4] | ((m[..., 4:] >> 4) << 6), (sc[..., 4:] & 15) | ((m[..., 4:] & 15) << 4)),
        axis=-1,
    )  # fmt: skip
    qs = (q[..., 0::2, :] | (q[..., 1::2, :] << 4)).reshape(n, -1, 128)
    return np.concatenate((_f16_bytes(d), _f16_bytes(dmin), scales, qs), axis=-1).reshape(n, -1)


def quantize_q6_k(w: np.ndarray) -> np.ndarray:
    """[rows, K] float32, K a multiple of 256 -> [rows, K / 256 * 210] uint8."""
    n = w.shape[0]
    g = w.reshape(n, -1, 16, 16).astype(np.float32)
    step = np.abs(g).max(-1) / 31
    d = np.maximum(step.max(-1, keepdims=True) / 127, TINY).astype(np.float16)
    sc = np.clip(np.round(step / d.astype(np.float32)), 1, 127).astype(np.int8)
    true_step = (d.astype(np.float32) * sc)[..., None]
    q = (np.clip(np.round(g / true_step), -32, 31) + 32).astype(np.uint8).reshape(n, -1, 2, 4, 32)
    a, b, c, e = (q[..., i, :] for i in range(4))  # per half of 128: weights 0-31, 32-63, 64-95, 96-127
    ql = np.concatenate(((a & 15) | ((c & 15) << 4), (b & 15) | ((e & 15) << 4)), axis=-1)  # [n, sb, 2, 64]
    qh = (a >> 4) | ((b >> 4) << 2) | ((c >> 4) << 4) | ((e >> 4) << 6)  # [n, sb, 2, 32]
    blocks = (ql.reshape(n, -1, 128), qh.reshape(n, -1, 64), sc.view(np.uint8), _f16_bytes(d))
    return np.concatenate(blocks, axis=-1).reshape(n, -1)


WRITERS = {"Q4_K": quantize_q4_k, "Q6_K": quantize_q6_k}
