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
* **No starvation (relative aging).** A request's key is divided by ``1 + aging * t_sys / T``, where
  ``t_sys`` is its time in the system and ``T`` its own estimated total service time, so a request ages in
  units of its own length (absolute aging lets long jobs starve or short ones lose their edge). A request
  with estimated work ``E`` facing a stream of newcomers of estimated work ``e`` overtakes them once
  ``t_sys > (E / e - 1) * T / aging``; from then on its key only falls, so it keeps its seat. That is the
  documented starvation bound (tested in ``tests/test_scheduler.py``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from alise.sched.cost import CostModel
from alise.sched.request import Request, Status


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
    aging: float = 1.0
    swap_preempted: bool = True      # ALISE's adaptive memory: preempted KV may go to host swap space

    @property
    def name(self) -> str:
        return "oracle" if self.use_true_lengths else "alise"

    def remaining_output(self, request: Request) -> int:
        if self.use_true_lengths and request.true_output_len is not None:
            return max(request.true_output_len - request.num_output_tokens, 1)
        return request.remaining_output_estimate()

    def estimated_remaining_time(self, request: Request) -> float:
        return self.cost.request_time(request.num_pending_tokens, request.num_computed_tokens,
                                      self.remaining_output(request))

    def rank_key(self, request: Request, now: float) -> tuple:
        remaining = self.estimated_remaining_time(request)
        total = self.cost.request_time(len(request.prompt_token_ids), 0,
                                       request.num_output_tokens + self.remaining_output(request))
        aged = remaining / (1.0 + self.aging * max(now - request.arrival_time, 0.0) / total)
        if request.status is Status.RUNNING:
            aged /= self.preempt_margin
        return (aged, request.arrival_time, request.request_id)


def make_policy(name: str, cost: CostModel | None = None):
    if name == "fcfs":
        return FCFSPolicy()
    if name in ("alise", "oracle"):
        return SpeculativePolicy(cost=cost or CostModel(), use_true_lengths=name == "oracle")
    raise ValueError(f"scheduler must be one of ('fcfs', 'alise', 'oracle'), got {name!r}")
