"""The discrete-event simulator: hand-computed schedules, the engine's lifecycle, metrics and the CLI's JSON."""
from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest

from alise.bench import simulator as S
from alise.bench.workloads import TraceRequest, synthetic, with_arrivals
from alise.sched.cost import CostModel

# round coefficients: 10 ms per step, 1 ms per prompt token, 2 ms per decoding sequence, 0.1 ms per cached token
COST = CostModel(overhead=0.01, prefill_token=0.001, decode_seq=0.002, context_token=1e-4)


def profile(**kw) -> S.Profile:
    base = dict(name="test", cost=COST, num_blocks=1000, block_size=4, max_num_seqs=1, max_num_batched_tokens=100,
                max_model_len=4096, swap_capacity_bytes=0, swap_bytes_per_token=1, swap_bandwidth=1e9)
    return S.Profile(**(base | kw))


def step(prefill=0, decodes=0, context=0) -> float:
    return COST.overhead + COST.prefill_token * prefill + COST.decode_seq * decodes + COST.context_token * context


def decodes(prompt_len: int, first: int, last: int) -> float:
    """Time of the decode steps that produce output tokens first..last (1-based) of a request running alone;
    the step producing token j attends over prompt_len + j - 2 cached tokens."""
    return sum(step(decodes=1, context=prompt_len + j - 2) for j in range(first, last + 1))


# A long request first; then B (prompt 5, 1 token) and C (prompt 2, 1 token) arrive while A prefills.
TRACE = [TraceRequest(10, 10, arrival=0.0), TraceRequest(5, 1, arrival=0.001), TraceRequest(2, 1, arrival=0.002)]


def test_fcfs_schedule_by_hand():
    res = S.simulate(TRACE, "fcfs", profile())
    a_first = step(prefill=10)                         # A's prefill step samples its first token
    a_done = a_first + decodes(10, 2, 10)              # then 9 decode steps, alone (one seat)
    b_done = a_done + step(prefill=5)                  # B arrived before C
    c_done = b_done + step(prefill=2)
    assert res.first_token[0] == pytest.approx(a_first)
    assert res.finish.tolist() == pytest.approx([a_done, b_done, c_done])
    assert res.num_preemptions == 0


def test_oracle_schedule_by_hand():
    """The oracle preempts A (9 tokens left) for C (shortest), then B, then resumes A with its KV kept."""
    res = S.simulate(TRACE, "oracle", profile())
    a_first = step(prefill=10)
    c_done = a_first + step(prefill=2)
    b_done = c_done + step(prefill=5)
    a_done = b_done + decodes(10, 2, 10)
    assert res.finish.tolist() == pytest.approx([a_done, b_done, c_done])
    assert res.first_token[0] == pytest.approx(a_first)
    assert res.num_preemptions == 1
    assert res.recomputed_tokens == 0                 # A kept its KV in the pool while it waited


def test_two_seats_share_steps_by_hand():
    """Two seats: decodes batch together, and the step cost sees both sequences and both contexts."""
    trace = [TraceRequest(4, 3, arrival=0.0), TraceRequest(6, 2, arrival=0.0)]
    res = S.simulate(trace, "fcfs", profile(max_num_seqs=2))
    t1 = step(prefill=10)                               # both prompts in one step: 10 prefill tokens
    t2 = t1 + step(decodes=2, context=4 + 6)            # token 2 of both; the second request is done
    t3 = t2 + step(decodes=1, context=5)                # token 3 of the first
    assert res.first_token.tolist() == pytest.approx([t1, t1])
    assert res.finish.tolist() == pytest.approx([t3, t2])


def test_chunked_prefill_and_isolated_latency():
    """A prompt longer than the token budget is prefilled in chunks; far-apart arrivals = requests alone."""
    p = profile(max_num_seqs=4, max_num_batched_tokens=64)
    trace = [TraceRequest(150, 7, arrival=0.0), TraceRequest(3, 20, arrival=100.0), TraceRequest(64, 1, arrival=200.0)]
    res = S.simulate(trace, "fcfs", p)
    first = step(prefill=64) + step(prefill=64, context=64) + step(prefill=22, context=128)
    assert res.first_token[0] == pytest.approx(first)
    for i, t in enumerate(trace):
        lat, ttft = S.isolated_latency(t, p)
        assert res.finish[i] - t.arrival == pytest.approx(lat)
        assert res.first_token[i] - t.arrival == pytest.approx(ttft)


