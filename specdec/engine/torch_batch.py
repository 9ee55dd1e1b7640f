"""How a pass of many sessions' chunks is laid out for the torch model, and the KV pool it writes.

A pass is flattened: T rows (every chunk's tokens side by side), each with its position and the
pool slot its K/V goes to. Linears see only the T rows. Attention runs per group:
- a chunk of many rows (a prompt's prefill chunk) attends alone, reading its keys as a slice of
  the pool when its blocks are consecutive (no copy), gathered through its blocks otherwise;
- the short chunks (decode and verify rows) of all other sessions attend together, padded to
  [sessions, rows, keys], in one call: each session's keys gathered through its own blocks, each
  row masked to the positions up to its own. Keys past a row's position (its block's later rows,
  rolled-back tokens, another session's data in a padded tail) are masked, never read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from specdec.engine.base import Chunk, KVSession
from specdec.engine.config import ModelConfig

SHORT_ROWS = 32  # chunks up to this many rows attend in the padded group; longer ones alone


class KVPool:
    """Keys and values of every session, allocated once: slot s of block b is b * block_size + s.

    Zeroed, not empty: masked entries get weight exactly 0, but 0 * NaN would still be NaN.
    """

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device):
        # Slot-major: gathering a session's keys copies whole [kv_heads, head_dim] rows.
        shape = (config.num_layers, num_blocks * block_size, config.num_kv_heads, config.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)  # [layers, slots, kv_heads, head_dim]
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size

    @staticmethod
    def bytes_per_position(config: ModelConfig, dtype: torch.dtype) -> int:
        return 2 * config.num_layers * config.num_kv_heads * config.head_dim * dtype.itemsize


@dataclass
class AttentionGroup:
    """Rows of `batch` sessions, `rows_per_seq` each (padded), attending over `num_keys` keys."""

    rows: torch.Tensor | slice  # [batch * rows_per_seq] indices into the pass's rows, or a slice of them
    query_positions: torch.Tensor  # [batch, rows_per_seq]; padding rows at 0
    key_slots: torch.Tensor | slice  # [batch, num_keys] pool slot of key position p, or one slice (batch 1)
    real: torch.Tensor | None  # [num_real] which of the padded rows are real; None: all
    batch: int
    rows_per_seq: int
    num_keys: int

    def mask(self) -> torch.Tensor | None:
        """[batch, 1, rows, keys] bool: key position p is visible to a row at position >= p."""
        if self.batch == 1 and self.rows_per_seq == 1:
            return None  # one row at the end of its keys sees them all
        keys = torch.arange(self.num_keys, device=self.query_positions.device)
        return keys <= self.query_positions.view(self.batch, 1, self.rows_per_seq, 1)

    def attend(self, q, keys, values, mask, out) -> torch.Tensor:
        """q: [T, heads, d]; keys, values: [slots, kv_heads, d]; writes this group's rows of out [T, heads * d]."""
        b, n, length = self.batch, self.rows_per_seq, self.num_keys
        heads, d = q.shape[1], q.shape[2]
        qg = q[self.rows].view(b, n, heads, d).transpose(1, 2)  # [b, heads, n, d]
        if isinstance(self.key_slots, slice):
            kg, vg = (t[self.key_slots][None].transpose(1, 2) for t in (keys, values))  # [1, kv_heads, L, d]
        else:
            flat = self.key_slots.reshape(-1)
            kg, vg = (t.index_select(0, flat).view(b, length, -1, d).transpose(1, 2) for t in (keys, values))
        o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, enable_gqa=True)  # [b, heads, n, d]
        o = o.transpose(1, 2).reshape(b * n, heads * d)
        rows = self.rows
        if self.real is not None:
            o, rows = o[self.real], rows[self.real]
        if isinstance(rows, slice) and rows == slice(0, out.shape[0]):
            return o  # the group is the whole pass
        out[rows] = o
        return out


@dataclass
class PassLayout:
    token_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slots: torch.Tensor  # [T] where each row's K/V is written
    groups: list[AttentionGroup]
    output_rows: torch.Tensor | None  # [num_outputs] rows whose logits are wanted; None: all T


