"""A numpy stand-in for the ttnn calls the backend makes, so model.py's wiring runs without a chip.

Each op does what ttnn's documentation says it does, on logical shapes, in float64: dtypes,
layouts, memory configs and shardings are labels, and tile padding is not modelled. It catches a
wrong weight layout, head split, RoPE table, page table, position or cache write, and a wrong
trace order; it cannot say whether a real op accepts these shapes and memory configs, nor
anything about bfloat16 numerics or speed. Those need a chip (tests/tt/test_model.py runs there too).

Trace capture records ops instead of running them and a replay reruns the record, as on a device:
every op is a thunk that reads its inputs' values when it runs. Install it with `installed()`.

Hazard modes (HAZARDS, off unless asked for) make it behave where tt-metal records that the chip
departs from the documented semantics (ARCHITECTURE.md's TT section and TTNN_NOTES.md):
- leaky_decode_attention: causal decode attention attends to the whole 32-position block holding
  cur_pos (tests/ttnn/unit_tests/operations/sdpa/repro_sdpa_decode_causal_mask_leak.py);
- tile_rewriting_cache_update: paged_update_cache's cores each read their row's whole tile, patch
  the row and write the tile back, so of two rows in one tile only one write survives
  (models/demos/blackhole/qwen36/tt/attention/tp.py writes its rows one call each for this);
- no_broadcast_in_trace: inside a captured trace a bias or addend with fewer rows than its input
  reaches only the rows it has (models/tt_transformers/tt/attention.py: "Broadcasting does not
  seem to be supported inside execute_trace");
- buffers_across_replays: a device buffer allocated while a trace exists and still alive at a
  replay, or a trace's output read after another trace replayed, reads as corrupt (ttnn 0.81.1's
  warning: such buffers "may be corrupted once a trace is executed if they are not released
  before then"; a trace's outputs live in memory other traces' intermediates may reuse).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
import weakref
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

HAZARDS = ("leaky_decode_attention", "tile_rewriting_cache_update", "no_broadcast_in_trace", "buffers_across_replays")
HAZARDS_ENV = "SPECDEC_TTNN_EMULATOR_HAZARDS"  # comma-separated, for services run as processes
_hazards = frozenset(h for h in os.environ.get(HAZARDS_ENV, "").split(",") if h)
_recording: list | None = None  # the ops of the trace being captured
_capturing: tuple | None = None  # (device, trace id) of that trace
# buffers_across_replays keeps one record for the process: a service owns one device (tests that
# hold several engines close one before the next captures)
_live_traces: set = set()  # (device, trace id) of every trace captured and not released
_allocated_after_capture: weakref.WeakSet = weakref.WeakSet()  # device buffers, while alive
_trace_outputs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tensor -> (device, trace) writing it


class Tensor:
    def __init__(self, array=None, data_type=None, layout=None):
        self._array = None if array is None else _values(array)
        self.dtype, self.layout = data_type, layout
        self.corrupt: str | None = None  # why reading it now would read garbage (buffers_across_replays)

    @property
    def array(self):
        if self.corrupt:
            raise AssertionError(self.corrupt)
        return self._array

    @array.setter
    def array(self, value):
        self._array, self.corrupt = value, None

    @property
    def shape(self):
        return tuple(self.array.shape)


def _device_buffer(tensor: Tensor) -> Tensor:
    """Registers a tensor allocated on the device (buffers_across_replays tracks its life)."""
    if _recording is not None:
        _trace_outputs[tensor] = _capturing
    elif _live_traces:
        _allocated_after_capture.add(tensor)
    return tensor


def _values(array) -> np.ndarray:
    array = np.array(array)
    return array.astype(np.float64) if array.dtype.kind == "f" else array


def _op(compute, num_outputs: int = 1):
    """An op: its outputs are computed by `compute()` now, or at every replay when captured."""
    outputs = [_device_buffer(Tensor()) for _ in range(num_outputs)]

    def run():
        values = compute()
        for out, value in zip(outputs, values if num_outputs > 1 else [values]):
            out.array = value

    if _recording is not None:
        _recording.append(run)
    else:
        run()
    return outputs[0] if num_outputs == 1 else tuple(outputs)


def _in_place(update):
    if _recording is not None:
        _recording.append(update)
    else:
        update()


# --- device, host tensors, traces -----------------------------------------------------------------


class Device:
    def __init__(self, device_id: int):
        self.device_id = device_id
        self.traces: dict[int, list] = {}
        self.ids = itertools.count(1)

    def compute_with_storage_grid_size(self):
        return SimpleNamespace(x=8, y=8)


def open_device(device_id: int, trace_region_size: int = 0) -> Device:
    return Device(device_id)


def close_device(device: Device) -> None:
    for trace in list(device.traces):
        release_trace(device, trace)


def to_device(host: Tensor, device: Device, memory_config=None) -> Tensor:
    return _device_buffer(Tensor(host.array, host.dtype, host.layout))


def deallocate(tensor: Tensor) -> None:
    _allocated_after_capture.discard(tensor)
    tensor.corrupt = "read after ttnn.deallocate"


def to_dtype(host: Tensor, dtype) -> Tensor:
    return Tensor(host.array, dtype, host.layout)


def to_layout(tensor: Tensor, layout) -> Tensor:
    return Tensor(tensor.array, tensor.dtype, layout)


def typecast(tensor: Tensor, dtype) -> Tensor:
    return Tensor(tensor.array, dtype, tensor.layout)


def zeros(shape, dtype=None, layout=None, device=None, memory_config=None) -> Tensor:
    return _device_buffer(Tensor(np.zeros(shape), dtype, layout))


def to_torch(tensor: Tensor) -> torch.Tensor:
    return torch.from_numpy(np.array(tensor.array))


def dump_tensor(path: Path, tensor: Tensor) -> None:
    with open(path, "wb") as f:
        np.savez(f, array=tensor.array, dtype=str(tensor.dtype), layout=str(tensor.layout))


def load_tensor(path: Path) -> Tensor:
    with open(path, "rb") as f:
        saved = np.load(f)
        return Tensor(saved["array"], str(saved["dtype"]), str(saved["layout"]))


def copy_host_to_device_tensor(host: Tensor, device_tensor: Tensor) -> None:
    assert host.shape == device_tensor.shape, "a trace reads its buffers where they are: same shape"
    device_tensor.array[...] = host.array


def begin_trace_capture(device: Device, cq_id: int = 0) -> int:
    global _recording, _capturing
    assert _recording is None, "one capture at a time"
    _recording, _capturing = [], (device, next(device.ids))
    return _capturing[1]


def end_trace_capture(device: Device, trace: int, cq_id: int = 0) -> None:
    global _recording, _capturing
    device.traces[trace], _recording, _capturing = _recording, None, None
    _live_traces.add((device, trace))


def execute_trace(device: Device, trace: int, cq_id: int = 0, blocking: bool = True) -> None:
    if "buffers_across_replays" in _hazards:
        for tensor in list(_allocated_after_capture):
            tensor.corrupt = "a device buffer allocated while a trace existed was still alive at a replay"
        for tensor, owner in list(_trace_outputs.items()):
            if owner != (device, trace):  # this replay rewrites its own outputs
                tensor.corrupt = f"trace {owner[1]}'s output read after trace {trace} replayed"
    for run in device.traces[trace]:
        run()


def release_trace(device: Device, trace: int) -> None:
    device.traces.pop(trace)
    _live_traces.discard((device, trace))


# --- configuration labels ---------------------------------------------------------------------------


def _label(*args, **kwargs):
    return SimpleNamespace(args=args, **kwargs)


WormholeComputeKernelConfig = SDPAProgramConfig = create_sharded_memory_config = _label
num_cores_to_corerangeset = _label
MathFidelity = SimpleNamespace(HiFi4="HiFi4")
ShardStrategy = SimpleNamespace(HEIGHT="height")
ShardOrientation = SimpleNamespace(ROW_MAJOR="row-major")
UnaryOpType = SimpleNamespace(SILU="silu")
DRAM_MEMORY_CONFIG, L1_MEMORY_CONFIG, L1_HEIGHT_SHARDED_MEMORY_CONFIG = "dram", "l1", "l1-height-sharded"
TILE_LAYOUT, ROW_MAJOR_LAYOUT = "tile", "row-major"
bfloat16, bfloat8_b, float32, uint16, uint32, int32 = "bfloat16", "bfloat8_b", "float32", "uint16", "uint32", "int32"


# --- data movement ----------------------------------------------------------------------------------


def _same(tensor: Tensor, *_, **__) -> Tensor:
    return _op(lambda: tensor.array)


interleaved_to_sharded = to_memory_config = untilize = _same


def unsqueeze_to_4D(tensor: Tensor) -> Tensor:
    return _op(lambda: tensor.array.reshape((1,) * (4 - tensor.array.ndim) + tensor.array.shape))


def transpose(tensor: Tensor, dim0: int, dim1: int) -> Tensor:
    return _op(lambda: np.swapaxes(tensor.array, dim0, dim1))


def slice(tensor: Tensor, starts, ends, steps) -> Tensor:  # noqa: A001 - ttnn's name
    import builtins

    return _op(lambda: tensor.array[tuple(builtins.slice(*a) for a in zip(starts, ends, steps))])


def embedding(ids: Tensor, weight: Tensor, layout=None) -> Tensor:
    assert weight.layout == ROW_MAJOR_LAYOUT, "embedding reads row-major weights"
    return _op(lambda: weight.array[ids.array.astype(np.int64)])  # [..., S] -> [..., S, width]


# --- math -------------------------------------------------------------------------------------------


def rms_norm(x: Tensor, epsilon: float, weight: Tensor) -> Tensor:
    def compute():
        a = x.array
        return a / np.sqrt((a * a).mean(-1, keepdims=True) + epsilon) * weight.array.reshape(-1)

    return _op(compute)


def _plus(a: np.ndarray, b: np.ndarray, broadcast: bool) -> np.ndarray:
    """a + b, b broadcast over a's rows; with broadcast off, only the rows b has get it."""
    rows = b.shape[-2] if b.ndim > 1 else 1
    if broadcast or rows >= a.shape[-2]:
        return a + b
    out = a.copy()
    out[..., :rows, :] += b.reshape(rows, -1)
    return out


