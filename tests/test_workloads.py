"""Workloads: the length-only shapes match the published means, trace files are validated, arrivals are Poisson."""
from __future__ import annotations

import json

import numpy as np
import pytest

from alise.bench import workloads as W


@pytest.mark.parametrize("name,mean_in,mean_out", [("sharegpt", 161.0, 338.0), ("alpaca", 19.31, 58.45)])
def test_synthetic_means_match_published(name, mean_in, mean_out):
    reqs = W.synthetic(name, 20000, seed=0)
    p = np.array([r.prompt_len for r in reqs])
    o = np.array([r.output_len for r in reqs])
    assert p.mean() == pytest.approx(mean_in, rel=0.04)
    assert o.mean() == pytest.approx(mean_out, rel=0.04)
    inp, out = W.SHAPES[name]
    assert p.min() >= inp.lo and p.max() <= inp.hi and o.min() >= out.lo and o.max() <= out.hi
    assert np.median(o) < 0.8 * o.mean()              # a long right tail
    assert all(r.prompt is None and r.max_tokens >= r.output_len for r in reqs[:100])


def test_clipped_lognormal_mean_is_solved():
    shape = W.LengthShape(338.0, 1.0, 1, 1024)
    assert W.clipped_lognormal_mean(shape.mu(), 1.0, 1, 1024) == pytest.approx(338.0, rel=1e-6)
    # clipping the tail lowers the mean, so mu must sit above the unclipped solution log(338) - 1/2
    assert shape.mu() > np.log(338.0) - 0.5


def test_synthetic_is_seeded():
    a, b = W.synthetic("sharegpt", 50, seed=1), W.synthetic("sharegpt", 50, seed=1)
    assert [(r.prompt_len, r.output_len) for r in a] == [(r.prompt_len, r.output_len) for r in b]
    assert a != W.synthetic("sharegpt", 50, seed=2)
    with pytest.raises(ValueError, match="sharegpt"):
        W.synthetic("dolly", 10)


def test_poisson_arrivals_rate():
    rate = 4.0
    t = W.poisson_arrivals(20000, rate, seed=0)
    assert t[0] == 0.0 and np.all(np.diff(t) >= 0)
    gaps = np.diff(t)
    # mean gap 1/rate within 4 standard errors (std of an exponential gap = its mean)
    assert abs(gaps.mean() - 1 / rate) < 4 * (1 / rate) / np.sqrt(len(gaps))
    # exponential gaps: coefficient of variation 1
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.05)
    assert np.array_equal(t, W.poisson_arrivals(20000, rate, seed=0))
    with pytest.raises(ValueError, match="rate"):
        W.poisson_arrivals(10, 0.0)


def test_with_arrivals_and_sampling():
    reqs = W.synthetic("alpaca", 30, seed=0)
    timed = W.with_arrivals(reqs, 2.0, seed=3)
    assert [r.output_len for r in timed] == [r.output_len for r in reqs]
    assert all(r.arrival is not None for r in timed)
    with pytest.raises(ValueError, match="arrival"):
        W.with_arrivals(reqs, None)
    more = W.sample_requests(reqs, 75, seed=0)
    assert len(more) == 75 and sorted(map(id, more[:30])) == sorted(map(id, reqs))


def test_trace_round_trip(tmp_path):
    reqs = [W.TraceRequest(5, 7, "hello", 0.5, 16, "x"), W.TraceRequest(3, 1)]
    W.save_trace(tmp_path / "t.jsonl", reqs)
    assert W.load_trace(tmp_path / "t.jsonl") == reqs
    assert W.workload(str(tmp_path / "t.jsonl")) == reqs


