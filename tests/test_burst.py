"""A burst (every request at once, fewer seats than requests) on the real engine with the tiny model: the case
where shortest-predicted-first must beat arrival order. Completion is counted in engine steps, so the test is
exact and does not depend on the machine's speed."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from alise import SamplingParams

from test_engine import random_prompts, tiny


def burst_completion_steps(llm, prompts, lengths, predictions=None) -> float:
    """Mean over requests of the engine step at which each finished (all arrive before step 1).

    ``predictions``: the lengths the ``alise`` policy is told at arrival (a stand-in predictor); the oracle gets
    the true lengths through ``true_output_len``."""
    engine = llm.engine
    oracle = engine.config.policy == "oracle"
    if predictions is not None:
        engine.predictor = FixedPredictions(dict(zip(map(tuple, prompts), predictions)))
    ids = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True),
                              true_output_len=n if oracle else None) for p, n in zip(prompts, lengths)]
    finished_at, step = {}, 0
    while engine.has_unfinished():
        engine.step()
        step += 1
        for i in ids:
            if i not in finished_at and engine.is_finished(i):
                finished_at[i] = step
    assert [len(engine.pop(i).token_ids) for i in ids] == list(lengths)
    return float(np.mean(list(finished_at.values())))


class FixedPredictions:
    """The predictor interface the engine calls, answering from a table (and a re-estimate when outlived)."""

    def __init__(self, table: dict):
        self.table = table

    def predict(self, prompt, max_tokens=None) -> int:
        return min(self.table[tuple(prompt)], max_tokens)

    def predict_remaining(self, prompt, generated, max_tokens=None) -> int:
        return max(1, min(generated, (max_tokens or generated) - generated))   # "as much again"

    def observe(self, prompt, output_len) -> None:
        pass


def lognormal_lengths(rng: np.random.Generator, n: int) -> list[int]:
    return np.clip(np.rint(rng.lognormal(np.log(20), 0.8, n)), 2, 100).astype(int).tolist()


@settings(max_examples=5, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), seats=st.sampled_from([2, 3, 4]))
def test_perfect_predictions_never_lose_to_fcfs_in_a_burst(tiny_model_dir, seed, seats):
    rng = np.random.default_rng(seed)
    prompts = random_prompts(12, 4, 30, seed=seed)
    lengths = lognormal_lengths(rng, len(prompts))
    kw = dict(max_num_seqs=seats, kv_cache_blocks=256)
    fcfs = burst_completion_steps(tiny(tiny_model_dir, policy="fcfs", **kw), prompts, lengths)
    oracle = burst_completion_steps(tiny(tiny_model_dir, policy="oracle", **kw), prompts, lengths)
    # shortest (true) processing time first minimizes the mean completion on identical seats (P||sum C_j)
    assert oracle <= fcfs


@pytest.mark.parametrize("noise, bound", [(0.0, 0.8), (0.3, 0.85), (1.0, 0.9)])
def test_noisy_predictions_stay_bounded_in_a_burst(tiny_model_dir, noise, bound):
    """Predictions off by a log-normal factor (noise 0.3: Kendall's tau ~0.7; 1.0: ~0.35, the real predictor's
    range on unseen prompts), re-estimated when outlived: over 6 bursts, ALISE's mean completion stays under
    ``bound`` x FCFS's, and no burst is worse than FCFS. (Measured: 0.78 / 0.79 / 0.82 on average, at most
    0.89 / 0.91 / 0.95. Before per-step overhead entered the ranking, the oracle itself lost to FCFS on some
    of these bursts: the cost model fitted to a full batch's steps put the time in ``overhead`` and ranked by
    prompt length.)"""
    ratios, taus = [], []
    for seed in range(6):
        rng = np.random.default_rng(100 + seed)
        prompts = random_prompts(12, 4, 30, seed=100 + seed)
        lengths = lognormal_lengths(rng, len(prompts))
        predictions = np.maximum(1, np.rint(np.array(lengths) * np.exp(noise * rng.standard_normal(12)))).astype(int)
        kw = dict(max_num_seqs=3, kv_cache_blocks=256)
        fcfs = burst_completion_steps(tiny(tiny_model_dir, policy="fcfs", **kw), prompts, lengths)
        alise = burst_completion_steps(tiny(tiny_model_dir, policy="alise", **kw), prompts, lengths,
                                       predictions.tolist())
        ratios.append(alise / fcfs)
        from alise.bench.predictor import kendall_tau
        taus.append(kendall_tau(predictions, lengths))
    assert np.mean(ratios) <= bound, (ratios, taus)
    assert max(ratios) <= 1.0, (ratios, taus)
