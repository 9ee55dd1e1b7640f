"""What the host writes into a step trace's input buffers: tokens, positions, page table.

Pure bookkeeping, no device: every replay of the decode-shaped step reads these, so getting a
position or a block wrong here is the whole class of rollback bugs, and it is tested on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

ROWS = 32  # a tile's height: the batch of every decode-shaped pass, live rows first
DEAD = -1  # a row at position -1 writes no KV and attends to nothing


@dataclass(frozen=True)
class StepInputs:
    token_ids: list[int]  # [ROWS], 0 in dead rows
    positions: list[int]  # [ROWS], DEAD in dead rows
    rope_positions: list[int]  # [ROWS]: the cos/sin lookup index; an embedding index cannot be -1
    write_positions: list[list[int]]  # [write_rows][ROWS]: row j's position in row j, DEAD elsewhere
    page_table: list[list[int]]  # [ROWS][max_blocks]: every row reads the one session's blocks
    live: int


def step_inputs(start: int, token_ids: list[int], blocks: list[int], max_blocks: int, write_rows: int) -> StepInputs:
    """Inputs for one pass writing token_ids at positions start, start+1, ...

    paged_update_cache updates a 32-row tile with one core per row, read-modify-write, so rows
    whose positions share a tile would lose each other's writes. The verify step therefore writes
    K and V once per row, each time with only that row's position live: write_positions[j].
    """
    live = len(token_ids)
    if not 1 <= live <= write_rows <= ROWS:
        raise ValueError(f"a pass carries 1..{write_rows} tokens (write_rows <= {ROWS}), got {live}")
    if len(blocks) > max_blocks:
        raise ValueError(f"{len(blocks)} blocks exceed the page table's {max_blocks} columns")
    dead = ROWS - live
    positions = [start + j for j in range(live)] + [DEAD] * dead
    # Columns past the session's blocks are never addressed (positions stay below its capacity);
    # they repeat its last block so that even a bug could not write into another session's memory.
    table_row = blocks + blocks[-1:] * (max_blocks - len(blocks))
    return StepInputs(
        token_ids=list(token_ids) + [0] * dead,
        positions=positions,
        rope_positions=[max(p, 0) for p in positions],
        write_positions=[[p if i == j else DEAD for i, p in enumerate(positions)] for j in range(write_rows)],
        page_table=[list(table_row) for _ in range(ROWS)],
        live=live,
    )


def split_into_passes(start: int, token_ids: list[int], rows: int) -> list[tuple[int, list[int]]]:
    """(start, tokens) of each pass when more tokens arrive than a pass has rows. Passes run in
    order, so each one's rows attend to the KV the earlier passes wrote."""
    return [(start + i, token_ids[i : i + rows]) for i in range(0, len(token_ids), rows)]


def slot_of(position: int, blocks: list[int], block_size: int) -> tuple[int, int]:
    """(block, offset) holding a position: what the device's paged cache does with the page table."""
    return blocks[position // block_size], position % block_size


PREFILL_ALIGN = 128  # prefill attention runs on lengths that are multiples of this


def session_positions(capacity: int) -> int:
    """Positions a session's blocks cover: its capacity rounded up to PREFILL_ALIGN, so a padded
    prompt's rows still land in blocks the session owns."""
    return -(-capacity // PREFILL_ALIGN) * PREFILL_ALIGN


def prefill_lengths(max_seq_len: int) -> list[int]:
    """The padded prompt lengths prefill runs at: 128, 256, 512, ... up to max_seq_len. A short
    ladder, so warm-up compiles every prefill program before the traces are captured (a kernel
    compiled after a capture can overwrite the trace region, tt-metal #48536)."""
    top = session_positions(max_seq_len)
    lengths, n = [], PREFILL_ALIGN
    while n < top:
        lengths.append(n)
        n *= 2
    return lengths + [top]


def prefill_length(num_tokens: int, max_seq_len: int) -> int:
    return next(n for n in prefill_lengths(max_seq_len) if n >= num_tokens)


def blocks_written_by_prefill(num_tokens: int, blocks: list[int], block_size: int) -> list[int]:
    """The page table prefill fills through: only the blocks the real prompt reaches, so padding
    rows past them are never written anywhere."""
    return blocks[: -(-num_tokens // block_size)]
