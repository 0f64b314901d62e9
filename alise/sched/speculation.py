"""ALISE's speculation in one place: predict each request's output length at arrival, re-estimate it when the
request outlives the prediction, and learn from every finished request.

The scheduler calls these three hooks (``Scheduler.add`` and ``Scheduler.postprocess``), so the engine and the
simulator speculate identically; the speculative policy (``policy.py``) only reads ``predicted_output_len``.
Predictions are clamped at ``cap`` when set, else at each request's ``max_tokens``: benchmarks that fix a
request's work through ``max_tokens`` (its true length) set ``cap`` to the workload's output cap, so the
predictor never learns the answer from the clamp.
"""
from __future__ import annotations

import math

import numpy as np

from alise.sched.predictor import clamp_length
from alise.sched.request import Request


class Speculation:
    """A ``LengthPredictor`` (or anything with ``predict`` / ``predict_remaining`` / ``observe``) behind the hooks."""

    def __init__(self, predictor, cap: int | None = None):
        self.predictor, self.cap = predictor, cap

    def _prompt(self, r: Request):
        return r.prompt if r.prompt is not None else r.prompt_token_ids

    def _max_tokens(self, r: Request) -> int:
        return self.cap or r.params.max_tokens

    def at_arrival(self, r: Request) -> None:
        r.predicted_output_len = self.predictor.predict(self._prompt(r), max_tokens=self._max_tokens(r))
        r.arrival_predicted_output_len = r.predicted_output_len

    def when_outlived(self, r: Request) -> None:
        """Re-estimate from what the request has produced so far (called once it reaches its prediction)."""
        r.predicted_output_len = r.num_output_tokens + self.predictor.predict_remaining(
            self._prompt(r), r.num_output_tokens, max_tokens=self._max_tokens(r))

    def finished(self, r: Request) -> None:
        """Online learning from every request that ran to its end (not from aborted ones)."""
        self.predictor.observe(self._prompt(r), r.num_output_tokens)


class SampledSpeculation:
    """Predictions drawn around the true lengths (``Request.true_output_len``) from a measured error model: for
    length-only workloads, whose requests have no text for a real predictor. ``errors.sample(kind, rng)``
    returns log(predicted / true) for kind "arrival" and log(re-estimate / true remaining) for "remaining"."""

    def __init__(self, errors, seed: int = 0):
        self.errors, self.rng = errors, np.random.default_rng(seed)

    def at_arrival(self, r: Request) -> None:
        est = r.true_output_len * math.exp(self.errors.sample("arrival", self.rng))
        r.predicted_output_len = r.arrival_predicted_output_len = clamp_length(est, 1, r.params.max_tokens)

    def when_outlived(self, r: Request) -> None:
        g = r.num_output_tokens
        est = max(r.true_output_len - g, 1) * math.exp(self.errors.sample("remaining", self.rng))
        r.predicted_output_len = g + clamp_length(est, 1, max(1, r.params.max_tokens - g))

    def finished(self, r: Request) -> None:
        pass