def test_alise_with_perfect_predictions_matches_oracle():
    """With a zero-error model the ALISE ranking equals the oracle's, so the whole schedule must match."""
    trace = with_arrivals(synthetic("sharegpt", 150, seed=3), rate=40.0, seed=1)
    p = profile(num_blocks=400, block_size=16, max_num_seqs=32, max_num_batched_tokens=512,
                swap_capacity_bytes=10**9)
    perfect = S.ErrorModel(np.zeros(101), np.zeros(101))
    alise = S.simulate(trace, "alise", p, predictions=S.SampledSpeculation(perfect))
    oracle = S.simulate(trace, "oracle", p)
    assert alise.num_preemptions > 0                   # the memory is tight enough for the policy to matter
    assert alise.finish.tolist() == pytest.approx(oracle.finish.tolist())


@pytest.mark.parametrize("policy", ["fcfs", "alise", "oracle"])
def test_memory_pressure_every_request_finishes(policy):
    """A small KV pool forces preemption (recompute for FCFS, swap for ALISE); all requests still finish
    with their exact output lengths, and the clock only moves forward."""
    trace = with_arrivals(synthetic("sharegpt", 120, seed=5), rate=30.0, seed=2)
    p = profile(num_blocks=200, block_size=16, max_num_seqs=16, max_num_batched_tokens=512,
                swap_capacity_bytes=20_000, swap_bytes_per_token=1, swap_bandwidth=1e5)
    preds = S.SampledSpeculation(S.ErrorModel.default(), seed=0)
    res = S.simulate(trace, policy, p, predictions=preds)
    assert not np.isnan(res.finish).any() and not res.saturated
    assert res.output_len.tolist() == [t.output_len for t in trace]
    assert (res.finish >= res.first_token).all() and (res.first_token > res.arrival).all()
    assert res.num_preemptions > 0
    if policy == "fcfs":
        assert res.recomputed_tokens > 0 and res.swapped_tokens == 0
    else:
        assert res.swapped_tokens > 0


def test_swap_traffic_costs_time():
    """Swapped tokens x bytes per token / bandwidth is added to the clock: a slower link makes the run longer."""
    trace = with_arrivals(synthetic("sharegpt", 80, seed=5), rate=30.0, seed=2)
    kw = dict(num_blocks=150, block_size=16, max_num_seqs=16, max_num_batched_tokens=512,
              swap_capacity_bytes=10**9, swap_bytes_per_token=1000)
    perfect = S.ErrorModel(np.zeros(101), np.zeros(101))
    fast = S.simulate(trace, "oracle", profile(swap_bandwidth=1e15, **kw), predictions=S.SampledSpeculation(perfect))
    slow = S.simulate(trace, "oracle", profile(swap_bandwidth=1e6, **kw), predictions=S.SampledSpeculation(perfect))
    assert fast.swapped_tokens > 0
    assert slow.busy_time > fast.busy_time + 0.5 * fast.swapped_tokens * 1000 / 1e6


def test_stop_above_gives_a_lower_bound():
    trace = with_arrivals(synthetic("sharegpt", 300, seed=1), rate=500.0, seed=0)
    p = profile(num_blocks=300, block_size=16, max_num_seqs=16, max_num_batched_tokens=512)
    full = S.simulate(trace, "fcfs", p)
    cut = S.simulate(trace, "fcfs", p, stop_above=0.2 * full.metrics()["normalized_latency"])
    assert cut.saturated and cut.num_unfinished > 0
    nl = cut.metrics()["normalized_latency"]
    assert 0.2 * full.metrics()["normalized_latency"] < nl <= full.metrics()["normalized_latency"]


def test_metrics_on_a_known_run():
    res = S.RunResult("fcfs", 2.0, arrival=np.array([0.0, 1.0, 2.0, 3.0]), first_token=np.array([0.5, 1.5, 2.5, 4.0]),
                      finish=np.array([2.0, 3.0, 6.0, 5.0]), output_len=np.array([4, 2, 8, 1]),
                      predicted_at_arrival=np.zeros(4), num_steps=10, num_preemptions=0, swapped_tokens=0,
                      recomputed_tokens=0, busy_time=6.0)
    m = res.metrics()
    assert m["normalized_latency"] == pytest.approx((2 / 4 + 2 / 2 + 4 / 8 + 2 / 1) / 4)
    assert m["mean_latency"] == pytest.approx(2.5)
    assert m["p50_latency"] == pytest.approx(2.0)
    assert m["ttft"] == pytest.approx((0.5 + 0.5 + 0.5 + 1.0) / 4)
    assert m["tokens_per_s"] == pytest.approx(15 / 6)
    assert m["p99_latency"] == pytest.approx(np.percentile([2, 2, 4, 2], 99))


