"""Scheduling policies: a priority key per request, nothing else.

The scheduler ranks every unfinished request by ``policy.rank_key(request, step)`` (smaller runs first), gives
the ``max_num_seqs`` best ranked a seat in the batch, and, when the KV pool runs short, takes memory from the
worst ranked. A policy is therefore just the key (``rank_key``), plus whether preempted KV may go to host swap
space (``swap_preempted``) and the cost model it ranks with (``set_cost``: the engine hands it each refit to
this machine's step times; nothing else changes a policy's costs):

* ``fcfs``: arrival order, vLLM's behaviour. A running request is never displaced by a newcomer (it arrived
  earlier), and under memory pressure the most recently arrived request is preempted.
* ``alise``: speculative shortest-remaining-time-first (ALISE, Zhao & Wang 2024). The key is the request's
  estimated remaining execution time: the cost model (``cost.py``) applied to its pending prefill and its
  *predicted* remaining output (``predictor.py``), each output token costing one whole step.
* ``oracle``: the same with the true output lengths (``Request.true_output_len``): the bound a perfect
  predictor would reach.

Two rules of our own, where the paper is silent:

* **No thrashing.** A running request's key is divided by ``preempt_margin`` (2): a newcomer takes its seat
  only when its estimated work is less than half of the running request's remaining work.
* **No starvation (relative aging, counted in steps).** A request is *overdue* once it has been in the system
  for more than ``max_slowdown`` (10) times its own service in engine steps, ``1 + L`` for a prediction of
  ``L`` output tokens made at arrival (a prefill step, then one decode step a token). Overdue requests rank
  before all others, earliest deadline (``arrival_step + max_slowdown * (1 + L)``) first. Aging is thus
  relative to each request's own length (a short request is promoted after a short wait, a long one after a
  long one), and the deadline is fixed at arrival, so the order among overdue requests never changes and they
  never preempt each other back and forth. Counting steps rather than seconds makes the rule independent of
  the machine's speed and of the cost model: with wall-clock deadlines, the defaults before the first fit (a
  CPU step takes ~10x the default cost) made every request overdue at once, and each refit then moved
  deadlines and reshuffled the queue (``bench burst`` on an AVX2 CPU). The bound: a request finishes by its
  deadline plus the remaining steps of requests with earlier deadlines plus its own service (tested in
  ``tests/test_scheduler.py`` under a stream of short requests). Without it, shortest-first starves a long
  request whenever shorter work keeps arriving (also tested). Aging by waiting time divided by service time
  inside the key (``T / (1 + t_wait / T)``, HRRN-like) does not bound it under overload: the queued short
  requests age faster than the long one.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from alise.sched.cost import CostModel
from alise.sched.request import Request, Status


RUNNING = Status.RUNNING


class FCFSPolicy:
    name = "fcfs"
    swap_preempted = False  # vLLM's default: preemption drops the KV and recomputes it later

    def rank_key(self, request: Request, step: int) -> tuple:
        return (request.arrival_time, request.request_id)

    def set_cost(self, cost: CostModel) -> None:
        """Arrival order needs no cost model (the engine refits one for every policy alike)."""


@dataclass
class SpeculativePolicy:
    """Shortest estimated remaining execution time first, preemptive at iteration level."""

    cost: CostModel = field(default_factory=CostModel)
    use_true_lengths: bool = False  # True: the oracle
    preempt_margin: float = 2.0
    max_slowdown: float = 10.0
    swap_preempted: bool = True      # ALISE's adaptive memory: preempted KV may go to host swap space

    @property
    def name(self) -> str:
        return "oracle" if self.use_true_lengths else "alise"

    def set_cost(self, cost: CostModel) -> None:
        """Rank with ``cost`` from now on: the engine's refit to this machine's measured step times."""
        self.cost = cost

    def rank_key(self, request: Request, step: int) -> tuple:
        """``step``: the scheduler's step counter (``Request.arrival_step`` is on the same count)."""
        # called for every queued request at every step: plain arithmetic, no helper calls
        done = len(request.output_token_ids)
        if self.use_true_lengths and request.true_output_len is not None:
            total = request.true_output_len
        else:
            total = request.predicted_output_len or request.params.max_tokens
        if request.deadline_step is None:        # fixed at arrival, from the prediction made then
            request.deadline_step = request.arrival_step + self.max_slowdown * (1 + total)
        if step >= request.deadline_step:        # overdue: ahead of everyone, earliest deadline first
            return (0, request.deadline_step, request.arrival_time, request.request_id)
        c = self.cost
        left = max(total - done, 1)
        pending = len(request.prompt_token_ids) + done - request.num_computed_tokens
        # each remaining token costs the request a whole step, overhead included: a fit cannot tell overhead
        # from decode_seq when every step decodes the same number of sequences (a full batch), and ranking by
        # decode_seq alone then collapsed to ranking by prompt length (measured: bench burst, tests/test_burst.py)
        remaining = (c.prefill_token * pending if pending > 1 else 0.0) + left * (
            c.overhead + c.decode_seq + c.context_token * (request.num_computed_tokens + pending + left / 2))
        if request.status is RUNNING:
            remaining /= self.preempt_margin
        return (1, remaining, request.arrival_time, request.request_id)


def make_policy(name: str, cost: CostModel | None = None) -> FCFSPolicy | SpeculativePolicy:
    """The policy called ``name``; the speculative ones rank with ``cost`` (until ``set_cost`` replaces it)."""
    if name == "fcfs":
        return FCFSPolicy()
    if name in ("alise", "oracle"):
        return SpeculativePolicy(cost=cost or CostModel(), use_true_lengths=name == "oracle")
    raise ValueError(f"policy must be one of ('fcfs', 'alise', 'oracle'), got {name!r}")