def _broadcasts() -> bool:
    return not (_recording is not None and "no_broadcast_in_trace" in _hazards)


def linear(a: Tensor, b: Tensor, bias: Tensor | None = None, dtype=None, memory_config=None) -> Tensor:
    broadcast = _broadcasts()
    return _op(lambda: a.array @ b.array if bias is None else _plus(a.array @ b.array, bias.array, broadcast))


def add(a: Tensor, b: Tensor, memory_config=None) -> Tensor:
    broadcast = _broadcasts()
    return _op(lambda: _plus(a.array, b.array, broadcast))


def reshape(tensor: Tensor, shape) -> Tensor:
    return _op(lambda: tensor.array.reshape(tuple(shape)))


def mul(a: Tensor, b: Tensor, input_tensor_a_activations=(), memory_config=None) -> Tensor:
    assert set(input_tensor_a_activations) <= {UnaryOpType.SILU}

    def compute():
        x = a.array
        return (x / (1 + np.exp(-x)) if input_tensor_a_activations else x) * b.array

    return _op(compute)


def argmax(tensor: Tensor, dim: int, keepdim: bool = False) -> Tensor:
    return _op(lambda: tensor.array.argmax(axis=dim, keepdims=keepdim).astype(np.uint32))


def topk(tensor: Tensor, k: int, dim: int = -1, largest: bool = True, sorted: bool = True):  # noqa: A002
    def compute():
        order = np.argsort(-tensor.array if largest else tensor.array, axis=dim, kind="stable")
        indices = np.take(order, np.arange(k), axis=dim)
        return np.take_along_axis(tensor.array, indices, axis=dim), indices.astype(np.uint32)

    return _op(compute, num_outputs=2)


