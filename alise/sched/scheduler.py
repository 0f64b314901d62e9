"""Iteration-level scheduler: who runs this step, how many tokens each, and whose KV makes room.

Each step (``schedule``):

1. **Rank.** Every unfinished request is ranked by the policy's key (``policy.py``). The best
   ``max_num_seqs`` hold seats; a running request that falls out of them is preempted but keeps its KV
   where it is, since it may soon be back (ALISE: short waits keep the KV in place).
2. **Budget.** Seated requests get tokens within ``max_num_batched_tokens`` in rank order: one for a
   decode, a chunk for a prefill (chunked prefill: a long prompt takes several steps), with one token kept
   back for every seated decode not yet reached, so prefills never starve decodes.
3. **Memory.** A request whose new tokens need blocks the pool lacks takes them from the worst-ranked
   requests below it that are not in this step: their KV is swapped to host memory (compressed) when the
   policy allows it and the swap space has room, else dropped, to be recomputed later. A running request
   that still cannot grow gives up its own KV the same way, so higher-ranked work always progresses.

4. **Postprocess** (``postprocess``, after the executor ran the step): tokens appended, requests stopped and
   finished, the length speculation told (``speculation.py``); the engine and the simulator share it.

The scheduler never touches tensors. Swaps are listed in the step's ``ScheduledBatch`` and carried out by
the executor (the model runner, or the simulator's clock) before the forward pass: swap-outs read blocks
freed in this step before anything writes into them.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from alise.sched.blocks import BlockAllocator, SwapSpace
from alise.sched.request import Request, Status


@dataclass
class ScheduledBatch:
    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)     # tokens each request processes this step
    swap_out: list[tuple[Request, list[int]]] = field(default_factory=list)  # (request, blocks to copy out)
    swap_in: list[tuple[Request, list[int]]] = field(default_factory=list)   # (request, blocks to fill)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_prefill_tokens(self) -> int:
        return sum(n for n in self.num_new_tokens if n > 1)

    @property
    def num_decode_seqs(self) -> int:
        return sum(1 for n in self.num_new_tokens if n == 1)


class Scheduler:
    """``add`` requests, ``schedule`` a step, let the executor run it, ``postprocess`` its tokens; the engine and
    the simulator drive it the same way (the simulator's executor is a clock and its tokens are placeholders).

    ``speculation``: ALISE's length speculation (``speculation.py``), or None. ``eos_token_ids`` and
    ``max_model_len``: the model's stop tokens and context limit, for ``stop_reason``.
    """

    def __init__(self, *, policy, allocator: BlockAllocator, max_num_seqs: int, max_num_batched_tokens: int,
                 swap_space: SwapSpace | None = None, speculation=None, eos_token_ids: tuple = (),
                 max_model_len: int | None = None):
        self.policy, self.allocator, self.swap_space = policy, allocator, swap_space
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.speculation, self.eos_token_ids, self.max_model_len = speculation, tuple(eos_token_ids), max_model_len
        self.running: list[Request] = []
        self.waiting: list[Request] = []   # WAITING (no KV) and PREEMPTED (KV in the pool or swapped out)
        self._evicted: set[int] = set()
        self.num_steps = 0                 # steps scheduled so far: the clock the policy ages requests on

    def add(self, request: Request) -> None:
        request.arrival_step = self.num_steps
        if self.speculation is not None:
            self.speculation.at_arrival(request)
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.running or self.waiting)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        candidates = self.running + self.waiting
        rank_key = self.policy.rank_key
        key_list = [rank_key(r, self.num_steps) for r in candidates]
        keys = dict(zip(map(id, candidates), key_list))
        seated = [candidates[i] for _, i in heapq.nsmallest(self.max_num_seqs, zip(key_list, range(len(candidates))))]
        seated_ids = {id(r) for r in seated}
        for r in self.running:
            if id(r) not in seated_ids:           # outranked: lose the seat, keep the KV for now
                self._unseat(r, batch)
        budget = self.max_num_batched_tokens
        in_step: set[int] = set()      # ids of requests with tokens in this step (never evicted from it)
        self._evicted: set[int] = set()  # ids of requests that lost their KV in this step (they sit it out)
        # rank order decides who may take memory from whom; one token of budget stays reserved for each
        # seated decode not yet reached, so a long prefill never starves the decodes
        decode_ids = {id(r) for r in seated if r.num_pending_tokens == 1}
        unreached_decodes = len(decode_ids)
        admit_waiting = True
        for r in seated:
            is_decode = id(r) in decode_ids
            unreached_decodes -= is_decode
            if id(r) in self._evicted or (r.status is not Status.RUNNING and not admit_waiting):
                continue                         # lost its KV in this step, or queued behind a blocked one
            num_new = 1 if is_decode else min(r.num_pending_tokens, budget - unreached_decodes)
            if num_new <= 0 or budget < num_new:
                continue
            if not self._make_room(r, num_new, keys, in_step, batch):
                if r.status is Status.RUNNING:    # cannot grow even at the others' expense: step aside
                    self._unseat(r, batch)
                    self._evict(r, batch)
                    continue
                # a waiting request that does not fit blocks the lower-ranked waiting ones (vLLM's FCFS does
                # the same): admitting them past it only hands them KV it would take back next step
                admit_waiting = False
                continue
            r.status = Status.RUNNING
            batch.requests.append(r)
            batch.num_new_tokens.append(num_new)
            in_step.add(id(r))
            budget -= num_new
        if batch.requests:
            self.num_steps += 1
        running = Status.RUNNING               # (a local: enum attribute lookups are slow in a 4096-long loop)
        self.running, self.waiting = [], []
        for r in candidates:
            (self.running if r.status is running else self.waiting).append(r)
        return batch

    def _make_room(self, request: Request, num_new: int, keys: dict, in_step: set, batch: ScheduledBatch) -> bool:
        """Give ``request`` blocks for ``num_new`` more tokens (bringing its KV back from swap first)."""
        swapped_tokens = request.num_computed_tokens if request.swapped else 0
        need = self.allocator.blocks_for(request.num_computed_tokens + num_new) - len(request.block_table)
        if need > self.allocator.num_free:
            my_key = keys[id(request)]
            victims = sorted((r for r in self.running + self.waiting
                              if id(r) not in in_step and r is not request and keys[id(r)] > my_key
                              and r.block_table), key=lambda r: keys[id(r)], reverse=True)
            if self.allocator.num_free + sum(len(v.block_table) for v in victims) < need:
                return False                      # evicting everyone below would still not make room
            for victim in victims:
                if need <= self.allocator.num_free:
                    break
                if victim.status is Status.RUNNING:
                    self._unseat(victim, batch)
                self._evict(victim, batch)
            if need > self.allocator.num_free:
                return False
        if swapped_tokens:
            blocks = self.allocator.allocate(self.allocator.blocks_for(swapped_tokens))
            request.block_table = list(blocks)   # grow() below extends the table, not this list
            batch.swap_in.append((request, blocks))
            self.swap_space.give_back(self._swap_tokens(request))
            request.swapped = False
        return self.allocator.grow(request, request.num_computed_tokens + num_new)

    def _unseat(self, request: Request, batch: ScheduledBatch) -> None:
        request.status = Status.PREEMPTED
        request.num_preemptions += 1
        batch.preempted.append(request)

    def _evict(self, request: Request, batch: ScheduledBatch) -> None:
        """Free ``request``'s blocks: to host swap space if allowed and room, else drop them (recompute)."""
        num_tokens = self._swap_tokens(request)
        if (getattr(self.policy, "swap_preempted", False) and self.swap_space is not None
                and num_tokens > 0 and self.swap_space.fits(num_tokens)):
            self.swap_space.take(num_tokens)
            request.num_swapped_tokens += request.num_computed_tokens
            batch.swap_out.append((request, list(request.block_table)))
            request.swapped = True               # the executor puts the host copy in request.swapped_kv
            request.status = Status.PREEMPTED
        else:
            request.num_recomputed_tokens += request.num_computed_tokens
            request.num_computed_tokens = 0
            request.status = Status.WAITING
        self.allocator.release(request)
        self._evicted.add(id(request))

    def _swap_tokens(self, request: Request) -> int:
        """Swap space a request's KV takes: whole blocks are copied out."""
        return self.allocator.blocks_for(request.num_computed_tokens) * self.allocator.block_size

    def postprocess(self, batch: ScheduledBatch, sampled: dict[int, int], now: float) -> list[Request]:
        """The bookkeeping after a step: advance each request's computed tokens, append the tokens sampled for
        it (``sampled``: id(request) -> token, for requests whose step covered their last pending token), stop
        and finish requests, and let the speculation re-estimate or learn. Returns the finished requests."""
        finished = []
        for r, n in zip(batch.requests, batch.num_new_tokens):
            r.num_computed_tokens += n
            token = sampled.get(id(r))
            if token is None:                     # a prefill chunk that did not reach the prompt's end
                continue
            r.output_token_ids.append(token)
            if r.first_token_time is None:
                r.first_token_time = now
            reason = self.stop_reason(r, token)
            if reason:
                self.finish(r)
                r.finish_reason, r.finish_time = reason, now
                finished.append(r)
                if self.speculation is not None:
                    self.speculation.finished(r)
            elif self.speculation is not None and r.num_output_tokens >= (r.predicted_output_len or 0):
                self.speculation.when_outlived(r)
        return finished

    def stop_reason(self, r: Request, token: int) -> str | None:
        """"stop" (a stop or end-of-sequence token), "length" (``max_tokens``, or no room left to grow), or None."""
        if token in r.params.stop_token_ids or (not r.params.ignore_eos and token in self.eos_token_ids):
            return "stop"
        # a sequence may not outgrow the model's context nor the whole KV pool (it could never run again)
        if (r.num_output_tokens >= r.params.max_tokens
                or (self.max_model_len is not None and r.num_tokens >= self.max_model_len)
                or self.allocator.blocks_for(r.num_tokens + 1) > self.allocator.num_blocks):
            return "length"
        return None

    def finish(self, request: Request) -> None:
        """Drop a finished or aborted request and free everything it holds."""
        if request.swapped:
            self.swap_space.give_back(self._swap_tokens(request))
            request.swapped, request.swapped_kv = False, None
        self.allocator.release(request)
        request.status = Status.FINISHED
        self.running = [r for r in self.running if r is not request]
        self.waiting = [r for r in self.waiting if r is not request]
