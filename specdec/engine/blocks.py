"""KV memory of a device: a fixed pool of cache blocks that sessions borrow and return.

Every backend allocates its paged cache once at start-up (a trace or CUDA graph captures its
address, so it never moves; a full pool answers RESOURCE_EXHAUSTED instead of running out of
memory). A session takes enough blocks for its capacity when it opens and gives them back when
its stream ends; its page table maps position p to block blocks[p // block_size], offset
p % block_size.
"""

from __future__ import annotations

from specdec.errors import ResourceExhausted


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one position, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: the lowest id is handed out first

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, capacity: int) -> int:
        return -(-capacity // self.block_size)

    def allocate(self, capacity: int) -> list[int]:
        """Blocks for `capacity` positions, or ResourceExhausted when the pool is short."""
        needed = self.blocks_for(capacity)
        if needed > len(self._free):
            raise ResourceExhausted(
                f"the KV cache has {len(self._free)} free blocks of {self.block_size} positions; "
                f"capacity {capacity} needs {needed}"
            )
        return [self._free.pop() for _ in range(needed)]

    def release(self, blocks: list[int]) -> None:
        """Returns a session's blocks. A block given back twice is a bug that would let two sessions
        share memory, so it raises instead of corrupting the pool."""
        free = set(self._free)
        for block in blocks:
            if not 0 <= block < self.num_blocks or block in free:
                raise ValueError(f"block {block} is not on loan from this pool")
            free.add(block)
        self._free.extend(reversed(blocks))
