"""Scheduling policies: a priority key per request, nothing else.

The scheduler ranks every unfinished request by ``policy.rank_key(request, now)`` (smaller runs first), gives
the ``max_num_seqs`` best ranked a seat in the batch, and, when the KV pool runs short, takes memory from the
worst ranked. A policy is therefore just the key:

* ``fcfs``: arrival order, vLLM's behaviour. A running request is never displaced by a newcomer (it arrived
  earlier), and under memory pressure the most recently arrived request is preempted.
* ``alise``: speculative shortest-remaining-time-first (ALISE, Zhao & Wang 2024). The key is the request's
  estimated remaining execution time: the cost model (``cost.py``) applied to its pending prefill and its
  *predicted* remaining output (``predictor.py``).
* ``oracle``: the same with the true output lengths (``Request.true_output_len``): the bound a perfect
  predictor would reach.

Two rules of our own, where the paper is silent:

* **No thrashing.** A running request's key is divided by ``preempt_margin`` (2): a newcomer takes its seat
  only when its estimated work is less than half of the running request's remaining work.
* **No starvation (relative aging).** A request is *overdue* once its time in the system exceeds
  ``max_slowdown`` (10) times its own estimated service time ``T`` (the cost model's time for its whole
  prompt and predicted output, alone). Overdue requests rank before all others, earliest deadline
  (``arrival + max_slowdown * T``) first. Aging is thus relative to each request's own length: a short request
  is promoted after a short wait, a long one after a long one, and the order among overdue requests is
  static, so they never preempt each other back and forth. The bound: a request finishes by its deadline plus
  the remaining work of requests with earlier deadlines plus its own service time (tested in
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

    def rank_key(self, request: Request, now: float) -> tuple:
        return (request.arrival_time, request.request_id)


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

    def rank_key(self, request: Request, now: float) -> tuple:
        # called for every queued request at every step: plain arithmetic, no helper calls (cost.request_time
        # written out twice: for the whole request, and for what remains of it)
        c = self.cost
        prompt_len, done = len(request.prompt_token_ids), len(request.output_token_ids)
        if self.use_true_lengths and request.true_output_len is not None:
            left = max(request.true_output_len - done, 1)
        else:
            left = max((request.predicted_output_len or request.params.max_tokens) - done, 1)
        total = done + left
        # its latency alone, per-step overhead included (on a GPU the overhead is most of a decode step)
        service = c.prefill_token * prompt_len + total * (
            c.overhead + c.decode_seq + c.context_token * (prompt_len + total / 2))
        deadline = request.arrival_time + self.max_slowdown * service
        if now >= deadline:                      # overdue: ahead of everyone, earliest deadline first
            return (0, deadline, request.request_id)
        pending = prompt_len + done - request.num_computed_tokens
        remaining = (c.prefill_token * pending if pending > 1 else 0.0) + left * (
            c.decode_seq + c.context_token * (request.num_computed_tokens + pending + left / 2))
        if request.status is RUNNING:
            remaining /= self.preempt_margin
        return (1, remaining, request.arrival_time, request.request_id)


def make_policy(name: str, cost: CostModel | None = None):
    if name == "fcfs":
        return FCFSPolicy()
    if name in ("alise", "oracle"):
        return SpeculativePolicy(cost=cost or CostModel(), use_true_lengths=name == "oracle")
    raise ValueError(f"scheduler must be one of ('fcfs', 'alise', 'oracle'), got {name!r}")