def test_max_rate_under_bound():
    rates, lat = [1, 2, 4, 8], [0.01, 0.02, 0.04, 0.16]
    r, note = S.max_rate_under(rates, lat, 0.08)
    # log-linear between (4, 0.04) and (8, 0.16): 0.08 is halfway in log space
    assert note == "" and r == pytest.approx(6.0)
    assert S.max_rate_under(rates, lat, 1.0) == (8, ">=")
    assert S.max_rate_under(rates, lat, 0.001) == (1, "<")


def test_roofline_profiles():
    a = S.roofline_profile("a100-40g-13b")
    h = S.roofline_profile("h100-13b")
    assert a.kind == "roofline model" and "not a measurement" in a.description
    # the 40 GB card leaves about 12 GB for a 13B model's KV (vLLM paper, Table 1): 0.8 MB per token
    assert 10e9 < a.num_blocks * a.block_size * S.MODELS["13b"].kv_bytes_per_token() < 13e9
    # a faster card: a decode step of 64 sequences over 512 tokens each takes less time
    assert h.cost.step_time(0, 64, 64 * 512) < a.cost.step_time(0, 64, 64 * 512)
    # the linear fit stays close to the roofline on a typical decode step
    acc, model = S.ACCELERATORS["a100-40g"], S.MODELS["13b"]
    roof = S.roofline_step_time(acc, model, 0, 32, 32 * 400)
    assert a.cost.step_time(0, 32, 32 * 400) == pytest.approx(roof, rel=0.25)
    with pytest.raises(ValueError, match="accelerator"):
        S.roofline_profile("tpu-7b")


def test_profile_round_trip(tmp_path):
    p = S.roofline_profile("a100-7b")
    p.save(tmp_path / "p.json")
    assert S.Profile.load(tmp_path / "p.json") == p
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a simulator profile"):
        S.Profile.load(tmp_path / "bad.json")


def test_error_model_sampling():
    em = S.ErrorModel.default()
    rng = np.random.default_rng(0)
    xs = np.array([em.sample("arrival", rng) for _ in range(4000)])
    assert abs(np.median(xs)) < 0.05 and 0.6 < xs.std() < 0.95
    measured = S.ErrorModel.load()                     # the committed measurement
    assert len(measured.arrival) == 101 and np.all(np.diff(measured.arrival) >= 0)


def test_sim_cli_json_schema(tmp_path):
    from alise.bench.__main__ import main
    out = tmp_path / "r.json"
    png = tmp_path / "r.png"
    main(["sim", "--workload", "alpaca", "--num-requests", "150", "--rates", "5,400", "--workers", "1",
          "--quiet", "--json", str(out), "--plot", str(png)])
    rep = json.loads(out.read_text())
    assert {"results", "max_rate", "ratio_vs_fcfs", "bounds", "profile", "predictions"} <= rep.keys()
    assert "sampled from the real predictor's error distribution" in rep["predictions"]
    assert {(r["policy"], r["rate"]) for r in rep["results"]} == {(p, r) for p in ("fcfs", "alise", "oracle")
                                                                   for r in (5.0, 400.0)}
    for r in rep["results"]:
        assert {"policy", "rate", "normalized_latency", "p99_latency", "ttft", "tokens_per_s"} <= r.keys()
        assert r["normalized_latency"] > 0 and math.isfinite(r["tokens_per_s"])
    assert set(rep["max_rate"]) == {"fcfs", "alise", "oracle"}
    assert len(rep["max_rate"]["fcfs"]) == 3
    assert all(v == pytest.approx(1.0) for v in rep["ratio_vs_fcfs"]["fcfs"].values())
    assert png.stat().st_size > 10_000