@pytest.mark.parametrize("bad,msg", [
    ("{not json", "not valid JSON"),
    ('{"prompt_len": 3}', '"output_len" must be an int >= 1'),
    ('{"prompt_len": 0, "output_len": 3}', '"prompt_len" must be an int >= 1'),
    ('{"prompt_len": 2.5, "output_len": 3}', '"prompt_len"'),
    ('{"prompt_len": 2, "output_len": 3, "prompt": 7}', '"prompt" must be a string'),
    ('{"prompt_len": 2, "output_len": 3, "arrival": -1}', '"arrival" must be a number >= 0'),
    ('{"prompt_len": 2, "output_len": 3, "max_tokens": 2}', '"max_tokens" must be an int >= output_len'),
    ('[1, 2]', "expected a JSON object"),
])
def test_bad_trace_line_names_the_line(tmp_path, bad, msg):
    good = json.dumps({"prompt": "hi", "prompt_len": 2, "output_len": 3})
    path = tmp_path / "t.jsonl"
    path.write_text(good + "\n\n" + bad + "\n" + good + "\n")
    with pytest.raises(ValueError) as e:
        W.load_trace(path)
    assert f"{path}: line 3: " in str(e.value) and msg in str(e.value)


def test_empty_trace_and_unknown_workload(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no requests"):
        W.load_trace(tmp_path / "e.jsonl")
    with pytest.raises(ValueError, match="workload must be"):
        W.workload("nonexistent-workload")


def test_real_conversations():
    try:
        convs = W.real_conversations()
    except RuntimeError as e:       # the registry package could not be fetched (offline)
        pytest.skip(str(e))
    assert len(convs) == 80 + 1000          # MT-Bench first turns + every LMSYS human turn
    assert sum(s.startswith("mtbench:") for s, _ in convs) == 80
    assert all(m[-1]["role"] == "user" for _, m in convs)
    assert len({json.dumps(m) for _, m in convs}) == 80 + 436


def test_split_trace_cli_writes_disjoint_parts(tmp_path):
    """Grouped: repeats of a prompt and every turn of one conversation land on the same side."""
    from alise.bench.__main__ import main
    trace = tmp_path / "trace.jsonl"
    rows = [json.dumps({"prompt": f"question {i}", "prompt_len": 3, "output_len": i + 1, "source": f"mtbench:{i}"})
            for i in range(10)]
    # conversation 7's second turn and a repeat of question 3 under another source
    rows += [json.dumps({"prompt": "question 7 ... turn two", "prompt_len": 5, "output_len": 2,
                         "source": "mtbench:7:turn2"}),
             json.dumps({"prompt": "question 3", "prompt_len": 3, "output_len": 4, "source": "lmsys:x:0"})]
    trace.write_text("\n".join(rows) + "\n")
    hist, test = tmp_path / "hist.jsonl", tmp_path / "test.jsonl"
    for seed in range(4):
        main(["split-trace", "--trace", str(trace), "--test", "5", "--history-out", str(hist), "--test-out",
              str(test), "--seed", str(seed), "--keep-repeats"])
        h, t = hist.read_text().splitlines(), test.read_text().splitlines()
        assert len(t) <= 6 and sorted(h + t) == sorted(rows) and not set(h) & set(t)
        test_prompts = {json.loads(line)["prompt"] for line in t}
        assert test_prompts.isdisjoint(json.loads(line)["prompt"] for line in h)
        assert ("question 7" in test_prompts) == ("question 7 ... turn two" in test_prompts)
    assert [r.output_len for r in W.load_trace(test)] == [json.loads(line)["output_len"] for line in t]
    main(["split-trace", "--trace", str(trace), "--test", "5", "--history-out", str(hist), "--test-out", str(test)])
    prompts = [json.loads(line)["prompt"] for line in hist.read_text().splitlines() + test.read_text().splitlines()]
    assert len(prompts) == len(set(prompts)) == 11       # without --keep-repeats: one line per distinct prompt
    with pytest.raises(SystemExit, match="--test"):
        main(["split-trace", "--trace", str(trace), "--test", "11", "--history-out", str(hist),
              "--test-out", str(test)])
