"""A stand-in for a Tenstorrent device, so TtEngine's host logic runs in CI without a chip.

FakeTtnn provides the ttnn calls TtEngine and its runtime make (host tensors, device buffers,
copies, trace capture and replay). FakeDeviceModel keeps TtTransformer's contract: its paged
KV cache holds, per slot, the token written there, and each live row's logits are the torch
model's over the tokens that row can read through its page table. So a wrong position, block,
rollback or buffer shows up as wrong logits, and an unwritten slot read raises.
Capture records a step without running it, and a replay reruns it, as a device trace does.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import torch

from specdec.engine.base import ModelInfo, forward_one
from specdec.engine.torch_engine import TorchEngine
from specdec.engine.tt.device import DeviceOwner
from specdec.engine.tt.engine import BLOCK_SIZE, TtEngine, kv_block_pool
from specdec.engine.tt.step_inputs import DEAD, ROWS

UNWRITTEN = -1


class Box:
    """A host or device tensor: a numpy array."""

    def __init__(self, array):
        self.array = np.array(array)

    @property
    def shape(self):
        return self.array.shape


class FakeDevice:
    def __init__(self):
        self.capturing = False
        self.recorded = None
        self.traces = {}
        self.ids = itertools.count(1)
        self.replays = 0

    def replay(self, trace):
        self.replays += 1
        self.traces[trace]()


def fake_ttnn() -> SimpleNamespace:
    def copy_host_to_device_tensor(host, device_tensor):
        assert host.shape == device_tensor.shape, "a trace buffer must keep its shape"
        device_tensor.array[...] = host.array

    def begin_trace_capture(device, cq_id):
        assert not device.capturing
        device.capturing = True
        return next(device.ids)

    def end_trace_capture(device, trace, cq_id):
        device.traces[trace], device.recorded, device.capturing = device.recorded, None, False

    return SimpleNamespace(
        uint32="uint32",
        int32="int32",
        ROW_MAJOR_LAYOUT="row-major",
        Tensor=lambda array, data_type, layout: Box(array),
        to_device=lambda host, device, memory_config=None: Box(host.array),
        deallocate=lambda box: None,
        copy_host_to_device_tensor=copy_host_to_device_tensor,
        to_torch=lambda box: torch.from_numpy(np.array(box.array)),
        begin_trace_capture=begin_trace_capture,
        end_trace_capture=end_trace_capture,
        execute_trace=lambda device, trace, cq_id, blocking: device.replay(trace),
        release_trace=lambda device, trace: device.traces.pop(trace),
    )


class FakeDeviceModel:
    masked = False  # the kernel's causal mask: this model reads exactly up to each row's position

    def __init__(self, reference: TorchEngine, device: FakeDevice, num_blocks: int):
        self.reference = reference
        self.device = device
        self.slots = np.full((num_blocks, BLOCK_SIZE), UNWRITTEN)
        self.vocab = reference.info.vocab_size
        self.steps = 0

    def _logits_after(self, page_row, position: int) -> torch.Tensor:
        tokens = [int(self.slots[page_row[p // BLOCK_SIZE], p % BLOCK_SIZE]) for p in range(position + 1)]
        assert UNWRITTEN not in tokens, f"position {tokens.index(UNWRITTEN)} is read before it was written"
        session = self.reference.new_session(len(tokens))
        try:
            return forward_one(self.reference, session, tokens, 1).logits[0]
        finally:
            self.reference.end_session(session)

    def step(self, buffers, write_rows: int, candidates: int = 0, out=None):
        out = out or {
            "argmax": Box(np.zeros((1, 1, ROWS, 1), np.uint32)),
            "logits": Box(np.zeros((1, 1, ROWS, self.vocab))),
            **(
                {
                    "top_values": Box(np.zeros((1, 1, ROWS, candidates))),
                    "top_indices": Box(np.zeros((1, 1, ROWS, candidates), np.uint32)),
                }
                if candidates
                else {}
            ),
        }
        if self.device.capturing:  # recorded, not run
            self.device.recorded = lambda: self.step(buffers, write_rows, candidates, out)
            return out
        self.steps += 1
        tokens, positions = buffers["tokens"].array[0], buffers["positions"].array
        pages = buffers["page_table"].array
        writes = [positions] if write_rows == 1 else [buffers[f"write_positions_{j}"].array for j in range(write_rows)]
        for write in writes:
            live = [r for r, p in enumerate(write) if p != DEAD]
            tiles = [pages[r][write[r] // BLOCK_SIZE] for r in live]
            assert len(set(tiles)) == len(tiles), "two rows of one tile in one KV update would lose a write"
            for r in live:
                self.slots[pages[r][write[r] // BLOCK_SIZE], write[r] % BLOCK_SIZE] = tokens[r]
        for r, p in enumerate(positions):
            if p != DEAD:
                logits = self._logits_after(pages[r], int(p))
                out["logits"].array[0, 0, r] = logits.numpy()
                out["argmax"].array[0, 0, r, 0] = int(logits.argmax())
                if candidates:  # unsorted, as the device's topk may return them
                    top = torch.topk(logits, candidates)
                    order = torch.randperm(candidates, generator=torch.Generator().manual_seed(self.steps))
                    out["top_values"].array[0, 0, r] = top.values[order].numpy()
                    out["top_indices"].array[0, 0, r] = top.indices[order].numpy()
        return out

    def prefill(self, tokens, length: int, page_table, fill_length: int, num_logits: int):
        pages = page_table.array[0]
        for p in range(fill_length):
            self.slots[pages[p // BLOCK_SIZE], p % BLOCK_SIZE] = tokens.array[0, p]
        first, last = (length - num_logits) // 32 * 32, -(-length // 32) * 32
        logits = np.zeros((1, 1, last - first, self.vocab))
        for p in range(first, min(last, length)):
            logits[0, 0, p - first] = self._logits_after(pages, p).numpy()
        return Box(logits), first


def fake_tt_engine(reference: TorchEngine, max_seq_len: int = 256, max_sessions: int = 4, max_draft_tokens: int = 8):
    """A TtEngine whose device is FakeDeviceModel over `reference`, warmed up as at start-up."""
    device = FakeDevice()
    owner = DeviceOwner(0, lambda i: device, lambda d: None)
    owner.device = device  # not opened through the process-wide guard: a test holds several
    pool = kv_block_pool(max_sessions, max_seq_len)
    info = ModelInfo(**{**reference.info.__dict__, "max_seq_len": max_seq_len, "backend": "ttnn", "device": "fake-tt"})
    engine = TtEngine(
        fake_ttnn(), owner, FakeDeviceModel(reference, device, pool.num_blocks), info, pool, max_draft_tokens + 1
    )
    engine.warm_up()
    return engine
