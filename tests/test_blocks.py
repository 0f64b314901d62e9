"""BlockAllocator under random sequences of allocate / grow / free / preempt-release (hypothesis)."""
from __future__ import annotations

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, precondition, rule

from alise.sampling import SamplingParams
from alise.sched.blocks import BlockAllocator, SwapSpace
from alise.sched.request import Request

NUM_BLOCKS, BLOCK_SIZE = 12, 4


class AllocatorMachine(RuleBasedStateMachine):
    """Owners are Requests (their ``block_table`` is the live table); the model is the list of live owners.

    The model's own accounting (which blocks each owner holds, so each block's reference count) is kept
    independently of the allocator and compared after every step.
    """

    owners = Bundle("owners")

    def __init__(self):
        super().__init__()
        self.alloc = BlockAllocator(NUM_BLOCKS, BLOCK_SIZE)
        self.live: dict[int, Request] = {}   # id -> owner
        self.tokens: dict[int, int] = {}     # id -> tokens its table was sized for
        self.counter = 0

    def _new_owner(self, table: list[int], tokens: int) -> Request:
        self.counter += 1
        r = Request(str(self.counter), [0], SamplingParams(max_tokens=1))
        r.block_table = table
        self.live[id(r)] = r
        self.tokens[id(r)] = tokens
        return r

    def _held(self) -> set[int]:
        return {b for r in self.live.values() for b in r.block_table}

    # -- rules ------------------------------------------------------------------------------------------

    @rule(target=owners, n=st.integers(0, NUM_BLOCKS + 2))
    def allocate(self, n):
        held, free_before = self._held(), self.alloc.num_free
        if n > free_before:
            with pytest.raises(MemoryError):
                self.alloc.allocate(n)
            assert self.alloc.num_free == free_before       # a failed allocation changes nothing
            return self._new_owner([], 0)
        blocks = self.alloc.allocate(n)
        assert len(blocks) == len(set(blocks)) == n
        assert not set(blocks) & held, "a block handed out twice"
        assert all(0 <= b < NUM_BLOCKS for b in blocks)
        assert self.alloc.num_free == free_before - n
        return self._new_owner(blocks, n * BLOCK_SIZE)

    @rule(owner=owners, extra=st.integers(0, 3 * BLOCK_SIZE))
    def grow(self, owner, extra):
        if id(owner) not in self.live:
            return
        held_by_others = {b for r in self.live.values() if r is not owner for b in r.block_table}
        before, free_before = list(owner.block_table), self.alloc.num_free
        want = max(self.tokens[id(owner)], len(before) * BLOCK_SIZE - BLOCK_SIZE + 1, 0) + extra
        need = max(-(-want // BLOCK_SIZE) - len(before), 0)
        ok = self.alloc.grow(owner, want)
        if need > free_before:
            assert not ok and owner.block_table == before and self.alloc.num_free == free_before
            return
        assert ok
        assert owner.block_table[:len(before)] == before     # existing blocks stay in place
        new = owner.block_table[len(before):]
        assert len(new) == need and not set(new) & held_by_others and not set(new) & set(before)
        assert len(owner.block_table) * BLOCK_SIZE >= want
        assert self.alloc.num_free == free_before - need
        self.tokens[id(owner)] = max(self.tokens[id(owner)], want)

    @rule(owner=consumes(owners))
    def free(self, owner):
        if id(owner) not in self.live:
            return
        del self.live[id(owner)]
        table = list(owner.block_table)
        self.alloc.free(table)
        owner.block_table = []
        still_held = self._held()
        # a block comes back exactly when its last owner lets go
        assert all((b in still_held) != (b in self.alloc.free_blocks) for b in table)

    @rule(owner=consumes(owners))
    def preempt_release(self, owner):
        """The scheduler's eviction path: ``release`` frees the table and empties it."""
        if id(owner) not in self.live:
            return
        del self.live[id(owner)]
        self.alloc.release(owner)
        assert owner.block_table == []

    @precondition(lambda self: any(r.block_table for r in self.live.values()))
    @rule(data=st.data())
    def double_free_is_caught(self, data):
        """Freeing a block more often than it is referenced trips the allocator's assertion."""
        held = sorted(self._held())
        block = data.draw(st.sampled_from(held))
        refs = sum(r.block_table.count(block) for r in self.live.values())
        self.alloc.free([block] * refs)
        with pytest.raises(AssertionError):
            self.alloc.free([block])
        # put the references back by hand (no public API re-references a free block) to keep going
        assert self.alloc.ref_counts[block] == 0 and block in self.alloc.free_blocks
        self.alloc.free_blocks.remove(block)
        self.alloc.ref_counts[block] = refs

    # -- invariants -------------------------------------------------------------------------------------

    @invariant()
    def accounting_is_exact(self):
        tables = [r.block_table for r in self.live.values()]
        self.alloc.check_invariants(tables)
        assert self.alloc.num_free == NUM_BLOCKS - len(self._held())
        assert len(self.alloc.free_blocks) == len(set(self.alloc.free_blocks))
        for b in range(NUM_BLOCKS):
            assert self.alloc.ref_counts[b] == sum(t.count(b) for t in tables)

    def teardown(self):
        for r in list(self.live.values()):
            self.alloc.release(r)
        self.live.clear()
        self.alloc.check_invariants([])
        assert self.alloc.num_free == NUM_BLOCKS
        assert sorted(self.alloc.free_blocks) == list(range(NUM_BLOCKS))
        assert self.alloc.ref_counts == [0] * NUM_BLOCKS


AllocatorMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestAllocator = AllocatorMachine.TestCase


# ---------------------------------------------------------------------------------------------------------
# plain unit tests


def test_blocks_for():
    a = BlockAllocator(4, 16)
    assert [a.blocks_for(n) for n in (0, 1, 16, 17, 32, 33)] == [0, 1, 1, 2, 2, 3]


def test_bad_sizes_raise():
    with pytest.raises(ValueError):
        BlockAllocator(0, 16)
    with pytest.raises(ValueError):
        BlockAllocator(4, 0)


def test_check_invariants_catches_a_leak_and_a_foreign_block():
    a = BlockAllocator(4, 2)
    table = a.allocate(2)
    a.check_invariants([table])
    with pytest.raises(AssertionError):
        a.check_invariants([])                 # blocks held by nobody the caller knows: a leak
    with pytest.raises(AssertionError):
        a.check_invariants([table, [7]])       # out of range


def test_swap_space_accounting():
    s = SwapSpace(capacity_bytes=100, bytes_per_token=10)
    assert s.fits(10) and not s.fits(11)
    s.take(6)
    assert s.used_bytes == 60 and s.fits(4) and not s.fits(5)
    s.give_back(6)
    assert s.used_bytes == 0
    with pytest.raises(AssertionError):
        s.give_back(1)