def _rotate(x: np.ndarray, cos: Tensor, sin: Tensor, rotation: Tensor) -> np.ndarray:
    """x * cos + (x @ T) * sin, T applied to each 32-wide tile of the head dimension; a decode
    rotation tensor holds one T per row and they must all be the same."""
    blocks = rotation.array.reshape(-1, 32, 32)
    assert np.array_equal(blocks, np.broadcast_to(blocks[0], blocks.shape)), "one rotation tile per row"
    tiles = x.reshape(*x.shape[:-1], -1, 32)
    return x * cos.array + (tiles @ blocks[0]).reshape(x.shape) * sin.array


def _attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, mask=None, bias=None) -> np.ndarray:
    """q [heads, n, d], k and v [kv_heads, m, d]; heads share kv heads in groups (GQA). mask:
    boolean, True where attended; bias: added to the scores (an attention mask's values)."""
    group = q.shape[0] // k.shape[0]
    k, v = np.repeat(k, group, axis=0), np.repeat(v, group, axis=0)
    scores = q @ k.swapaxes(-1, -2) * scale
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)
    if bias is not None:
        scores = scores + bias
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    return (scores / scores.sum(-1, keepdims=True)) @ v


def _heads(flat: np.ndarray, num_heads: int, num_kv_heads: int):
    """[..., (h + 2 kv) d] -> q [..., h, d], k and v [..., kv, d]: q heads, then k, then v."""
    d = flat.shape[-1] // (num_heads + 2 * num_kv_heads)
    q, k, v = np.split(flat, [num_heads * d, (num_heads + num_kv_heads) * d], axis=-1)
    split = lambda a, n: a.reshape(*a.shape[:-1], n, d)  # noqa: E731
    return split(q, num_heads), split(k, num_kv_heads), split(v, num_kv_heads)


