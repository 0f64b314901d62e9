"""The paper's comparison as systems: KV page format in the profile, named systems, three throughput definitions."""
from __future__ import annotations

import math

import pytest

from alise import kernels
from alise.bench import simulator as S
from alise.bench.__main__ import goodput, main, median_rows, summarize, summarize_repeats, throughputs
from alise.bench.workloads import synthetic, with_arrivals


@pytest.mark.parametrize("kv_dtype", ["bf16", "int8", "int4"])
def test_pool_capacity_is_the_byte_arithmetic(kv_dtype):
    p = S.roofline_profile("a100-40g-13b", kv_dtype=kv_dtype)
    m, acc = S.MODELS["13b"], S.ACCELERATORS["a100-40g"]
    pool = S.GPU_MEMORY_UTILIZATION * acc.memory_bytes - 2 * m.params - S.ACTIVATION_RESERVE
    per_token = m.layers * kernels.bytes_per_token(kv_dtype, m.kv_heads, m.head_dim)   # scales included
    assert p.num_blocks == int(pool // (per_token * p.block_size)) and p.kv_dtype == kv_dtype
    # by hand for bf16: K and V, 2 bytes each, no scales; int8: 1 byte each + an fp16 scale per (token, head)
    by_hand = {"bf16": 2 * 2 * 128, "int8": 2 * (128 + 2)}
    if kv_dtype in by_hand:
        assert per_token == m.layers * m.kv_heads * by_hand[kv_dtype]
    if kv_dtype != "bf16":   # quantized pages are swapped as they are
        assert p.swap_bytes_per_token == per_token
    # the roofline reads KV at the pages' width: a long-context decode step is cheaper with smaller pages
    t = {d: S.roofline_step_time(acc, m, 0, 64, 64 * 2048, kv_dtype=d) for d in ("bf16", kv_dtype)}
    assert t[kv_dtype] <= t["bf16"]


def row(policy, rate, latency, backlog=0.0, attainment=1.0, saturated=False):
    return {"policy": policy, "rate": rate, "normalized_latency": latency, "backlog_fraction": backlog,
            "slo_attainment": attainment, "saturated": saturated}


def test_a_run_past_capacity_passes_the_papers_definition_and_fails_sustained():
    # "x" keeps its mean normalized latency under 10 at 3 req/s, but left half its work at the last arrival
    rows = [row("x", 1, 5.0), row("x", 2, 6.0), row("x", 3, 8.0, backlog=0.5), row("x", 4, 40.0, backlog=0.7)]
    paper, _, _, _ = summarize(rows, [10.0], ["x"], max_backlog=math.inf, baseline="x")
    sustained, _, _, _ = summarize(rows, [10.0], ["x"], max_backlog=0.1, baseline="x")
    # paper: interpolated in log latency between 3 (8) and 4 (40) req/s; sustained: between 2 (6) and 3 (over)
    assert paper["x"]["10"] == pytest.approx(3 + math.log(10 / 8) / math.log(40 / 8))
    assert 2 <= sustained["x"]["10"] < 3


def test_goodput_is_decided_by_the_90_percent_line():
    rows = [row("a", 1, 1, attainment=1.0), row("a", 2, 1, attainment=0.91), row("a", 3, 1, attainment=0.5),
            row("b", 1, 1, attainment=1.0), row("b", 2, 1, attainment=0.89), row("b", 3, 1, attainment=0.5)]
    rate, notes, ratio = goodput(rows, ["a", "b"], baseline="b")
    assert 2 <= rate["a"] < 3 and 1 <= rate["b"] < 2 and ratio["a"] > 1
    tp = throughputs(rows, [2.0], ["a", "b"], baseline="b", reference="a")
    assert set(tp) == {"paper", "sustained", "goodput"} and tp["goodput"]["max_rate"] == rate


def test_slo_attainment_counts_requests_meeting_both_slos():
    trace = synthetic("alpaca", 50, seed=3)
    p = S.roofline_profile("a100-7b", max_num_seqs=8)
    res = S.simulate(with_arrivals(trace, 0.5, seed=0), "fcfs", p)
    ttft_slo, tpot_slo = S.unloaded_slos(trace, p, scale=1.5)
    assert res.slo_attainment(ttft_slo, tpot_slo) >= 0.9           # light load: as good as alone
    assert res.slo_attainment(0.0, tpot_slo) == 0.0                 # nobody's first token comes at once


def test_a_systems_settings_reach_the_simulator():
    trace = with_arrivals(synthetic("sharegpt", 150, seed=2), 6.0, seed=0)    # overloads a small pool
    kw = dict(max_num_seqs=64)
    runs = {}
    for name in ("vllm", "alise"):
        system = S.SYSTEMS[name]
        profile = S.system_profile(system, "a100-40g-13b", **kw)
        profile.num_blocks //= 8                                                # memory pressure
        preds = S.SampledSpeculation(S.ErrorModel.load(), 1) if system.policy == "alise" else None
        runs[name] = (profile, S.simulate(trace, system.policy, profile, predictions=preds,
                                          swap=system.preemption == "swap"))
    vllm_profile, vllm = runs["vllm"]
    alise_profile, alise = runs["alise"]
    assert vllm.num_preemptions > 0 and vllm.swapped_tokens == 0 and vllm.recomputed_tokens > 0
    assert alise_profile.kv_dtype == "int8" and vllm_profile.kv_dtype == "bf16"
    assert alise_profile.num_blocks > 1.9 * vllm_profile.num_blocks          # int8 pages: about twice the tokens
    assert alise.swapped_tokens > 0


def test_bad_systems_name_the_flag_and_the_choices(capsys):
    with pytest.raises(SystemExit, match="--systems.*vllm.*alise"):
        main(["sim", "--systems", "vllm,tgi", "--num-requests", "10"])
    with pytest.raises(SystemExit):
        main(["sim", "--kv-dtype", "fp8", "--num-requests", "10"])
    assert "--kv-dtype" in capsys.readouterr().err


def test_serve_systems_reach_the_engine(tiny_model_dir, tmp_path):
    """serve --systems vllm,alise on the tiny model under memory pressure: vllm recomputes and never swaps,
    alise's pool has int8 pages (1.8x the blocks in the same memory for head_dim 16)."""
    import json
    out = tmp_path / "serve.json"
    main(["serve", "--model", str(tiny_model_dir), "--workload", "alpaca", "--num-requests", "12", "--rates", "50",
          "--systems", "vllm,alise", "--max-tokens", "40", "--kv-cache-memory-gb", "4e-5", "--max-num-seqs", "6",
          "--repeats", "2", "--quiet", "--json", str(out), "--plot", str(tmp_path / "serve.png")])
    report = json.loads(out.read_text())
    # --repeats 2: every (system, rate) point measured twice, each repeat summarized on its own
    assert sorted((r["policy"], r["repeat"]) for r in report["results"]) == [
        ("alise", 0), ("alise", 1), ("vllm", 0), ("vllm", 1)]
    assert [x["repeat"] for x in report["repeats"]] == [0, 1] and (tmp_path / "serve.png").stat().st_size > 0
    engines, runs = report["engines"], {r["policy"]: r for r in report["results"] if r["repeat"] == 0}
    assert engines["vllm"]["kv_dtype"] == "bf16" and engines["alise"]["kv_dtype"] == "int8"
    assert engines["alise"]["num_blocks"] > 1.5 * engines["vllm"]["num_blocks"]   # 36 vs 64 bytes a head
    assert runs["vllm"]["swapped_tokens"] == 0 and runs["vllm"]["num_preemptions"] > 0
    # alise's evictions go to host swap space (it has room), never to recompute
    assert runs["alise"]["recomputed_tokens"] == 0 and engines["alise"]["policy"] == "alise"


def test_systems_take_the_fitted_profile_of_their_kv_dtype(tmp_path):
    files = []
    for kv_dtype, blocks in (("bf16", 50), ("int8", 97)):
        profile = S.roofline_profile("a100-7b", kv_dtype=kv_dtype, max_num_seqs=8)
        profile.num_blocks, profile.name = blocks, f"fitted-{kv_dtype}"
        profile.save(tmp_path / f"{kv_dtype}.json")
        files.append(str(tmp_path / f"{kv_dtype}.json"))
    both = ",".join(files)
    assert S.system_profile(S.SYSTEMS["vllm"], both).name == "fitted-bf16"
    assert S.system_profile(S.SYSTEMS["alise"], both).num_blocks == 97
    with pytest.raises(ValueError, match="int4 KV pages.*fitted with bf16, int8"):
        S.system_profile(S.SYSTEMS["alise-int4"], both)
    with pytest.raises(ValueError, match="missing.json"):
        S.system_profile(S.SYSTEMS["vllm"], f"{files[0]},{tmp_path / 'missing.json'}")


def test_repeats_take_the_median_of_per_repeat_rates_and_ratios():
    """Three repeats of a two-policy sweep, each curve crossing the bound halfway between two rates (latency
    bound / e, then bound * e: the log interpolation lands on the midpoint), worked out by hand."""
    e, b = math.e, 1.0
    curves = {0: {"fcfs": [b / e, b * e, b * e], "alise": [b / e, b / e, b * e]},       # 1.5 and 2.5 req/s
              1: {"fcfs": [b / e, b / e, b * e], "alise": [b / e, b / e, b / e]},       # 2.5 and >= 3
              2: {"fcfs": [b * e, b * e, b * e], "alise": [b / e, b * e, b * e]}}       # < 1 and 1.5
    results = [{"policy": p, "rate": rate, "repeat": rep, "normalized_latency": lat}
               for rep, pols in curves.items() for p, lats in pols.items() for rate, lat in zip((1, 2, 3), lats)]
    out = summarize_repeats(results, [b], ["fcfs", "alise"])
    k = "1"
    per = out["per_repeat"]
    assert [x["max_rate"]["fcfs"][k] for x in per] == pytest.approx([1.5, 2.5, 1.0])
    assert [x["max_rate"]["alise"][k] for x in per] == pytest.approx([2.5, 3.0, 1.5])
    assert [x["note"]["alise"][k] for x in per] == ["", ">=", ""]
    med = out["median"]
    assert med["max_rate"]["fcfs"][k] == pytest.approx(1.5) and med["max_rate"]["alise"][k] == pytest.approx(2.5)
    # the median of the per-repeat ratios (2.5/1.5, 3/2.5, 1.5/1), not the ratio of the medians (2.5/1.5)
    assert med["ratio"]["alise"][k] == pytest.approx(1.5)
    assert med["note"]["alise"][k] == "" and med["note"]["fcfs"][k] == ""
    rows = {(r["policy"], r["rate"]): r for r in median_rows(results)}
    assert rows[("fcfs", 2)]["normalized_latency"] == pytest.approx(b * e)
    assert rows[("fcfs", 2)]["min_normalized_latency"] == pytest.approx(b / e) and rows[("fcfs", 2)]["repeats"] == 3


def test_serve_repeats_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--repeats", "0", "--num-requests", "2"])
    assert "--repeats" in capsys.readouterr().err