def test_summary_counts_overloaded_runs_as_over_the_bound():
    from alise.bench.__main__ import summarize
    rows = [{"policy": "fcfs", "rate": 1.0, "normalized_latency": 0.01, "backlog_fraction": 0.01},
            {"policy": "fcfs", "rate": 2.0, "normalized_latency": 0.04, "backlog_fraction": 0.05},
            {"policy": "alise", "rate": 1.0, "normalized_latency": 0.01, "backlog_fraction": 0.01},
            {"policy": "alise", "rate": 2.0, "normalized_latency": 0.015, "backlog_fraction": 0.05},
            # low mean latency, but half the requests were still queued when the arrivals stopped
            {"policy": "alise", "rate": 4.0, "normalized_latency": 0.02, "backlog_fraction": 0.5}]
    max_rate, notes, ratio, _ = summarize(rows, [0.02], ["fcfs", "alise"])
    assert max_rate["fcfs"]["0.02"] == pytest.approx(1.5)          # 0.02 halfway between 0.01 and 0.04 in log
    assert notes["alise"]["0.02"] == "" and 2.0 < max_rate["alise"]["0.02"] < 2.2
    assert ratio["alise"]["0.02"] == pytest.approx(max_rate["alise"]["0.02"] / 1.5)
    # the paper's finite-trace method (no backlog check, --max-backlog 1.01): the overloaded run counts
    loose, _, _, _ = summarize(rows, [0.02], ["fcfs", "alise"], max_backlog=1.01)
    assert loose["alise"]["0.02"] > 3.9 and loose["fcfs"]["0.02"] == pytest.approx(1.5)


def test_fitted_profile_fits_the_typical_step_and_keeps_the_stalls_time():
    """Stalls (another process took the CPU) do not bend the per-token coefficients, but their time is kept as
    per-step overhead: the simulated engine must not be faster than the measured one."""
    rng = np.random.default_rng(0)
    true = CostModel(overhead=0.05, prefill_token=1e-3, decode_seq=1e-2, context_token=1e-6)
    rows, stalls = [], []
    for _ in range(300):
        p, d, c = int(rng.integers(0, 200)), int(rng.integers(0, 16)), int(rng.integers(0, 5000))
        stalls.append(5.0 if rng.random() < 0.03 else 0.0)
        rows.append((p, d, c, true.step_time(p, d, c) + stalls[-1]))
    prof = S.fitted_profile(rows, num_blocks=10, block_size=16, max_num_seqs=4, max_num_batched_tokens=512,
                            max_model_len=2048, swap_capacity_bytes=1, swap_bytes_per_token=1, swap_bandwidth=1)
    assert prof.kind == "fitted"
    for f in ("prefill_token", "decode_seq", "context_token"):
        assert getattr(prof.cost, f) == pytest.approx(getattr(true, f), rel=0.05)
    assert prof.cost.overhead == pytest.approx(true.overhead + np.mean(stalls), rel=0.05)
    total = sum(prof.cost.step_time(p, d, c) for p, d, c, _ in rows)
    assert total == pytest.approx(sum(r[3] for r in rows), rel=1e-6)


def test_serve_run_on_a_tiny_model(tiny_model_dir):
    """The wall-clock replay on the real engine: every request runs to its trace length; metrics are sane."""
    from alise import LLM
    from alise.bench.__main__ import serve_run
    llm = LLM(str(tiny_model_dir), policy="fcfs", max_num_seqs=2, dtype="float32", kv_cache_blocks=64)
    trace = [TraceRequest(5, 3, max_tokens=3), TraceRequest(8, 6, max_tokens=6), TraceRequest(4, 2, max_tokens=2)]
    m = serve_run(llm, trace, rate=50.0, seed=0, policy="fcfs")
    assert m["output_lens"] == [3, 6, 2]
    assert m["normalized_latency"] > 0 and m["ttft"] <= m["mean_latency"] and m["num_requests"] == 3
    assert llm.engine.stats().num_requests == 0            # the run cleans up after itself
    assert len(llm.engine.step_samples) >= 6


def test_serve_runs_start_from_the_same_predictor(tiny_model_dir):
    """serve replays the same prompts at every rate: the run must not teach the predictor their true lengths
    for the next one (it did: from the second rate on, retrieval found each prompt's length from the last run)."""
    from alise import LLM
    from alise.bench.__main__ import serve_run
    llm = LLM(str(tiny_model_dir), policy="alise", embedder="model", max_num_seqs=2, dtype="float32",
              kv_cache_blocks=64)
    predictor = llm.engine.predictor
    trace = [TraceRequest(5, 3 + i, prompt=f"question number {i} about {w}", max_tokens=40)
             for i, w in enumerate(("cats", "dogs", "rivers", "trains"))]
    prompts = [t.prompt for t in trace]
    before = predictor.predict_many(prompts, max_tokens=40)
    serve_run(llm, trace, rate=50.0, seed=0, policy="alise")
    assert len(predictor) == 0 and predictor.predict_many(prompts, max_tokens=40) == before
    # without the reset, the same run leaves every prompt's true length in the store
    from alise.bench.__main__ import _serve_loop
    ids, start = {}, time.monotonic()
    timed = with_arrivals(trace, 50.0, seed=0)
    _serve_loop(llm.engine, timed, sorted(range(4), key=lambda i: timed[i].arrival), ids, start, "alise", None)
    assert len(predictor) == 4


