"""KV block allocator (reference counted) and the host swap space for preempted requests' KV."""
from __future__ import annotations

from collections import deque

from alise.sched.request import Request


class BlockAllocator:
    """Hands out fixed-size KV blocks from a pool of ``num_blocks``.

    Each block has a reference count and goes back to the free list when its last reference is freed. Today
    every block has one owner (counts are 0 or 1, and catch double frees); a prefix cache would share blocks
    by counting more references.
    """

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.ref_counts = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free_blocks):
            raise MemoryError(f"asked for {n} KV blocks, {len(self.free_blocks)} free")
        blocks = [self.free_blocks.popleft() for _ in range(n)]
        for b in blocks:
            self.ref_counts[b] = 1
        return blocks

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            assert self.ref_counts[b] > 0, f"double free of block {b}"
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self.free_blocks.append(b)

    def grow(self, request: Request, num_tokens: int) -> bool:
        """Extend ``request.block_table`` to hold ``num_tokens`` tokens; False (and no change) if the pool is short."""
        need = self.blocks_for(num_tokens) - len(request.block_table)
        if need > self.num_free:
            return False
        if need > 0:
            request.block_table += self.allocate(need)
        return True

    def release(self, request: Request) -> None:
        self.free(request.block_table)
        request.block_table = []

    def check_invariants(self, block_tables: list[list[int]]) -> None:
        """Raise AssertionError unless the free list and ref counts agree with the live block tables."""
        counts = [0] * self.num_blocks
        for table in block_tables:
            for b in table:
                assert 0 <= b < self.num_blocks, f"block id {b} out of range"
                counts[b] += 1
        assert counts == self.ref_counts, "ref counts disagree with the block tables"
        free = set(self.free_blocks)
        assert len(free) == len(self.free_blocks), "a block is on the free list twice"
        assert free == {b for b in range(self.num_blocks) if counts[b] == 0}, "free list != unreferenced blocks"


class SwapSpace:
    """Byte accounting for KV held in host memory while its request waits (ALISE's adaptive memory)."""

    def __init__(self, capacity_bytes: int, bytes_per_token: int):
        self.capacity_bytes, self.bytes_per_token = capacity_bytes, bytes_per_token
        self.used_bytes = 0

    def fits(self, num_tokens: int) -> bool:
        return self.used_bytes + num_tokens * self.bytes_per_token <= self.capacity_bytes

    def take(self, num_tokens: int) -> None:
        assert self.fits(num_tokens)
        self.used_bytes += num_tokens * self.bytes_per_token

    def give_back(self, num_tokens: int) -> None:
        self.used_bytes -= num_tokens * self.bytes_per_token
        assert self.used_bytes >= 0