def _cached(cache: np.ndarray, page_row: np.ndarray, length: int) -> np.ndarray:
    """Positions [0, length) of one sequence, read through its page table: [kv_heads, length, d]."""
    positions = np.arange(length)
    block = cache.shape[2]
    return cache[page_row[positions // block], :, positions % block].swapaxes(0, 1)


def _nlp_create_qkv_heads_decode(qkv: Tensor, num_heads: int, num_kv_heads: int, memory_config=None):
    # [1, 1, B, (h + 2 kv) d] -> q [1, B, h, d], k and v [1, B, kv, d]
    return _op(lambda: tuple(a[0] for a in _heads(qkv.array, num_heads, num_kv_heads)), num_outputs=3)


def _nlp_create_qkv_heads(qkv: Tensor, num_heads: int, num_kv_heads: int, transpose_k_heads: bool, memory_config=None):
    # [1, 1, S, (h + 2 kv) d] -> q [1, h, S, d], k and v [1, kv, S, d]
    assert not transpose_k_heads
    return _op(lambda: tuple(a[0, 0].swapaxes(0, 1)[None] for a in _heads(qkv.array, num_heads, num_kv_heads)), 3)


def _rotary_embedding_llama(x: Tensor, cos: Tensor, sin: Tensor, rotation: Tensor, is_decode_mode: bool):
    # decode: x [1, B, heads, d], cos/sin [1, B, 1, d]; prefill: x [1, heads, S, d], cos/sin [1, 1, S, d]
    return _op(lambda: _rotate(x.array, cos, sin, rotation))


def _paged_update_cache(cache: Tensor, new: Tensor, update_idxs_tensor: Tensor, page_table: Tensor):
    """new [1, B, kv, d]: row b goes to position update_idxs[b] of its page-table row; -1 skips
    (the op's docstring). tile_rewriting_cache_update: each row writes back the whole tile (a
    block's rows of every head) as it was before the call, with its own row patched in."""

    def update():
        block = cache.array.shape[2]
        before = cache.array.copy() if "tile_rewriting_cache_update" in _hazards else None
        for b, position in enumerate(update_idxs_tensor.array):
            if position >= 0:
                page = page_table.array[b, position // block]
                if before is not None:
                    cache.array[page] = before[page]
                cache.array[page, :, position % block] = new.array[0, b]

    _in_place(update)


def _paged_fill_cache(cache: Tensor, fill: Tensor, page_table: Tensor, batch_idx: int):
    """fill [1, kv, L, d] -> positions [0, L) of the page table's row batch_idx."""

    def update():
        block = cache.array.shape[2]
        for p in range(fill.array.shape[2]):
            cache.array[page_table.array[batch_idx, p // block], :, p % block] = fill.array[0, :, p]

    _in_place(update)


def _paged_sdpa_decode(q, keys, values, page_table, cur_pos_tensor, scale, is_causal=True, attn_mask=None, **config):
    """q [1, B, h, d]; -1 rows skip. Causal: row b attends to positions [0, cur_pos[b]] of its
    sequence; with leaky_decode_attention, to the end of the 32-position block holding cur_pos.
    is_causal=False: to every position of its page-table row, attn_mask [1, B, h, s] added to the
    scores (the op's docstring: the mask is only valid non-causal, `s` the page table's positions)."""
    assert is_causal == (attn_mask is None), "attn_mask is only valid with is_causal=False"
    leaky = "leaky_decode_attention" in _hazards

    def compute():
        out = np.zeros_like(q.array)
        block = keys.array.shape[2]
        for b, position in enumerate(cur_pos_tensor.array):
            if position >= 0:
                pages = page_table.array[b]
                if not is_causal:
                    length, bias = len(pages) * block, attn_mask.array[0, b][:, None, :]
                else:
                    length, bias = (position // 32 + 1) * 32 if leaky else position + 1, None
                k, v = (_cached(c.array, pages, length) for c in (keys, values))
                out[0, b] = _attention(q.array[0, b][:, None], k, v, scale, bias=bias)[:, 0]
        return out

    return _op(compute)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, is_causal: bool, scale: float, compute_kernel_config=None):
    def compute():
        n = q.array.shape[2]
        mask = np.tril(np.ones((n, n), dtype=bool)) if is_causal else None
        return _attention(q.array[0], k.array[0], v.array[0], scale, mask)[None]

    return _op(compute)


def _nlp_concat_heads_decode(x: Tensor, num_heads: int) -> Tensor:
    return _op(lambda: x.array[0, :, :num_heads].reshape(1, 1, x.array.shape[1], -1))  # -> [1, 1, B, h d]


def _nlp_concat_heads(x: Tensor, memory_config=None) -> Tensor:
    return _op(lambda: x.array[0].swapaxes(0, 1).reshape(1, 1, x.array.shape[2], -1))  # -> [1, 1, S, h d]


experimental = SimpleNamespace(
    nlp_create_qkv_heads_decode=_nlp_create_qkv_heads_decode,
    nlp_create_qkv_heads=_nlp_create_qkv_heads,
    rotary_embedding_llama=_rotary_embedding_llama,
    paged_update_cache=_paged_update_cache,
    paged_fill_cache=_paged_fill_cache,
    nlp_concat_heads_decode=_nlp_concat_heads_decode,
    nlp_concat_heads=_nlp_concat_heads,
)
transformer = SimpleNamespace(
    paged_scaled_dot_product_attention_decode=_paged_sdpa_decode, scaled_dot_product_attention=_sdpa
)


def process_env(hazards=HAZARDS) -> dict[str, str]:
    """The environment in which a child process's `import ttnn` gives this emulator, with these
    hazard modes on (all of them unless told)."""
    root = Path(__file__).resolve().parents[1]
    return {"PYTHONPATH": f"{root / 'tests' / 'ttnn_shim'}{os.pathsep}{root}", HAZARDS_ENV: ",".join(hazards)}


@contextlib.contextmanager
def installed(hazards=()):
    """`import ttnn` gives this module, with these hazard modes on, while inside; the backend's
    modules that bound the real ttnn (or none) at import are imported afresh, and restored after."""
    global _hazards
    unknown = set(hazards) - set(HAZARDS)
    assert not unknown, f"unknown hazard modes {sorted(unknown)}"
    bound = ("specdec.engine.tt.model",)
    saved = {name: sys.modules.get(name) for name in ("ttnn", *bound)}
    saved_hazards, _hazards = _hazards, frozenset(hazards)
    sys.modules["ttnn"] = sys.modules[__name__]
    for name in bound:
        sys.modules.pop(name, None)
    try:
        yield sys.modules[__name__]
    finally:
        _hazards = saved_hazards
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