def test_backlog_fraction_tells_overload():
    trace = synthetic("sharegpt", 200, seed=1)
    p = profile(num_blocks=300, block_size=16, max_num_seqs=16, max_num_batched_tokens=512)
    light = S.simulate(with_arrivals(trace, 0.01, seed=0), "fcfs", p)   # this cost model is slow: ~0.1 req/s
    heavy = S.simulate(with_arrivals(trace, 50.0, seed=0), "fcfs", p)
    assert light.backlog_fraction < 0.05 and heavy.backlog_fraction > 0.5


def test_benchmarks_do_not_leak_true_lengths_to_the_predictor(tiny_model_dir):
    """serve and burst fix each request's work through max_tokens = its true length; the predictor must still
    be clamped at the workload's cap (before, every ALISE prediction was capped at the true length)."""
    from alise import LLM
    from alise.bench.__main__ import burst_run, serve_run

    class Recorder:
        def __init__(self):
            self.caps = []

        def predict(self, prompt, max_tokens=None):
            self.caps.append(max_tokens)
            return 1

        def predict_remaining(self, prompt, generated, max_tokens=None):
            self.caps.append(max_tokens)
            return 1

        def observe(self, prompt, output_len):
            pass
    llm = LLM(str(tiny_model_dir), policy="alise", embedder="model", max_num_seqs=2, dtype="float32",
              kv_cache_blocks=64)
    recorder = llm.engine.predictor = Recorder()
    trace = [TraceRequest(5, 3, prompt="a b c", max_tokens=40), TraceRequest(8, 6, prompt="d e f", max_tokens=40)]
    m = serve_run(llm, trace, rate=50.0, seed=0, policy="alise")
    assert m["output_lens"] == [3, 6] and recorder.caps and set(recorder.caps) == {40}
    recorder.caps.clear()
    records = burst_run(llm, trace, max_tokens=30)
    assert [r["output_len"] for r in records] == [3, 6] and set(recorder.caps) == {30}
    assert llm.engine.predictor is recorder and llm.engine.stats().num_requests == 0


@pytest.mark.parametrize("policy", ["oracle", "fcfs"])
def test_the_simulator_and_the_engine_make_the_same_schedule(tiny_model_dir, policy):
    """One loop: a burst on the tiny model through the engine, with a fixed cost model instead of the wall clock,
    and through the simulator with the same limits, gives the same batches (requests and tokens per step), the
    same preemptions and the same swaps."""
    import torch

    from alise import LLM, SamplingParams
    from alise.sched.cost import CostModel
    g = torch.Generator().manual_seed(5)
    prompt_lens = torch.randint(5, 40, (10,), generator=g).tolist()
    output_lens = torch.randint(2, 30, (10,), generator=g).tolist()
    llm = LLM(str(tiny_model_dir), dtype="float32", policy=policy, kv_cache_blocks=10, block_size=8,
              max_num_seqs=4, max_num_batched_tokens=48, swap_space_gb=2e-5)
    engine = llm.engine
    engine._record_step = lambda *args: None          # the policy keeps CostModel()'s costs, as the profile does
    log = {}

    def logged(scheduler, key):
        schedule = scheduler.schedule

        def run():
            b = schedule()
            log.setdefault(key, []).append(([(r.request_id, n) for r, n in zip(b.requests, b.num_new_tokens)],
                                            sorted(r.request_id for r in b.preempted),
                                            sorted(r.request_id for r, _ in b.swap_out),
                                            sorted(r.request_id for r, _ in b.swap_in)))
            return b
        scheduler.schedule = run
    logged(engine.scheduler, "engine")
    for i, (p, n) in enumerate(zip(prompt_lens, output_lens)):
        engine.add_request([3 + (7 * j + i) % 300 for j in range(p)], SamplingParams(max_tokens=n, ignore_eos=True),
                           arrival_time=0.0, true_output_len=n if policy == "oracle" else None)
    while engine.has_unfinished():
        engine.step()
    swap = engine.scheduler.swap_space
    p = S.Profile("tiny", CostModel(), num_blocks=10, block_size=8, max_num_seqs=4, max_num_batched_tokens=48,
                  max_model_len=engine.max_model_len, swap_capacity_bytes=swap.capacity_bytes,
                  swap_bytes_per_token=swap.bytes_per_token)
    trace = [TraceRequest(pl, n, arrival=0.0, max_tokens=n) for pl, n in zip(prompt_lens, output_lens)]
    original = S.Scheduler

    class Logged(original):
        def __init__(self, **kw):
            super().__init__(**kw)
            logged(self, "simulator")
    S.Scheduler = Logged
    try:
        S.simulate(trace, policy, p)
    finally:
        S.Scheduler = original
    assert log["engine"] == log["simulator"]
    assert any(pre for _, pre, _, _ in log["engine"]), "the small pool should force preemptions"
    if policy == "oracle":
        assert any(out for _, _, out, _ in log["engine"]), "and swaps"


