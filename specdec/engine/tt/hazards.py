"""Where a chip departs from ttnn's documented semantics, and what the backend does about it.

tt-metal's own tree records these; the emulator in tests/ reproduces each (its hazard modes):
1. Decode attention past cur_pos. repro_sdpa_decode_causal_mask_leak.py (tt-metal, 2026) shows
   paged decode attention letting K/V past cur_pos, up to the end of its 32-position block, change
   the output. Here that is always non-empty: a verify pass writes its k + 1 rows before they
   attend, rolled-back drafts stay in the cache, prefill pads its last block, and a block another
   session returned holds that session's KV. Start-up runs the leak check below on the chip; if the
   kernel's causal mask leaks, the step attends non-causally through an explicit mask (one mask
   per pass, looked up by position: TtTransformer.attention_mask), which cannot see past a row's
   position whatever the kernel does with its causal mask. It costs two ops per pass (embedding,
   reshape; each layer's ops are unchanged) and attention over every position of the page table
   instead of each row's own (the KV read of a step grows to max_seq_len per row).
2. A bias inside a trace. tt_transformers' attention.py adds a decode bias already expanded to the
   batch ("Broadcasting does not seem to be supported inside execute_trace") and a prefill bias
   apart from its linear; model.py does both (check_bias_in_trace shows why on a chip).
3. paged_update_cache rewrites a row's whole 32-row tile, so two rows of one tile in one call
   keep one write: step_inputs.py gives each of a session's rows its own call (2 x layers x
   verify_rows calls per verify pass, 2 x layers per draft pass).
   ttnn.experimental.indexed_fused_update_cache would write every row in one call (it serialises
   rows of one page) but wants packed [1, heads, rows, d] interleaved inputs and physical row
   indices: not adopted until a chip can measure it.
4. Buffers allocated while a trace exists may be corrupted by a replay (ttnn 0.81.1's warning).
   Every buffer a replay reads is allocated at warm-up, before the first capture (traces.py);
   prefill, the only device work after capture, frees its buffers before returning
   (TtEngine._prefill); a replay's outputs are read before the next replay (TtEngine._replay).
5. Reused blocks: with 1 guarded, a row never reads past its own position, and every position up
   to it was written by its own session, so a block's previous owner is never visible.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from specdec.engine.tt.device_weights import bfloat16_on_device
from specdec.engine.tt.host_tensors import host_tensor
from specdec.engine.tt.step_inputs import DEAD, ROWS
from specdec.errors import DeviceUnavailable

log = logging.getLogger(__name__)

TOLERANCE = 0.1  # the repro's threshold; bfloat16 attention errs by ~0.01 here, a leak by > 1
LEAKABLE = (0, 1, 5, 14, 15, 16, 24, 30, 32, 33, 40, 47, 50, 60, 62)  # positions with data after them in their block
CONTROL = (31, 63)  # positions that end a block: nothing after them to leak
DIRTY = 100.0  # the values past each row's position: attending to any of them moves its output by > 1


@dataclass(frozen=True)
class AttentionCheck:
    leakable: float  # largest error on rows with data past their position in their block
    control: float  # the same on rows at the end of a block (the check's own noise)

    @property
    def ok(self) -> bool:
        return self.leakable < TOLERANCE and self.control < TOLERANCE


def _floats(ttnn, device, array: np.ndarray):
    return bfloat16_on_device(ttnn, device, array, tiled=True)


def _ints(ttnn, device, array, np_dtype, tt_dtype):
    return ttnn.to_device(host_tensor(ttnn, array, np_dtype, tt_dtype), device)


def _bf16(array: np.ndarray) -> np.ndarray:
    return torch.from_numpy(np.asarray(array, dtype=np.float32)).bfloat16().double().numpy()


def check_decode_attention(ttnn, device, model, max_blocks: int, masked: bool, seed: int = 0) -> AttentionCheck:
    """tt-metal's leak check, through the model's own decode attention and page-table width: each
    row a sequence of its own (two blocks), real K/V up to its position and DIRTY past it, against
    exact attention up to its position. (The repro attends to cur_pos = 14 with its data at 0..13,
    so position 14, which cur_pos includes, differs too; here each row's data covers 0..cur_pos.)"""
    config = model.config
    heads, kv_heads, d = config.num_heads, config.num_kv_heads, config.head_dim
    positions = list(LEAKABLE + CONTROL) + [DEAD] * (ROWS - len(LEAKABLE) - len(CONTROL))
    rng = np.random.default_rng(seed)
    live = [r for r, p in enumerate(positions) if p != DEAD]
    keys, values = (_bf16(rng.standard_normal((2 * len(live), kv_heads, 32, d))) for _ in range(2))
    table = np.zeros((ROWS, max_blocks), dtype=np.int32)
    for i, r in enumerate(live):  # row r's blocks: 2i, then 2i + 1 for every column after
        table[r] = [2 * i] + [2 * i + 1] * (max_blocks - 1)
        for cache in (keys, values):
            flat = cache[2 * i : 2 * i + 2].transpose(1, 0, 2, 3).reshape(kv_heads, 64, d)
            flat[:, positions[r] + 1 :] = DIRTY
            cache[2 * i : 2 * i + 2] = flat.reshape(kv_heads, 2, 32, d).transpose(1, 0, 2, 3)
    q = _bf16(rng.standard_normal((1, ROWS, heads, d)))
    mask = None
    if masked:
        rows = np.repeat(np.maximum(positions, 0), heads)[None]
        mask = model.attention_mask(_ints(ttnn, device, rows, np.uint32, ttnn.uint32))
    out = model.decode_attention(
        _floats(ttnn, device, q),
        _floats(ttnn, device, keys),
        _floats(ttnn, device, values),
        _ints(ttnn, device, table, np.int32, ttnn.int32),
        _ints(ttnn, device, positions, np.int32, ttnn.int32),
        mask,
    )
    got = ttnn.to_torch(out).double().numpy()[0, :, :heads]
    errors = {}
    for i, r in enumerate(live):
        p = positions[r]
        k, v = (c[2 * i : 2 * i + 2].transpose(1, 0, 2, 3).reshape(kv_heads, 64, d)[:, : p + 1] for c in (keys, values))
        k, v = (np.repeat(a, heads // kv_heads, axis=0) for a in (k, v))
        scores = np.einsum("hd,hpd->hp", q[0, r], k) * model.scale
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        want = np.einsum("hp,hpd->hd", weights / weights.sum(-1, keepdims=True), v)
        errors[p] = float(np.abs(got[r] - want).max())
    return AttentionCheck(max(errors[p] for p in LEAKABLE), max(errors[p] for p in CONTROL))


def choose_decode_attention(causal: AttentionCheck, masked: AttentionCheck) -> str:
    """The kernel's causal mask where it holds, else the explicit mask; neither: no start."""
    if causal.ok:
        return "causal"
    if masked.ok:
        return "masked"
    raise DeviceUnavailable(
        "decode attention on this chip reads past a row's position with its causal mask "
        f"(error {causal.leakable:.3f}) and with an explicit mask (error {masked.leakable:.3f}); "
        "refusing to serve wrong tokens"
    )


def self_test(ttnn, device, model, mask_table, max_blocks: int) -> str:
    """Runs the leak check both ways at start-up (before any capture), logs it and sets the
    model's path: on the masked path model.mask_table is `mask_table`, else None."""
    model.mask_table = mask_table
    causal, masked = (check_decode_attention(ttnn, device, model, max_blocks, masked=m) for m in (False, True))
    path = choose_decode_attention(causal, masked)
    log.info(
        "decode attention self-test: the causal kernel %s (error %.3g past the position, %.3g at a block's end); "
        "masked %.3g; using the %s path%s",
        "does not leak" if causal.ok else "LEAKS past cur_pos",
        causal.leakable,
        causal.control,
        masked.leakable,
        path,
        f" (+2 ops per pass, attention over all {max_blocks * 32} positions per row)" if path == "masked" else "",
    )
    if path == "causal":
        model.mask_table = None
    return path


def check_bias_in_trace(ttnn, device, width: int = 64, seed: int = 0) -> dict[str, float]:
    """Inside one captured trace: linear with a one-row bias= (a broadcast) and linear plus a bias
    expanded to the rows, each against x @ w + b. Returns each one's largest error."""
    rng = np.random.default_rng(seed)
    x, w, b = (_bf16(rng.standard_normal(s)) for s in ((1, 1, ROWS, width), (width, width), (1, width)))
    want = x @ w + b
    xd, wd, bd = (_floats(ttnn, device, a) for a in (x, w, b))
    rows = _floats(ttnn, device, np.broadcast_to(b, (1, 1, ROWS, width)))
    programs = {
        "broadcast bias=": lambda: ttnn.linear(xd, wd, bias=bd),
        "expanded add": lambda: ttnn.add(ttnn.linear(xd, wd), rows),
    }
    errors = {}
    for name, program in programs.items():
        program()  # the compile run
        trace = ttnn.begin_trace_capture(device, cq_id=0)
        out = program()
        ttnn.end_trace_capture(device, trace, cq_id=0)
        ttnn.execute_trace(device, trace, cq_id=0, blocking=True)
        errors[name] = float(np.abs(ttnn.to_torch(out).double().numpy() - want).max())
        ttnn.release_trace(device, trace)
    return errors
