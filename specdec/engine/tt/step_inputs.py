"""What the host writes into a step trace's input buffers: tokens, positions, page table.

Pure bookkeeping, no device: every replay of the decode-shaped step reads these, so getting a
position or a block wrong here is the whole class of rollback bugs, and it is tested on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

ROWS = 32  # a tile's height: the batch of every decode-shaped pass, live rows first
DEAD = -1  # a row at position -1 writes no KV and attends to nothing


@dataclass(frozen=True)
class Piece:
    """One session's rows in a pass: token_ids at positions start, start + 1, ..."""

    start: int
    token_ids: list[int]
    blocks: list[int]  # the session's KV blocks (its page-table row)


@dataclass(frozen=True)
class StepInputs:
    token_ids: list[int]  # [ROWS], 0 in dead rows
    positions: list[int]  # [ROWS], DEAD in dead rows
    rope_positions: list[int]  # [ROWS]: the cos/sin lookup index; an embedding index cannot be -1
    write_positions: list[list[int]]  # [write_rows][ROWS]: write j holds the j-th row of every piece
    page_table: list[list[int]]  # [ROWS][max_blocks]: each row reads its own session's blocks
    rows: list[range]  # each piece's rows, in order
    live: int


def step_inputs(pieces: list[Piece], max_blocks: int, write_rows: int) -> StepInputs:
    """Inputs for one decode-shaped pass carrying several sessions' pieces side by side.

    paged_update_cache updates a 32-row tile with one core per row, read-modify-write, so two live
    rows whose positions share a tile (a block of one session) would lose each other's writes. K
    and V are therefore written in write_rows calls: call j carries the j-th row of every piece,
    and rows of different pieces are different sessions' blocks, never one tile.
    """
    live = sum(len(p.token_ids) for p in pieces)
    if not pieces or live > ROWS:
        raise ValueError(f"a pass carries 1..{ROWS} rows, got {live}")
    tokens, positions, table, rows, writes = [], [], [], [], [[DEAD] * ROWS for _ in range(write_rows)]
    for piece in pieces:
        n = len(piece.token_ids)
        if not 1 <= n <= write_rows:
            raise ValueError(f"a session puts 1..{write_rows} tokens in a pass (its writes), got {n}")
        if len(piece.blocks) > max_blocks:
            raise ValueError(f"{len(piece.blocks)} blocks exceed the page table's {max_blocks} columns")
        first = len(tokens)
        rows.append(range(first, first + n))
        tokens += piece.token_ids
        positions += range(piece.start, piece.start + n)
        # Columns past the session's blocks are never addressed (positions stay below its
        # capacity); they repeat its last block so that even a bug could not reach another session.
        table += [piece.blocks + piece.blocks[-1:] * (max_blocks - len(piece.blocks))] * n
        for j in range(n):
            writes[j][first + j] = piece.start + j
    dead = ROWS - live
    return StepInputs(
        token_ids=tokens + [0] * dead,
        positions=positions + [DEAD] * dead,
        rope_positions=positions + [0] * dead,
        write_positions=writes,
        page_table=table + table[-1:] * dead,  # dead rows neither write nor attend
        rows=rows,
        live=live,
    )


def pack_passes(lengths: list[int], write_rows: int) -> list[list[tuple[int, int, int]]]:
    """How chunks of `lengths` tokens share decode-shaped passes: per pass, (chunk, first token,
    count) pieces, at most ROWS rows and write_rows per chunk. A chunk longer than that goes on in
    later passes, so its later rows attend to the KV its earlier ones wrote."""
    done = [0] * len(lengths)
    passes = []
    while any(d < n for d, n in zip(done, lengths)):
        pieces, free = [], ROWS
        for i, n in enumerate(lengths):
            count = min(n - done[i], write_rows, free)
            if count > 0:
                pieces.append((i, done[i], count))
                done[i] += count
                free -= count
        passes.append(pieces)
    return passes


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