def test_grouped_split_keeps_groups_whole():
    # 10 groups of sizes 1..4 (25 records): every group lands on one side, the history is the largest whole-group
    # prefix of the shuffled order at or below the share, and without groups the split is the plain one
    sizes = [1, 2, 3, 4, 1, 2, 3, 4, 2, 3]
    groups = [g for g, n in enumerate(sizes) for _ in range(n)]
    records = [(f"p{i}", i) for i in range(len(groups))]
    for seed in range(5):
        hist, test = S.grouped_split(records, groups, 0.5, seed)
        assert sorted(hist + test) == sorted(records)
        side = {groups[i]: "h" for _, i in hist}
        assert all(side.get(groups[i]) is None for _, i in test)         # no group on both sides
        assert len(hist) <= 12.5
        # the next group in the shuffled order would have taken the history past the share
        first_test_group = groups[test[0][1]]
        assert len(hist) + sizes[first_test_group] > 12.5
    hist, test = S.grouped_split(records, None, 0.5, 0)
    assert len(hist) == 12 and len(test) == 13
    with pytest.raises(ValueError, match="groups"):
        S.grouped_split(records, groups[:-1], 0.5, 0)


def test_unloaded_backlog_by_hand():
    """Each step costs 1 s (overhead only): a request of prompt 4 (one prefill step, its first token) and output
    n takes n steps alone. Arrivals at 0, 5, 8, last at 9: the first is done (5 steps); the second (output 6,
    until 11) has made 4 s of progress: its first token at 6, then 3 of its 5 remaining steps, 2 / 5 of its 5
    later tokens left = 2 tokens; the third (output 4, 8 -> 12): 1 s gone, its first token, 3 of 3 later left;
    the last: all 2 left. So (2 + 3 + 2) / (5 + 6 + 4 + 2) of the work is in flight without any queue."""
    p = profile(cost=CostModel(overhead=1.0, prefill_token=0.0, decode_seq=0.0, context_token=0.0),
                max_num_batched_tokens=16)
    trace = [TraceRequest(4, n, arrival=a) for n, a in ((5, 0.0), (6, 5.0), (4, 8.0), (2, 9.0))]
    assert S.isolated_latency(trace[1], p) == (6.0, 1.0)
    want = (2 + 3 + 2) / 17
    assert S.unloaded_backlog(trace, p) == pytest.approx(want)


def test_sustained_counts_backlog_beyond_the_unloaded_one():
    """The 10% rule applies to the backlog beyond what a run that keeps up carries at the last arrival."""
    from alise.bench.__main__ import sustained
    assert sustained({"backlog_fraction": 0.15, "unloaded_backlog_fraction": 0.08})
    assert not sustained({"backlog_fraction": 0.15, "unloaded_backlog_fraction": 0.04})
    assert not sustained({"backlog_fraction": 0.15})
    assert not sustained({"backlog_fraction": 0.0, "saturated": True})
    run = S.simulate(with_arrivals(synthetic("sharegpt", 200, seed=1), 0.01, seed=0), "fcfs",
                     profile(num_blocks=300, block_size=16, max_num_seqs=16, max_num_batched_tokens=512))
    assert 0 < run.unloaded_backlog_fraction <= run.backlog_fraction + 1e-9   # light load: in flight, no queue
