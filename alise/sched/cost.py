"""Execution-time model: how long a step, and a request's remaining work, take.

A step's time is modelled as linear in what it does (the shape that roofline reasoning and measured step
times both give for small batches):

    step_time = overhead + prefill_token * num_prefill_tokens + decode_seq * num_decode_seqs
                + context_token * total_context_tokens

The four coefficients are fitted by least squares to step times the engine measured (``fit``), or set from
a roofline profile in the simulator. The speculative policy (``policy.py``) turns them into a request's
estimated remaining execution time: its pending prefill tokens, then one whole step per predicted remaining
output token over a growing context.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIN_FIT_SAMPLES = 4             # one per coefficient


@dataclass
class CostModel:
    overhead: float = 5e-3        # seconds per step, whatever it holds
    prefill_token: float = 2e-4   # seconds per prompt token processed
    decode_seq: float = 2e-3      # seconds per sequence decoding one token
    context_token: float = 1e-7   # seconds per cached token attended over, per sequence

    def step_time(self, num_prefill_tokens: int, num_decode_seqs: int, total_context_tokens: int) -> float:
        return (self.overhead + self.prefill_token * num_prefill_tokens + self.decode_seq * num_decode_seqs
                + self.context_token * total_context_tokens)

    @classmethod
    def fit(cls, samples: list[tuple[int, int, int, float]]) -> "CostModel":
        """Least-squares fit to ``(num_prefill_tokens, num_decode_seqs, total_context_tokens, seconds)`` rows.

        Coefficients are kept non-negative (a negative cost would invert the scheduler's ranking).
        """
        if len(samples) < MIN_FIT_SAMPLES:
            raise ValueError(f"fit needs at least {MIN_FIT_SAMPLES} step samples, got {len(samples)}")
        data = np.asarray(samples, dtype=np.float64)
        features = np.column_stack([np.ones(len(data)), data[:, :3]])
        coef = nonnegative_lstsq(features, data[:, 3])
        return cls(*map(float, coef))


def nonnegative_lstsq(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Least squares with x >= 0 (active set: drop the most negative coefficient and refit; tiny problems only)."""
    active = list(range(a.shape[1]))
    while True:
        x = np.zeros(a.shape[1])
        if active:
            x[active] = np.linalg.lstsq(a[:, active], b, rcond=None)[0]
        if (x >= 0).all() or not active:
            return np.maximum(x, 0)
        active.remove(min((i for i in active if x[i] < 0), key=lambda i: x[i]))