def slots_of(blocks: list[int], start: int, end: int, block_size: int) -> list[int]:
    return [blocks[p // block_size] * block_size + p % block_size for p in range(start, end)]


def consecutive_slots(blocks: list[int], end: int, block_size: int) -> slice | None:
    """The slots of positions [0, end) as one slice, when the blocks that hold them are consecutive."""
    used = blocks[: -(-end // block_size)]
    if used and used == list(range(used[0], used[0] + len(used))):
        first = used[0] * block_size
        return slice(first, first + end)
    return None


def _single_group(session: KVSession, first_row: int, n: int, block_size: int) -> AttentionGroup:
    start, end = session.length, session.length + n
    keys = consecutive_slots(session.blocks, end, block_size)
    if keys is None:
        keys = torch.tensor([slots_of(session.blocks, 0, end, block_size)])
    return AttentionGroup(
        rows=slice(first_row, first_row + n),
        query_positions=torch.arange(start, end)[None],
        key_slots=keys,
        real=None,
        batch=1,
        rows_per_seq=n,
        num_keys=end,
    )


def _padded_group(members: list[tuple[KVSession, int, int]], block_size: int) -> AttentionGroup:
    """members: (session, first row, rows) of each short chunk."""
    b = len(members)
    n = max(rows for _, _, rows in members)
    length = max(s.length + rows for s, _, rows in members)
    width = -(-length // block_size)
    table = torch.tensor([s.blocks[:width] + s.blocks[-1:] * (width - len(s.blocks[:width])) for s, _, _ in members])
    p = torch.arange(length)
    key_slots = table[:, p // block_size] * block_size + p % block_size  # [b, L]
    rows, positions, real = [], [], []
    for i, (session, first, count) in enumerate(members):
        rows += [first + min(j, count - 1) for j in range(n)]  # padding repeats the last row
        positions += [session.length + j if j < count else 0 for j in range(n)]
        real += [i * n + j for j in range(count)]
    return AttentionGroup(
        rows=torch.tensor(rows),
        query_positions=torch.tensor(positions).view(b, n),
        key_slots=key_slots,
        real=None if len(real) == b * n else torch.tensor(real),
        batch=b,
        rows_per_seq=n,
        num_keys=length,
    )


def pass_layout(chunks: list[Chunk], block_size: int, device: torch.device) -> PassLayout:
    tokens, positions, slots, outputs = [], [], [], []
    singles, short = [], []
    for chunk in chunks:
        s, n, first = chunk.session, len(chunk.token_ids), len(tokens)
        tokens += chunk.token_ids
        positions += range(s.length, s.length + n)
        slots += slots_of(s.blocks, s.length, s.length + n, block_size)
        outputs += range(first + n - chunk.num_outputs, first + n)
        (short if n <= SHORT_ROWS else singles).append((s, first, n))
    if len(short) == 1:
        singles, short = singles + short, []
    groups = [_single_group(s, first, n, block_size) for s, first, n in singles]
    if short:
        groups.append(_padded_group(short, block_size))
    layout = PassLayout(
        token_ids=torch.tensor(tokens),
        positions=torch.tensor(positions),
        slots=torch.tensor(slots),
        groups=groups,
        output_rows=None if len(outputs) == len(tokens) else torch.tensor(outputs, dtype=torch.long),
    )
    return layout if device.type == "cpu" else to_device(layout, device)


def to_device(layout: PassLayout, device: torch.device) -> PassLayout:
    def move(x):
        return x.to(device, non_blocking=True) if isinstance(x, torch.Tensor) else x

    groups = [
        AttentionGroup(
            move(g.rows), move(g.query_positions), move(g.key_slots), move(g.real), g.batch, g.rows_per_seq, g.num_keys
        )  # fmt: skip
        for g in layout.groups
    ]
    return PassLayout(
        move(layout.token_ids), move(layout.positions), move(layout.slots), groups, move(layout.output_rows)
    )
