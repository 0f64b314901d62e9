"""Sampling parameters and the sampler: greedy, temperature, top-k, top-p, per-request seeds."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

SEED_MAX = 2**63 - 1   # torch.Generator.manual_seed takes a 64-bit seed; the engine draws its own below 2**62


def is_int(value) -> bool:
    """An int that is not a bool (``True`` is an int to Python, not a count or a seed)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_real(value) -> bool:
    """A finite int or float, not a bool (an int too large for a float is not finite either)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


@dataclass
class SamplingParams:
    """How to pick each next token of one request.

    ``temperature=0`` means greedy (argmax). ``top_k=0`` and ``top_p=1`` switch those filters off. A ``seed``
    makes the request's samples reproducible whatever else is in the batch.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_tokens: int = 64
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    prompt_logprobs: bool = False

    def __post_init__(self):
        if not is_finite_real(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not is_finite_real(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if not is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if not isinstance(self.stop_token_ids, (list, tuple)) or \
                not all(is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be a list of non-negative ints, got {self.stop_token_ids!r}")
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed <= SEED_MAX):
            raise ValueError(f"seed must be None or an int in [0, 2**63 - 1], got {self.seed!r}")
        for name in ("ignore_eos", "prompt_logprobs"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        self.stop_token_ids = list(self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator],
           greedy_tokens: torch.Tensor | None = None) -> list[int]:
    """One token per row of ``logits`` ``(B, V)`` float32; ``greedy_tokens`` ``(B,)``: their argmax, if the
    caller has it already.

    Sampling uses the exponential race (gpt-fast): ``argmax(p / E)`` with ``E ~ Exp(1)`` is a draw from ``p``,
    and drawing ``E`` from each request's own generator keeps a seeded request reproducible in any batch.
    """
    tokens = logits.argmax(dim=-1) if greedy_tokens is None else greedy_tokens.clone()   # greedy rows: done
    for row, (p, gen) in enumerate(zip(params, generators)):
        if p.greedy:
            continue
        scaled = logits[row] / p.temperature                      # (V,)
        if p.top_k and p.top_k < scaled.numel():
            kth = torch.topk(scaled, p.top_k).values[-1]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        probs = torch.softmax(scaled, dim=-1)
        if p.top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            # drop a token when the tokens before it already cover top_p (the first token always stays)
            drop = sorted_probs.cumsum(0) - sorted_probs >= p.top_p
            probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
        noise = torch.empty_like(probs).exponential_(generator=gen)
        tokens[row] = (probs / noise).argmax()
    return tokens.tolist()
