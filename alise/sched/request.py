"""The state of one request as it moves through the engine."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from alise.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"        # never run, or preempted with its KV dropped (will re-prefill)
    RUNNING = "running"        # holds a seat in the batch
    PREEMPTED = "preempted"    # lost its seat but keeps its KV (in the pool, or swapped to host memory)
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    prompt: str | None = None                      # the text, when the user gave text (for the predictor)
    output_token_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0                   # tokens whose K/V are in the cache
    swapped: bool = False                          # KV lives in host swap space, not the pool
    swapped_kv: object | None = None               # the executor's host copy of that KV
    first_token_time: float | None = None
    finish_time: float | None = None
    num_preemptions: int = 0
    num_recomputed_tokens: int = 0                 # KV dropped at preemption, to be computed again
    num_swapped_tokens: int = 0                    # KV copied out to host swap space at preemption
    finish_reason: str | None = None               # "stop" | "length" | "abort"
    error: str | None = None                       # why the engine refused the request, if it did
    predicted_output_len: int | None = None        # the scheduler's current estimate of the total output length
    arrival_predicted_output_len: int | None = None  # the estimate made at arrival
    true_output_len: int | None = None             # known only to the oracle policy (and the simulator)
    arrival_step: int = 0                          # the scheduler's step count when the request was added
    deadline_step: float | None = None             # the speculative policy's aging deadline (policy.py)
    prompt_logprobs: list[float | None] | None = None
    generator: torch.Generator | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def num_pending_tokens(self) -> int:
        """Tokens not yet in the KV cache: the prompt before prefill, 1 in decode, all after a recompute."""
        return self.num_tokens - self.num_computed_tokens
