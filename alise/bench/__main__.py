"""Serving benchmarks: ``python -m alise.bench {sim,serve,burst,make-trace,split-trace,predictor-errors} ...``

    python -m alise.bench sim --workload sharegpt --policies fcfs,alise,oracle --json out.json --plot out.png
    python -m alise.bench sim --workload mtbench --train history.jsonl --profile h100-13b --rates 1,2,4
    python -m alise.bench serve --workload mtbench --policies fcfs,alise --rates 0.5,1 --num-requests 24
    python -m alise.bench make-trace --out trace.jsonl        # runs the default model on the real prompts
    python -m alise.bench split-trace --test 100 --history-out hist.jsonl --test-out test.jsonl
    python -m alise.bench predictor-errors --trace trace.jsonl  # the real predictor's error, for length-only sims

Metric (docs/design.md, "Workloads and metrics"): normalized latency = mean over requests of end-to-end latency / output tokens
(s/token). Throughput under a latency bound = the highest request rate whose normalized latency stays under
the bound (interpolated between swept rates), compared as a ratio between policies.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from alise.bench import simulator as S
from alise.bench import workloads as W
from alise.bench.plot import median_rows

DEFAULT_BOUND_FACTORS = (2.0, 5.0, 10.0)   # bounds relative to the unloaded normalized latency
STOP_FACTOR = 2.0                            # a run stops early once it is surely above STOP_FACTOR x max bound
MAX_BACKLOG = 0.1   # a run keeps up if <= 10% more of its output tokens are left at the last arrival than an
                    # engine that keeps up would have left (simulator.unloaded_backlog)
GOODPUT_TARGET = 0.9                         # goodput: the share of requests that must meet both SLOs
SUSTAINED_MIN_REQUESTS = 100                 # serve: below this many requests a sustained rate flips on one burst
SLO_SCALE = 5.0                              # SLOs = this x the 90th percentile of the unloaded TTFT / TPOT
#   (a stable run holds only its concurrency: ~40 ShareGPT requests on a100-40g-13b, under 5% of 1000)
# auto sweep: 5 light-load rates from 5% to 40% of a capacity estimate, then 20 rates 8% apart from 40% to 200%
# (the knee, where policies differ, needs the fine steps; each policy stops climbing once past saturation)


# -- shared helpers -------------------------------------------------------------------------------------------

def _floats(s: str | None, name: str) -> list[float] | None:
    if s is None:
        return None
    try:
        vals = [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--{name}: expected comma-separated numbers, got {s!r}") from None
    if not vals or any(not v > 0 for v in vals):
        raise SystemExit(f"--{name}: need positive numbers, got {s!r}")
    return sorted(vals)


def _positive_int(s: str) -> int:
    """argparse type: an integer >= 1 (argparse names the flag in its error)."""
    n = int(s) if s.strip().lstrip("+").isdigit() else 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return n


def _policies(s: str) -> list[str]:
    pols = [p.strip() for p in s.split(",") if p.strip()]
    bad = [p for p in pols if p not in ("fcfs", "alise", "oracle")]
    if bad or not pols:
        raise SystemExit(f"--policies: choose from fcfs, alise, oracle; got {s!r}")
    return pols


def load_workload(name: str, n: int | None, seed: int) -> list[W.TraceRequest]:
    try:
        return W.workload(name, n, seed)
    except (ValueError, OSError) as e:
        raise SystemExit(str(e)) from None


def sustained(r: dict, max_backlog: float = MAX_BACKLOG) -> bool:
    """Did the run keep up with its arrivals? Not stopped early, and at most ``max_backlog`` of the trace's
    output tokens still to generate when the last request arrived beyond what an engine that keeps up holds then
    (its last arrivals' unfinished work: ``simulator.unloaded_backlog``)."""
    excess = r.get("backlog_fraction", 0.0) - r.get("unloaded_backlog_fraction", 0.0)
    return not r.get("saturated") and excess <= max_backlog


def summarize(results: list[dict], bounds: list[float], policies: list[str],
              max_backlog: float = MAX_BACKLOG, baseline: str = "fcfs",
              reference: str = "oracle") -> tuple[dict, dict, dict, dict]:
    """max_rate[policy][bound], its note ("", ">=", "<"), the ratio to ``baseline`` and to ``reference``.

    A run that did not keep up with its arrivals (``sustained``) counts as over every bound: with a finite
    number of requests, shortest-first keeps the *mean* normalized latency low far past saturation (the long
    requests wait until the arrivals stop and are divided by their long outputs), which is no throughput."""
    max_rate, notes = {}, {}
    for p in policies:
        rows = [r for r in results if r["policy"] == p]
        max_rate[p], notes[p] = {}, {}
        for b in bounds:
            vals = [r["normalized_latency"] if sustained(r, max_backlog) else max(r["normalized_latency"], 1e3 * b)
                    for r in rows]
            rate, note = S.max_rate_under([r["rate"] for r in rows], vals, b)
            max_rate[p][_bkey(b)], notes[p][_bkey(b)] = rate, note
    ratio = {p: {k: _ratio(max_rate[p][k], max_rate.get(baseline, {}).get(k)) for k in max_rate[p]} for p in policies}
    vs_oracle = {p: {k: _ratio(max_rate[p][k], max_rate.get(reference, {}).get(k)) for k in max_rate[p]}
                 for p in policies}
    return max_rate, notes, ratio, vs_oracle


def goodput(results: list[dict], policies: list[str], target: float = GOODPUT_TARGET,
            baseline: str = "fcfs") -> tuple[dict, dict, dict]:
    """Highest rate at which at least ``target`` of the requests meet both SLOs (``slo_attainment``), its note
    and its ratio to ``baseline``, per policy (DistServe's goodput)."""
    rate, notes = {}, {}
    for p in policies:
        rows = [r for r in results if r["policy"] == p]
        rate[p], notes[p] = S.max_rate_under([r["rate"] for r in rows], [1.0 - r["slo_attainment"] for r in rows],
                                             1.0 - target)
    return rate, notes, {p: _ratio(rate[p], rate.get(baseline)) for p in policies}


def throughputs(results: list[dict], bounds: list[float], policies: list[str], max_backlog: float = MAX_BACKLOG,
                baseline: str = "fcfs", reference: str = "oracle") -> dict:
    """The three definitions of throughput, side by side:

    * ``paper``: a finite trace per rate, the highest rate whose mean normalized latency stays under the bound,
      no overload check (the vLLM / FastServe / ALISE papers' method);
    * ``sustained``: the same, but a run that fell behind its arrivals (``sustained``) counts as over every bound;
    * ``goodput``: the highest rate at which >= 90% of requests meet both a TTFT and a time-per-output-token SLO.
    """
    out = {}
    for name, backlog in (("paper", math.inf), ("sustained", max_backlog)):
        max_rate, notes, ratio, vs_ref = summarize(results, bounds, policies, backlog, baseline, reference)
        out[name] = {"max_rate": max_rate, "note": notes, "ratio_vs_baseline": ratio, "ratio_vs_reference": vs_ref}
    rate, notes, ratio = goodput(results, policies, baseline=baseline)
    out["goodput"] = {"max_rate": rate, "note": notes, "ratio_vs_baseline": ratio}
    return out


def summarize_repeats(results: list[dict], bounds: list[float], policies: list[str],
                      max_backlog: float = MAX_BACKLOG, baseline: str = "fcfs", reference: str = "oracle") -> dict:
    """``summarize`` for each repeat of a sweep (rows tagged ``repeat``), and the median over repeats.

    ``per_repeat``: one ``{max_rate, note, ratio, vs_reference}`` per repeat. ``median``: the same keys, each
    policy's median max rate and the median of its *per-repeat* ratios (each measured side by side with the
    baseline in one sweep; a ratio of medians would pair rates from different spells of the machine). A median's
    note is the one the median repeat had ("" when the repeats disagree).
    """
    per = []
    for repeat in sorted({r.get("repeat", 0) for r in results}):
        rows = [r for r in results if r.get("repeat", 0) == repeat]
        max_rate, notes, ratio, vs_ref = summarize(rows, bounds, policies, max_backlog, baseline, reference)
        per.append({"repeat": repeat, "max_rate": max_rate, "note": notes, "ratio": ratio, "vs_reference": vs_ref})

    def median(key: str, p: str, k: str):
        vals = [x[key][p][k] for x in per]
        return None if any(v is None for v in vals) else statistics.median(vals)
    keys = [_bkey(b) for b in bounds]
    med = {key: {p: {k: median(key, p, k) for k in keys} for p in policies}
           for key in ("max_rate", "ratio", "vs_reference")}
    med["note"] = {p: {k: (per[0]["note"][p][k] if len({x["note"][p][k] for x in per}) == 1 else "")
                       for k in keys} for p in policies}
    return {"per_repeat": per, "median": med}


def print_medians(rows: list[dict], file=sys.stdout) -> None:
    print(f"\nmedian over repeats (lowest-highest): normalized latency in ms/token, preemptions", file=file)
    for r in sorted(rows, key=lambda r: (r["policy"], r["rate"])):
        print(f"{r['policy']:<7} {r['rate']:>7.3g} {r['normalized_latency'] * 1e3:>8.1f} "
              f"({r['min_normalized_latency'] * 1e3:.1f}-{r['max_normalized_latency'] * 1e3:.1f}) "
              f"{r['num_preemptions']:>6g}{'' if r['sustained'] else '  (a repeat fell behind)'}", file=file)


def print_repeats(repeats: dict, bounds: list[float], baseline: str, file=sys.stdout) -> None:
    """Each repeat's highest rate at each bound and its ratio to the baseline, then the medians."""
    per, med = repeats["per_repeat"], repeats["median"]
    for b in bounds:
        k = _bkey(b)
        print(f"\nhighest rate <= {b * 1e3:.1f} ms/token, repeats {', '.join(str(x['repeat'] + 1) for x in per)}:",
              file=file)
        for p in med["max_rate"]:
            rates = " / ".join(f"{x['note'][p][k]}{x['max_rate'][p][k]:.3g}" for x in per)
            ratios = " / ".join("-" if x["ratio"][p][k] is None else f"{x['ratio'][p][k]:.2f}x" for x in per)
            m = med["ratio"][p][k]
            print(f"  {p:<12} {rates} req/s; vs {baseline} {ratios}, median {'-' if m is None else f'{m:.2f}x'}",
                  file=file)


def _bkey(b: float) -> str:
    return f"{b:.4g}"


def _ratio(a, b):
    return None if a is None or b is None or not b > 0 or math.isnan(a) else a / b


def print_results(results: list[dict], file=sys.stdout, max_backlog: float = MAX_BACKLOG) -> None:
    print(f"\n{'policy':<7} {'rate':>7} {'norm.lat':>10} {'mean lat':>9} {'p50 lat':>8} {'p99 lat':>8} {'TTFT':>8} "
          f"{'tok/s':>8} {'preempt':>8} {'note':<}", file=file)
    print(f"{'':<7} {'req/s':>7} {'ms/token':>10} {'s':>9} {'s':>8} {'s':>8} {'s':>8} {'':>8} {'':>8}", file=file)
    for r in sorted(results, key=lambda r: (r["policy"], r["rate"])):
        note = ("stopped: past saturation (lower bound)" if r.get("saturated") else
                "" if "requests_per_s" not in r or sustained(r, max_backlog) else
                f"overloaded: {r['backlog_fraction']:.0%} of the work left at the last arrival "
                f"({r.get('unloaded_backlog_fraction', 0.0):.0%} unloaded)")
        print(f"{r['policy']:<7} {r['rate']:>7.3g} {r['normalized_latency'] * 1e3:>10.2f} {r['mean_latency']:>9.2f} "
              f"{r['p50_latency']:>8.2f} {r['p99_latency']:>8.2f} {r['ttft']:>8.2f} {r['tokens_per_s']:>8.0f} "
              f"{r.get('num_preemptions', 0):>8} {note}", file=file)


def print_summary(bounds, unloaded, max_rate, notes, ratio, vs_oracle, file=sys.stdout,
                  max_backlog: float = MAX_BACKLOG, title: str = "", baseline: str = "fcfs",
                  reference: str = "oracle") -> None:
    print(f"\n{title or 'throughput under a latency bound'} (highest rate with normalized latency <= bound; "
          f"unloaded {unloaded * 1e3:.2f} ms/token)", file=file)
    w = max(7, *map(len, max_rate))
    vs_base, vs_ref = f"vs {baseline}", f"vs {reference}"
    cw = max(11, len(vs_base), len(vs_ref))
    head = f"{'policy':<{w}}" + "".join(f" {'<= ' + f'{b * 1e3:.1f} ms/tok':>17} {vs_base:>{cw}} {vs_ref:>{cw}}"
                                        for b in bounds)
    print(head, file=file)
    for p in max_rate:
        row = f"{p:<{w}}"
        for b in bounds:
            k = _bkey(b)
            note = {"": "", ">=": ">=", "<": "<"}[notes[p][k]]
            fr = ratio[p][k]
            orr = vs_oracle[p][k]
            row += (f" {note + f'{max_rate[p][k]:.3g} req/s':>17} {'-' if fr is None else f'{fr:.2f}x':>{cw}} "
                    f"{'-' if orr is None else f'{orr:.2f}':>{cw}}")
        print(row, file=file)
    overload = ("runs are not checked for backlog (--max-backlog >= 1)" if max_backlog >= 1 else
                f"a run with more than {max_backlog:.0%} of its output tokens left to generate at the last arrival, "
                "beyond what an engine that keeps up would have left, counts as over every bound")
    print(f"(>=: never exceeded the bound in the sweep; <: exceeded it even at the lowest rate; {overload}; a run "
          "stopped early past saturation counts as over every bound)", file=file)


# -- sim ------------------------------------------------------------------------------------------------------

_CTX: dict = {}      # the sweep's shared state, inherited by forked workers (no pickling of traces)


def _run(name: str, rate: float) -> dict:
    """One simulation of entry ``name`` (a policy, or a system: policy + profile + preemption mode)."""
    c = _CTX
    policy, profile, swap = c["entries"][name]
    trace = W.with_arrivals(c["trace"], rate, c["seed"])
    predictions = None
    if policy == "alise":
        if c["has_text"]:
            predictions = S.Speculation(S.make_real_predictor(c["train"], c["seed"], embed=c["embed"]))
        else:
            predictions = S.SampledSpeculation(c["errors"], c["seed"] + 1)
    t0 = time.perf_counter()
    res = S.simulate(trace, policy, profile, predictions=predictions, stop_above=c["stop_above"], swap=swap)
    m = res.metrics()
    m["policy"], m["rate"] = name, rate          # the entry's name: a system's, or the policy's
    m["slo_attainment"] = res.slo_attainment(*c["slos"])
    m["sim_seconds"] = time.perf_counter() - t0
    if policy == "alise":
        m["predictions"] = c["predictions_note"]
        if not res.saturated:
            from alise.bench.predictor import kendall_tau
            m["prediction_kendall_tau"] = kendall_tau(res.predicted_at_arrival, res.output_len)
    return m


def _init_worker() -> None:
    try:
        import torch
        torch.set_num_threads(1)
    except ImportError:
        pass


def sweep(policies: list[str], rates: list[float], workers: int, progress: bool = True,
          max_backlog: float = MAX_BACKLOG, max_bound: float = math.inf) -> list[dict]:
    """Each policy climbs the rate grid; after a run stopped past saturation, or three runs in a row that did
    not keep up with their arrivals and were above ``max_bound`` (over every bound under every definition), its
    higher rates are skipped."""
    from tqdm.auto import tqdm
    results: list[dict] = []
    nxt = {p: 0 for p in policies}
    bar = tqdm(total=len(policies) * len(rates), desc="sim", unit="run", disable=not progress)

    overloaded = {p: 0 for p in policies}

    def done(p, m):
        results.append(m)
        bar.update(1)
        bar.set_postfix_str(f"{p} {m['rate']:.3g} req/s: {m['normalized_latency'] * 1e3:.1f} ms/tok")
        over = not sustained(m, max_backlog) and m["normalized_latency"] > max_bound
        overloaded[p] = overloaded[p] + 1 if over else 0
        if m.get("saturated") or overloaded[p] >= 3:     # well past saturation: higher rates say nothing more
            bar.update(len(rates) - nxt[p])
            nxt[p] = len(rates)

    if workers <= 1:
        for p in policies:
            while nxt[p] < len(rates):
                rate = rates[nxt[p]]
                nxt[p] += 1
                done(p, _run(p, rate))
    else:
        import multiprocessing as mp
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"), initializer=_init_worker) as ex:
            inflight = {}
            while True:
                for p in policies:
                    if len(inflight) >= workers:
                        break
                    if p not in inflight.values() and nxt[p] < len(rates):
                        inflight[ex.submit(_run, p, rates[nxt[p]])] = p
                        nxt[p] += 1
                if not inflight:
                    break
                finished, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
                for f in finished:
                    done(inflight.pop(f), f.result())
    bar.close()
    return results


def auto_rates(trace, profile) -> list[float]:
    cap = S.capacity_estimate(trace, profile)
    grid = np.concatenate([np.geomspace(0.05, 0.4, 5, endpoint=False), np.geomspace(0.4, 2.0, 21)])
    return sorted({float(f"{r:.3g}") for r in cap * grid})


def _systems(args) -> list[str]:
    if getattr(args, "ablation", False):
        return list(S.ABLATION)
    names = [n.strip() for n in args.systems.split(",") if n.strip()]
    bad = [n for n in names if n not in S.SYSTEMS]
    if bad or not names:
        raise SystemExit(f"--systems: choose from {', '.join(S.SYSTEMS)}; got {args.systems!r}")
    return names


def sim_entries(args) -> tuple[dict, str, str]:
    """{name: (policy, profile, swap)} for the policies (one profile) or the systems (a profile each), the
    baseline the ratios are taken against and the reference (the oracle)."""
    kw = dict(max_num_seqs=args.max_num_seqs or 256, swap_gb=args.swap_gb)
    try:
        if args.systems or args.ablation:
            names = _systems(args)
            entries = {}
            for n in names:
                system = S.SYSTEMS[n]
                profile = S.system_profile(system, args.profile, **kw)
                entries[n] = (system.policy, profile, system.preemption == "swap")
            return entries, ("vllm" if "vllm" in names else names[0]), "oracle-int8"
        profile = S.get_profile(args.profile, kv_dtype=args.kv_dtype, **kw)   # (a profile file keeps its own)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if args.profile and Path(args.profile).is_file() and args.max_num_seqs:
        profile.max_num_seqs = args.max_num_seqs
    return {p: (p, profile, None) for p in _policies(args.policies)}, "fcfs", "oracle"


def cmd_sim(args) -> dict:
    entries, baseline, reference = sim_entries(args)
    policies = list(entries)
    kinds = {e[0] for e in entries.values()}
    profile = entries[baseline][1]        # bounds and SLOs: the baseline's (the same constraint for everyone)
    trace = load_workload(args.workload, args.num_requests, args.seed)
    has_text = all(t.prompt for t in trace)
    errors = S.ErrorModel.load(args.errors)
    note = _predictions_note(args, kinds, has_text, errors)
    if args.train and has_text:
        _warn_train_overlap(args.train, trace)
    unloaded = S.unloaded_normalized_latency(trace, profile)
    bounds = _floats(args.bounds, "bounds") or [f * unloaded for f in DEFAULT_BOUND_FACTORS]
    rates = _floats(args.rates, "rates") or auto_rates(trace, max((e[1] for e in entries.values()),
                                                                   key=lambda prof: S.capacity_estimate(trace, prof)))
    slos = S.unloaded_slos(trace, profile, args.slo_scale)
    embed = _warm_embedder(args, trace) if has_text and "alise" in kinds else None
    _print_sim_setup(args, trace, entries, slos, note, unloaded, bounds, rates)
    stop_above = STOP_FACTOR * max(bounds)
    _CTX.update(trace=trace, entries=entries, seed=args.seed, has_text=has_text, errors=errors, train=args.train,
                embed=embed, stop_above=stop_above, predictions_note=note, slos=slos)
    t0 = time.perf_counter()
    workers = args.workers if args.workers else min(len(policies), os.cpu_count() or 1)
    results = sweep(policies, rates, workers, progress=not args.quiet, max_backlog=args.max_backlog,
                    max_bound=max(bounds))
    elapsed = time.perf_counter() - t0
    for r in results:
        r["sustained"] = sustained(r, args.max_backlog)
    print_results(results, max_backlog=args.max_backlog)
    tp = throughputs(results, bounds, policies, args.max_backlog, baseline, reference)
    _print_throughputs(tp, bounds, unloaded, policies, args.max_backlog, baseline, reference)
    print(f"\n{len(results)} simulations in {elapsed:.1f} s ({workers} worker(s)); runs stop early once their "
          f"normalized latency is surely above {stop_above * 1e3:.1f} ms/token ({STOP_FACTOR:g}x the largest bound)")
    p_mean = np.mean([t.prompt_len for t in trace])
    o_mean = np.mean([t.output_len for t in trace])
    max_rate, notes, ratio, vs_oracle = (tp["sustained"][k] for k in ("max_rate", "note", "ratio_vs_baseline",
                                                                       "ratio_vs_reference"))
    report = {
        "kind": "simulation", "workload": args.workload, "num_requests": len(trace), "seed": args.seed,
        "mean_prompt_len": float(p_mean), "mean_output_len": float(o_mean),
        "profile": profile.to_json(), "predictions": note, "unloaded_normalized_latency": unloaded,
        "bounds": bounds, "rates": rates, "stop_above": stop_above, "max_backlog": args.max_backlog,
        "results": sorted(results, key=lambda r: (r["policy"], r["rate"])),
        "max_rate": max_rate, "max_rate_note": notes, "ratio_vs_fcfs": ratio, "ratio_vs_oracle": vs_oracle,
        "baseline": baseline, "throughput": tp, "slos": {"ttft": slos[0], "tpot": slos[1], "scale": args.slo_scale,
                                                         "target": GOODPUT_TARGET},
        "systems": {n: vars(S.SYSTEMS[n]) for n in policies if n in S.SYSTEMS and (args.systems or args.ablation)},
        "title": f"{args.workload} on {profile.name} ({profile.kind}), {len(trace)} requests",
        "command": " ".join(["python -m alise.bench"] + sys.argv[1:]),
    }
    _write(report, args)
    return report


def _predictions_note(args, kinds: set, has_text: bool, errors: S.ErrorModel) -> str:
    """What ALISE's predictions are in this simulation, for the output."""
    if "alise" not in kinds:
        return "none (no alise policy)"
    if has_text:
        return (f"real LengthPredictor ({args.embed} embedder, retrieval + MLP) on the prompts, learning online"
                + (f", store warmed with {args.train}" if args.train else ", cold start (no --train)"))
    return ("the workload has no prompt text, so the real predictor cannot run: ALISE's predictions are "
            f"sampled from the real predictor's error distribution ({errors.source})")


def _warn_train_overlap(train: str, trace: list[W.TraceRequest]) -> None:
    train_prompts = {json.loads(l).get("prompt") for l in Path(train).read_text().splitlines() if l.strip()}
    overlap = sum(t.prompt in train_prompts for t in trace)
    if overlap:
        print(f"warning: {overlap} of {len(trace)} measured requests have prompts that are also in --train",
              file=sys.stderr)


def _warm_embedder(args, trace: list[W.TraceRequest]) -> S.CachedEmbed:
    """The predictor's embedder with every prompt of the trace (and of --train) embedded once, up front."""
    embed = S.CachedEmbed(_embedder(args.embed))
    texts = list(dict.fromkeys([t.prompt for t in trace]))
    if args.train:
        texts += [json.loads(l)["prompt"] for l in Path(args.train).read_text().splitlines() if l.strip()]
    print(f"embedding {len(set(texts))} prompts for the predictor ({args.embed})...", file=sys.stderr)
    for i in range(0, len(texts), 256):
        embed(texts[i:i + 256])
    return embed


def _print_sim_setup(args, trace, entries: dict, slos, note: str, unloaded: float, bounds, rates) -> None:
    p_mean = np.mean([t.prompt_len for t in trace])
    o_mean = np.mean([t.output_len for t in trace])
    print(f"workload: {args.workload}, {len(trace)} requests (seed {args.seed}), mean input {p_mean:.1f} / output "
          f"{o_mean:.1f} tokens")
    for name, (pol, prof, swap) in entries.items():
        what = f"system {name}: {S.SYSTEMS[name].description}; " if args.systems or args.ablation else ""
        print(f"{what}profile {prof.name} [{prof.kind}]: {prof.description}")
        print(f"  cost model: {prof.cost}; max_num_seqs {prof.max_num_seqs}, max_num_batched_tokens "
              f"{prof.max_num_batched_tokens}")
        if len({id(e[1]) for e in entries.values()}) == 1:
            break                                  # one profile for every policy
    print(f"goodput SLOs ({args.slo_scale:g}x the 90th percentile alone): TTFT {slos[0] * 1e3:.1f} ms, time per "
          f"output token {slos[1] * 1e3:.2f} ms; >= {GOODPUT_TARGET:.0%} of requests must meet both")
    print(f"predictions: {note}")
    print(f"unloaded normalized latency {unloaded * 1e3:.2f} ms/token; bounds: "
          + ", ".join(f"{b * 1e3:.2f} ms/token ({b / unloaded:.3g}x)" for b in bounds)
          + ("" if args.bounds else " (default: 2x, 5x, 10x unloaded)"))
    print(f"rates: {', '.join(f'{r:g}' for r in rates)} req/s" + ("" if args.rates else " (auto)"))


def _print_throughputs(tp: dict, bounds, unloaded: float, policies: list[str], max_backlog: float, baseline: str,
                       reference: str) -> None:
    """The three throughput definitions' tables (``throughputs``)."""
    for name, title, backlog in (("paper", "(a) the papers' throughput: finite trace, no overload check", math.inf),
                                 ("sustained", "(b) sustained throughput: runs that fall behind count as over",
                                  max_backlog)):
        t = tp[name]
        print_summary(bounds, unloaded, t["max_rate"], t["note"], t["ratio_vs_baseline"], t["ratio_vs_reference"],
                      max_backlog=backlog, title=title, baseline=baseline, reference=reference)
    g = tp["goodput"]
    print(f"\n(c) goodput: highest rate with >= {GOODPUT_TARGET:.0%} of requests within both SLOs")
    for p in policies:
        r, rate = g["ratio_vs_baseline"][p], g["note"][p] + f"{g['max_rate'][p]:.3g} req/s"
        print(f"{p:<12} {rate:>14} {'-' if r is None else f'{r:.2f}x':>8} vs {baseline}")


def _embedder(name: str):
    """The predictor's prompt embedder as the engine builds it: "model" (the default model's mean token
    embedding, the engine's default) or "minilm"."""
    if name == "minilm":
        from alise.sched.encoder import MiniLM
        return MiniLM.load()
    from alise.hub import resolve_model
    from alise.sched.encoder import TokenEmbeddingMean
    return TokenEmbeddingMean.from_folder(resolve_model("smollm2"))


def _write(report: dict, args) -> None:
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        from alise.bench.plot import plot_sweep
        plot_sweep(report, args.plot)
        print(f"wrote {args.plot}")


# -- serve ----------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def capped(engine, cap: int):
    """The engine's length speculation clamped at the workload's output ``cap`` while a benchmark runs.

    The benchmarks fix each request's work by setting ``max_tokens`` to its true length (``ignore_eos``); a
    prediction clamped at ``max_tokens`` would hand the predictor the answer."""
    if engine.predictor is None:         # the policy does not speculate
        yield
        return
    before, engine.prediction_cap = engine.prediction_cap, cap
    try:
        yield
    finally:
        engine.prediction_cap = before


@contextlib.contextmanager
def fresh_predictor(engine):
    """Each benchmark run starts from what the engine's length predictor knew before it (its ``--train``
    history), and forgets what the run taught it: ``serve`` replays the same prompts at every rate, and a
    predictor that kept learning would, from the second rate on, retrieve each prompt's true length from the
    previous run (the simulator's replay starts every run afresh too)."""
    predictor = engine.predictor
    snap = predictor.snapshot() if hasattr(predictor, "snapshot") else None
    try:
        yield
    finally:
        if snap is not None:
            predictor.restore(snap)


def _serve_loop(engine, timed, order, ids, start, policy, progress) -> float:
    """Add each request at its arrival time and step the engine until all finish; returns the backlog at the
    last arrival (share of output tokens still to generate)."""
    from alise import SamplingParams
    nxt, backlog = 0, 0.0
    while nxt < len(order) or engine.has_unfinished():
        now = time.monotonic() - start
        while nxt < len(order) and timed[order[nxt]].arrival <= now:
            i = order[nxt]
            t = timed[i]
            params = SamplingParams(temperature=0.0, max_tokens=t.output_len, ignore_eos=True)
            # text goes in as text (the engine tokenizes it as make-trace did, and the predictor reads it)
            vocab = engine.model.config.vocab_size
            prompt = t.prompt if t.prompt else [3 + (7 * j) % (vocab - 3) for j in range(t.prompt_len)]
            rid = engine.add_request(prompt, params, arrival_time=start + t.arrival,
                                     true_output_len=t.output_len if policy == "oracle" else None)
            ids[i] = rid
            nxt += 1
            if nxt == len(order):       # the last arrival: output tokens still to generate, as in the simulator
                left = sum(timed[j].output_len - len(engine.output(r).token_ids) for j, r in ids.items()
                           if not engine.is_finished(r))
                backlog = left / sum(t.output_len for t in timed)
        if engine.has_unfinished():
            engine.step()
        elif nxt < len(order):
            time.sleep(max(0.0, timed[order[nxt]].arrival - (time.monotonic() - start)))
        if progress is not None:
            progress.update(sum(engine.is_finished(r) for r in ids.values()) - progress.n)
    return backlog


def serve_run(llm, trace: list[W.TraceRequest], rate: float, seed: int, policy: str, progress=None) -> dict:
    """Replay ``trace`` on the real engine with wall-clock Poisson arrivals at ``rate``; per-request metrics.
    Each request generates exactly ``output_len`` tokens; predictions are clamped at the trace's ``max_tokens``."""
    engine = llm.engine
    timed = W.with_arrivals(trace, rate, seed)
    order = sorted(range(len(timed)), key=lambda i: timed[i].arrival)
    ids: dict[int, str] = {}
    start = time.monotonic()
    cap = max(t.max_tokens or t.output_len for t in trace)
    with capped(engine, cap), fresh_predictor(engine):
        backlog = _serve_loop(engine, timed, order, ids, start, policy, progress)
    outs = [engine.pop(ids[i]) for i in range(len(timed))]
    lat = np.array([o.metrics.finish_time - o.metrics.arrival_time for o in outs])
    out = np.array([max(1, len(o.token_ids)) for o in outs])
    ttft = np.array([(o.metrics.first_token_time or o.metrics.finish_time) - o.metrics.arrival_time for o in outs])
    span = max(o.metrics.finish_time for o in outs) - start
    m = {"policy": policy, "rate": rate, "normalized_latency": float(np.mean(lat / out)),
         "mean_latency": float(lat.mean()), "p50_latency": float(np.percentile(lat, 50)),
         "p99_latency": float(np.percentile(lat, 99)), "ttft": float(ttft.mean()),
         "tokens_per_s": float(out.sum() / span), "requests_per_s": len(outs) / span, "num_requests": len(outs),
         "backlog_fraction": backlog,
         "num_preemptions": int(sum(o.metrics.num_preemptions for o in outs)), "output_lens": out.tolist(),
         "swapped_tokens": int(sum(o.metrics.num_swapped_tokens for o in outs)),
         "recomputed_tokens": int(sum(o.metrics.num_recomputed_tokens for o in outs))}
    return m


def cmd_serve(args) -> dict:
    trace = load_workload(args.workload, args.num_requests, args.seed)
    # the work is fixed (output_len, capped); max_tokens is the cap, which is all a predictor may know
    cap = args.max_tokens or max(t.max_tokens or t.output_len for t in trace)
    trace = [W.TraceRequest(t.prompt_len, min(t.output_len, cap), t.prompt, None, cap, t.source) for t in trace]
    rates = _floats(args.rates, "rates") or [0.25, 0.5, 1.0]
    print(f"serve: {args.workload}, {len(trace)} requests, outputs fixed to the trace's lengths "
          f"(ignore_eos, max_tokens = trace length{'' if not args.max_tokens else f', capped at {args.max_tokens}'}); "
          f"mean input {np.mean([t.prompt_len for t in trace]):.0f} / output "
          f"{np.mean([t.output_len for t in trace]):.0f} tokens; rates {rates} req/s")
    if len(trace) < SUSTAINED_MIN_REQUESTS:
        print(f"note: with {len(trace)} requests a rate's 10% backlog allowance is a few requests' work, which one "
              f"burst of late arrivals exceeds; sustained rates and ratios repeat from about "
              f"{SUSTAINED_MIN_REQUESTS} requests per rate on (README, \"Systems, real engine\")")
    if args.url:
        return _serve_over_http(args, trace, rates)
    entries, baseline, reference = _serve_entries(args)
    policies = list(entries)
    engines, results, samples = _serve_measure(args, entries, trace, rates)
    # calibration: the simulator with a cost model fitted to the engine's own measured steps (one fitted profile
    # per KV page format), same trace
    profiles = _fitted_profiles(args, engines, samples)
    profile = profiles[engines[baseline].engine.kv_dtype]
    if args.save_profile:
        for kv_dtype, prof in profiles.items():
            path = args.save_profile if len(profiles) == 1 else f"{Path(args.save_profile).with_suffix('')}-{kv_dtype}.json"
            prof.save(path)
            print(f"wrote {path}")
    for m in results:     # the backlog an engine that keeps up would carry, on this engine's own fitted costs
        prof = profiles[engines[m["policy"]].engine.kv_dtype]
        m["unloaded_backlog_fraction"] = S.unloaded_backlog(W.with_arrivals(trace, m["rate"], args.seed), prof)
        m["sustained"] = sustained(m)
    _simulate_served(args, results, trace, engines, profiles)
    unloaded = S.unloaded_normalized_latency(trace, profile)
    bounds = _floats(args.bounds, "bounds") or [f * unloaded for f in DEFAULT_BOUND_FACTORS]
    for repeat in range(args.repeats):
        rows = [m for m in results if m["repeat"] == repeat]
        if args.repeats > 1:
            print(f"\nrepeat {repeat + 1} of {args.repeats}", end="")
        print_results(rows)
        _print_calibration(rows)
    repeats = summarize_repeats(results, bounds, policies, baseline=baseline, reference=reference)
    if args.repeats > 1:
        print_medians(median_rows(results))
        print_repeats(repeats, bounds, baseline)
    max_rate, notes, ratio, vs_oracle = (repeats["median"][k] for k in ("max_rate", "note", "ratio", "vs_reference"))
    print_summary(bounds, unloaded, max_rate, notes, ratio, vs_oracle, baseline=baseline, reference=reference,
                  title=f"median over {args.repeats} repeats" if args.repeats > 1 else "")
    for m in results:
        m.pop("output_lens", None)
    report = {"kind": "serve", "workload": args.workload, "model": args.model, "num_requests": len(trace),
              "engines": {p: {"policy": llm.engine.config.policy, "kv_dtype": llm.engine.kv_dtype,
                              "num_blocks": llm.engine.stats().kv_blocks_total} for p, llm in engines.items()},
              "seed": args.seed, "profile": profile.to_json(), "unloaded_normalized_latency": unloaded,
              "bounds": bounds, "rates": rates, "results": results, "max_rate": max_rate, "max_rate_note": notes,
              "ratio_vs_fcfs": ratio, "ratio_vs_oracle": vs_oracle, "repeats": repeats["per_repeat"],
              "title": f"serve: {args.workload} on {args.model} (CPU, measured), {len(trace)} requests"
                       + (f", median of {args.repeats} repeats" if args.repeats > 1 else ""),
              "command": " ".join(["python -m alise.bench"] + sys.argv[1:])}
    _write(report, args)
    return report


def _serve_over_http(args, trace: list[W.TraceRequest], rates: list[float]) -> dict:
    """``serve --url``: the same trace, rates, tables, JSON and plot, sent to a running server as streaming
    HTTP clients (``alise.bench.http``). The server's policy names the rows. With no engine here to fit a cost
    model to, the bounds are multiples of the lowest rate's normalized latency (``--bounds`` sets them)."""
    import asyncio

    from alise.bench import http
    results = []
    for rate in rates:
        r = asyncio.run(http.run_rate(args.url, trace, rate, max(t.output_len for t in trace), args.seed))
        if not r.get("completed"):
            raise SystemExit(f"serve --url: no request completed at {rate:g} req/s: {r.get('errors')}")
        results.append({"policy": r.get("server_policy") or "server", "rate": rate,
                        "normalized_latency": r["normalized_latency"], "mean_latency": r["latency_mean"],
                        "p50_latency": r["latency_p50"], "p99_latency": r["latency_p99"], "ttft": r["ttft_mean"],
                        "tokens_per_s": r["output_tokens_per_s"], "requests_per_s": r["requests_per_s"],
                        "num_requests": r["num_requests"], "failed": r["failed"],
                        "backlog_fraction": r["backlog_fraction"], "tpot": r["tpot_mean"], "transport": "http"})
    print_results(results)
    policy = results[0]["policy"]
    lowest = min(results, key=lambda m: m["rate"])["normalized_latency"]
    bounds = _floats(args.bounds, "bounds") or [f * lowest for f in DEFAULT_BOUND_FACTORS]
    max_rate, notes, ratio, vs_ref = summarize(results, bounds, [policy], baseline=policy, reference=policy)
    print_summary(bounds, lowest, max_rate, notes, ratio, vs_ref, baseline=policy, reference=policy,
                  title=f"over HTTP ({args.url}; bounds from the lowest rate's normalized latency)")
    report = {"kind": "serve", "transport": "http", "url": args.url, "workload": args.workload,
              "num_requests": len(trace), "seed": args.seed, "unloaded_normalized_latency": lowest,
              "bounds": bounds, "rates": rates, "results": results, "max_rate": max_rate, "max_rate_note": notes,
              "title": f"serve over HTTP: {args.workload} at {args.url}, {len(trace)} requests",
              "command": " ".join(["python -m alise.bench"] + sys.argv[1:])}
    _write(report, args)
    return report


def _serve_entries(args) -> tuple[dict, str, str]:
    """{name: the engine's options} for the policies or the systems (a system brings its policy and KV pages;
    the engine ties the preemption mode to the policy), the baseline and the reference."""
    if not args.systems:
        return {p: dict(policy=p) for p in _policies(args.policies)}, "fcfs", "oracle"
    names = _systems(args)
    for n in names:
        system = S.SYSTEMS[n]
        if (system.preemption == "swap") != (system.policy != "fcfs"):
            raise SystemExit(f"--systems: {n} ({system.description}) needs a preemption mode the engine ties "
                             "to its policy (fcfs recomputes, alise swaps); the simulator has it")
    entries = {n: dict(policy=S.SYSTEMS[n].policy, kv_dtype=S.SYSTEMS[n].kv_dtype) for n in names}
    return entries, ("vllm" if "vllm" in names else names[0]), "oracle-int8"


def _serve_measure(args, entries: dict, trace: list[W.TraceRequest], rates: list[float]) -> tuple[dict, list, dict]:
    """One engine per entry, ``serve_run`` at every rate, the whole sweep ``--repeats`` times: the engines, one
    metrics row per run (with its ``repeat``), and the measured step samples per KV page format. The entries take
    turns at each rate (rates outer), so a slow spell on a shared machine hits them alike instead of one entry's
    whole sweep."""
    from tqdm.auto import tqdm

    from alise import LLM
    results, samples, engines = [], {}, {}
    for p, options in entries.items():
        kw = dict(options, max_num_seqs=args.max_num_seqs, seed=args.seed)
        if args.kv_cache_blocks:
            kw["kv_cache_blocks"] = args.kv_cache_blocks
        if args.kv_cache_memory_gb:
            kw["kv_cache_memory_gb"] = args.kv_cache_memory_gb
        if args.train and options["policy"] == "alise":
            kw["predictor_history"] = args.train
        llm = LLM(args.model, **kw)
        engines[p] = llm
        print(f"{p}: {llm.engine.kv_dtype} KV pool of {llm.engine.stats().kv_blocks_total} blocks x "
              f"{llm.engine.config.block_size} tokens, policy {llm.engine.config.policy}")
    for repeat in range(args.repeats):
        for rate in rates:
            for p, llm in engines.items():
                desc = f"serve {p} {rate:g} req/s" + (f" (repeat {repeat + 1}/{args.repeats})" if args.repeats > 1 else "")
                with tqdm(total=len(trace), desc=desc, unit="req", disable=args.quiet) as bar:
                    m = serve_run(llm, trace, rate, args.seed, entries[p]["policy"], bar)
                m["policy"], m["repeat"] = p, repeat
                results.append(m)
                samples.setdefault(llm.engine.kv_dtype, []).extend(llm.engine.step_samples)
                llm.engine.step_samples.clear()
    return engines, results, samples


def _fitted_profiles(args, engines: dict, samples: dict) -> dict:
    """A simulator profile per KV page format: the engine's limits, a cost model fitted to its measured steps."""
    profiles = {}
    for llm in engines.values():
        eng, kv_dtype = llm.engine, llm.engine.kv_dtype
        if kv_dtype in profiles:
            continue
        stats, config = eng.stats(), eng.config
        profiles[kv_dtype] = S.fitted_profile(
            samples[kv_dtype], num_blocks=stats.kv_blocks_total, block_size=config.block_size,
            max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=eng.max_model_len, swap_capacity_bytes=stats.swap_bytes_total,
            swap_bytes_per_token=stats.swap_bytes_per_token, swap_bandwidth=5e9,
            name=f"cpu-{args.model}-{kv_dtype}", kv_dtype=kv_dtype)
        print(f"\nfitted cost model ({kv_dtype} pages) from {len(samples[kv_dtype])} measured steps: "
              f"{profiles[kv_dtype].cost} ({profiles[kv_dtype].description})")
    return profiles


def _simulate_served(args, results: list[dict], trace: list[W.TraceRequest], engines: dict, profiles: dict) -> None:
    """Add to each measured run the simulator's normalized latency on its fitted profile (same lengths and
    arrivals)."""
    errors = S.ErrorModel.load(args.errors)
    for m in results:
        served_trace = [W.TraceRequest(t.prompt_len, n, t.prompt, None, t.max_tokens, t.source)
                        for t, n in zip(trace, m["output_lens"])]
        timed = W.with_arrivals(served_trace, m["rate"], args.seed)
        preds = None
        engine = engines[m["policy"]].engine
        if engine.config.policy == "alise":
            if all(t.prompt for t in timed):
                embed = engine.predictor.embed                           # the engine's own embedder
                preds = S.Speculation(S.make_real_predictor(args.train, args.seed, embed=embed))
            else:
                preds = S.SampledSpeculation(errors, args.seed + 1)
        sim = S.simulate(timed, engine.config.policy, profiles[engine.kv_dtype], predictions=preds).metrics()
        m["simulated_normalized_latency"] = sim["normalized_latency"]
        m["simulated_mean_latency"] = sim["mean_latency"]


def _print_calibration(results: list[dict]) -> None:
    print(f"\ncalibration: simulated (fitted cost model) vs measured normalized latency, same trace and arrivals")
    print(f"{'policy':<7} {'rate':>6} {'measured':>10} {'simulated':>10} {'sim/meas':>9}")
    for m in results:
        print(f"{m['policy']:<7} {m['rate']:>6.3g} {m['normalized_latency'] * 1e3:>8.1f}ms "
              f"{m['simulated_normalized_latency'] * 1e3:>8.1f}ms "
              f"{m['simulated_normalized_latency'] / m['normalized_latency']:>9.2f}")


# -- burst ----------------------------------------------------------------------------------------------------

def burst_run(llm, trace: list[W.TraceRequest], max_tokens: int) -> list[dict]:
    """Submit every request of ``trace`` at once, run until all finish; one record per request.

    Each request generates exactly its trace length (capped at ``max_tokens``; ``ignore_eos``), as ``serve``
    does: greedy bf16 outputs change with the batch they run in, so without this the policies would not even
    do the same work. Predictions are clamped at ``max_tokens``, not at the request's length."""
    from alise import SamplingParams
    engine = llm.engine
    oracle = engine.config.policy == "oracle"
    start = time.monotonic()
    ids = []
    with capped(engine, max_tokens):
        for t in trace:
            n = min(t.output_len, max_tokens)
            params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
            ids.append(engine.add_request(t.prompt, params, arrival_time=start,
                                          true_output_len=n if oracle else None))
        while engine.has_unfinished():
            engine.step()
    records = []
    for t, rid in zip(trace, ids):
        out = engine.pop(rid)
        m = out.metrics
        records.append({"prompt_len": len(out.prompt_token_ids), "output_len": len(out.token_ids),
                        "predicted_output_len": m.predicted_output_len_at_arrival,
                        "completion": m.finish_time - m.arrival_time,
                        "ttft": (m.first_token_time or m.finish_time) - m.arrival_time,
                        "num_preemptions": m.num_preemptions, "recomputed_tokens": m.num_recomputed_tokens,
                        "swapped_tokens": m.num_swapped_tokens})
    return records


def cmd_burst(args) -> dict:
    """All requests at t=0 (the queueing case where shortest-first should win most): mean completion time per
    policy on the same requests, ``--repeats`` times on disjoint samples of the workload."""
    from alise import LLM
    policies = _policies(args.policies)
    pool = load_workload(args.workload, None, args.seed)
    if not all(t.prompt for t in pool):
        raise SystemExit("--workload: burst needs a trace with prompt text (e.g. the test part of split-trace)")
    rng = random.Random(args.seed)
    rng.shuffle(pool)
    if len(pool) < args.num_requests:
        raise SystemExit(f"--num-requests {args.num_requests}: the workload has only {len(pool)} requests")
    engines = {}
    for p in policies:
        kw = dict(policy=p, max_num_seqs=args.max_num_seqs, seed=args.seed, dtype=args.dtype)
        if args.train and p == "alise":
            kw["predictor_history"] = args.train
        engines[p] = LLM(args.model, **kw)
    print(f"burst: {args.num_requests} requests at t=0, {args.max_num_seqs} seats, max_tokens {args.max_tokens}, "
          f"dtype {engines[policies[0]].engine.dtype}, CPU {cpu_kind()}; {args.repeats} runs on disjoint samples "
          f"of {args.workload}" + (f", predictor history {args.train}" if args.train else ""))
    runs = []
    for rep in range(args.repeats):
        # disjoint samples while the pool lasts: the predictor learns online, so a request must not come back
        lo = (rep * args.num_requests) % max(1, len(pool) - args.num_requests + 1)
        runs.append(_burst_repeat(rep, engines, pool[lo:lo + args.num_requests], args.max_tokens))
    summary = {p: _burst_summary(p, runs, policies) for p in policies}
    _print_burst_summary(summary)
    report = {"kind": "burst", "workload": args.workload, "model": args.model, "num_requests": args.num_requests,
              "max_num_seqs": args.max_num_seqs, "max_tokens": args.max_tokens, "cpu": cpu_kind(),
              "dtype": engines[policies[0]].engine.dtype, "runs": runs, "summary": summary,
              "command": " ".join(["python -m alise.bench"] + sys.argv[1:])}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")
    return report


def _burst_repeat(rep: int, engines: dict, sample: list[W.TraceRequest], max_tokens: int) -> dict:
    """One burst of ``sample`` on every policy's engine; prints the mean completion times."""
    run = {"repeat": rep, "policies": {}}
    for p, llm in engines.items():
        recs = burst_run(llm, sample, max_tokens)
        run["policies"][p] = {"mean_completion": float(np.mean([r["completion"] for r in recs])), "requests": recs}
    base = run["policies"].get("fcfs", {}).get("mean_completion")
    line = f"run {rep}: " + ", ".join(
        f"{p} {v['mean_completion']:.2f} s" + (f" ({v['mean_completion'] / base:.2f}x fcfs)" if base else "")
        for p, v in run["policies"].items())
    print(line, flush=True)
    return run


def _burst_summary(p: str, runs: list[dict], policies: list[str]) -> dict:
    """Policy ``p`` over the runs: median mean completion, its ratio to fcfs, preemptions, prediction quality."""
    vals = [r["policies"][p]["mean_completion"] for r in runs]
    ratios = [r["policies"][p]["mean_completion"] / r["policies"]["fcfs"]["mean_completion"] for r in runs] \
        if "fcfs" in policies else []
    recs = [x for r in runs for x in r["policies"][p]["requests"]]
    pred = [x["predicted_output_len"] for x in recs]
    tau = None
    if all(v is not None for v in pred):
        from alise.bench.predictor import kendall_tau
        tau = kendall_tau(pred, [x["output_len"] for x in recs])
    return {"median_mean_completion": float(np.median(vals)),
            "median_ratio_vs_fcfs": float(np.median(ratios)) if ratios else None,
            "max_ratio_vs_fcfs": float(max(ratios)) if ratios else None,
            "preemptions": sum(x["num_preemptions"] for x in recs),
            "recomputed_tokens": sum(x["recomputed_tokens"] for x in recs),
            "swapped_tokens": sum(x["swapped_tokens"] for x in recs), "prediction_kendall_tau": tau}


def _print_burst_summary(summary: dict) -> None:
    print(f"\n{'policy':<7} {'mean completion (median of runs)':>33} {'vs fcfs (median, max)':>22} "
          f"{'preempt':>8} {'recomputed':>10} {'swapped':>8} {'tau':>6}")
    for p, v in summary.items():
        ratio = "-" if v["median_ratio_vs_fcfs"] is None else \
            f"{v['median_ratio_vs_fcfs']:.2f}x, {v['max_ratio_vs_fcfs']:.2f}x"
        tau = "-" if v["prediction_kendall_tau"] is None else f"{v['prediction_kendall_tau']:.2f}"
        print(f"{p:<7} {v['median_mean_completion']:>31.2f} s {ratio:>22} {v['preemptions']:>8} "
              f"{v['recomputed_tokens']:>10} {v['swapped_tokens']:>8} {tau:>6}")


def cpu_kind() -> str:
    """The CPU's vector capability as torch sees it, and whether it has native bf16 (speed figures depend on it)."""
    import torch

    from alise.engine import cpu_has_fast_bf16
    return f"{torch.backends.cpu.get_cpu_capability()}{', bf16' if cpu_has_fast_bf16() else ', no bf16'}" + \
        (", AMX" if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)() else "")


# -- make-trace, predictor-errors -------------------------------------------------------------------------

def cmd_make_trace(args) -> None:
    recs = W.make_trace(args.out, max_tokens=args.max_tokens, limit=args.limit, max_num_seqs=args.max_num_seqs)
    print(f"appended {len(recs)} records to {args.out}")


def cmd_split_trace(args) -> None:
    """Split a trace into a predictor history (``--train``) and a measured part that shares no conversation
    with it (a grouped split): lines with the same prompt text or from the same conversation (``source``
    "lmsys:<id>:<turn>" or "mtbench:<id>[:turn2]": later turns repeat the earlier ones) form one group. The
    groups are shuffled (seeded); each goes to the test part if it still fits in ``--test`` distinct prompts,
    else to the history. (The LMSYS demo conversations share first turns, so they form one large group that
    lands in the history: the test part is then MT-Bench questions the predictor has not seen.)"""
    path = W.default_trace_path() if args.trace == "mtbench" else Path(args.trace)
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]
    prompt_lines: dict[str, list[str]] = {}
    groups: dict[int, list[str]] = {}
    for line, rec, group in zip(lines, records, W.conversation_groups(records)):
        if rec["prompt"] not in prompt_lines:
            groups.setdefault(group, []).append(rec["prompt"])
        prompt_lines.setdefault(rec["prompt"], []).append(line)
    if not 0 < args.test < len(prompt_lines):
        raise SystemExit(f"--test must be between 1 and {len(prompt_lines) - 1} (the trace has "
                         f"{len(prompt_lines)} distinct prompts in {len(lines)} lines)")
    order = list(groups.values())
    random.Random(args.seed).shuffle(order)
    history, test = [], []
    for texts in order:
        (test if len(test) + len(texts) <= args.test else history).extend(texts)
    for out, part in ((args.history_out, history), (args.test_out, test)):
        chosen = [line for t in part for line in (prompt_lines[t] if args.keep_repeats else prompt_lines[t][:1])]
        Path(out).write_text("\n".join(chosen) + "\n", encoding="utf-8")
        print(f"wrote {len(chosen)} requests ({len(part)} distinct prompts) to {out}")


def cmd_predictor_errors(args) -> dict:
    if args.trace:
        path = Path(args.trace)
        trace = [t for t in W.load_trace(path) if t.prompt]
        recs = [(t.prompt, t.output_len) for t in trace]
        groups = W.conversation_groups([{"prompt": t.prompt, "source": t.source} for t in trace])
        source = f"{path.name}: our model's output lengths, split by conversation"
    else:
        from alise.bench.predictor import build_proxy
        tmp = Path(args.proxy_out)
        recs, groups = [(r["prompt"], r["output_len"]) for r in build_proxy(tmp)], None
        source = ("proxy set: LMSYS dummy conversations + MT-Bench reference answers (reference answers' token "
                  "counts), see alise/bench/predictor.py")
    m = S.measure_errors(recs, max_tokens=args.max_tokens, history_frac=args.history_frac, seed=args.seed,
                         embed=_embedder(args.embed), source=f"{source}, {args.embed} embedder",
                         dedup=not args.keep_duplicates, groups=groups)
    m["source"] = (f"{source}; {'' if args.keep_duplicates else 'one record per distinct prompt, '}"
                   f"{m['num_history']} warm the store, {m['num_test']} arrive online (seed {args.seed})")
    Path(args.out).write_text(json.dumps(m, indent=1) + "\n")
    print(f"median |log(pred/true)| {m['arrival_median_abs_log_ratio']:.3f}, Kendall tau "
          f"{m['arrival_kendall_tau']:.3f}, MAE {m['arrival_mae_tokens']:.1f} tokens over {m['num_test']} requests; "
          f"{m['num_remaining']} re-estimates; wrote {args.out}")
    return m


# -- CLI ------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m alise.bench", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    _add_sim_parser(sub)
    _add_serve_parser(sub)
    _add_burst_parser(sub)
    _add_trace_parsers(sub)
    return ap


def _common_args(p: argparse.ArgumentParser) -> None:
    """The options sim and serve share."""
    p.add_argument("--workload", default="sharegpt", help="sharegpt | alpaca | mtbench | a trace file (JSONL)")
    p.add_argument("--policies", default="fcfs,alise,oracle")
    p.add_argument("--rates", help="comma-separated request rates (req/s); default: automatic sweep")
    p.add_argument("--bounds", help="normalized-latency bounds (s/token); default 2x, 5x, 10x unloaded")
    p.add_argument("--num-requests", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", help="JSONL {prompt, output_len}: warms the real predictor's store")
    p.add_argument("--errors", help=f"predictor error distribution JSON (default {S.ERRORS_PATH.name})")
    p.add_argument("--json", help="write the report here")
    p.add_argument("--plot", help="write the normalized-latency plot (PNG) here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_sim_parser(sub) -> None:
    s = sub.add_parser("sim", help="discrete-event simulation on a GPU profile (or a fitted one)")
    _common_args(s)
    s.add_argument("--profile", help=f"<accelerator>-<model> roofline model (default {S.DEFAULT_PROFILE}; "
                   f"accelerators {sorted(S.ACCELERATORS)}, models {sorted(S.MODELS)}) or a profile JSON; with --systems, "
                   "fitted profiles one per KV dtype, comma-separated (serve --save-profile writes them)")
    s.add_argument("--max-num-seqs", type=int, default=None, help="seats in a batch (default 256, vLLM's; a "
                   "profile file keeps its own unless given)")
    s.add_argument("--swap-gb", type=float, default=16.0, help="host swap space for preempted KV (GiB)")
    s.add_argument("--max-backlog", type=float, default=MAX_BACKLOG,
                   help="a run whose output tokens left at the last arrival exceed this fraction (beyond what an "
                        "engine that keeps up would have left: simulator.unloaded_backlog) did not keep up "
                        "and counts as over every bound (default %(default)s). Past capacity a finite trace still "
                        "shows a low mean normalized latency under shortest-first (the long requests wait until "
                        "arrivals stop); the paper's (and vLLM's) method has no such check: 1.01 reproduces it (runs stopped early, far above the "
                        "largest bound, still count as over it)")
    s.add_argument("--systems", help=f"compare whole systems instead of policies: {', '.join(S.SYSTEMS)} "
                   "(policy + KV page format + preemption mode; e.g. vllm,alise)")
    s.add_argument("--ablation", action="store_true", help=f"the systems {', '.join(S.ABLATION)}: one idea at a time")
    s.add_argument("--kv-dtype", default="bf16", choices=["bf16", "int8", "int4"],
                   help="the KV pool's page format for --policies (a system brings its own)")
    s.add_argument("--slo-scale", type=float, default=SLO_SCALE,
                   help="goodput SLOs: this x the 90th percentile of the unloaded TTFT and time per token")
    s.add_argument("--embed", choices=["model", "minilm"], default="model",
                   help="the real predictor's prompt embedder, for workloads with text (default: the engine's)")
    s.add_argument("--workers", type=int, default=0, help="processes (default: one per policy, up to the CPUs)")
    s.set_defaults(func=cmd_sim, num_requests=1000)


def _add_serve_parser(sub) -> None:
    v = sub.add_parser("serve", help="the same measurement on the real engine (wall clock) + calibration")
    _common_args(v)
    v.add_argument("--model", default="smollm2")
    v.add_argument("--max-num-seqs", type=int, default=16)
    v.add_argument("--kv-cache-blocks", type=int, default=None)
    v.add_argument("--kv-cache-memory-gb", type=float, default=None,
                   help="size the KV pool in memory instead of blocks (systems: int8 pages then hold ~2x the tokens)")
    v.add_argument("--systems", help="compare systems instead of policies: vllm, alise, vllm+int8, alise-int4 "
                   "(policy + KV pages; the engine's fcfs recomputes and alise swaps)")
    v.add_argument("--max-tokens", type=int, default=64, help="cap the trace's output lengths (CPU is slow)")
    v.add_argument("--repeats", type=_positive_int, default=1,
                   help="run the whole sweep this many times in one process and report the median of each point "
                        "and of each repeat's sustained rate (a shared machine's speed drifts between runs)")
    v.add_argument("--save-profile", help="write the fitted profile JSON (usable as sim --profile)")
    v.add_argument("--url", help="measure a running OpenAI-compatible server (python -m alise.serve) over HTTP "
                   "instead of engines in this process: streaming clients, Poisson arrivals; engine options ignored")
    v.set_defaults(func=cmd_serve, num_requests=24, workload="mtbench")


def _add_burst_parser(sub) -> None:
    b = sub.add_parser("burst", help="every request at t=0 on the real engine: mean completion per policy")
    b.add_argument("--workload", required=True, help="a trace file with prompts (e.g. split-trace's test part)")
    b.add_argument("--policies", default="fcfs,alise")
    b.add_argument("--train", help="JSONL {prompt, output_len}: warms the alise predictor's store")
    b.add_argument("--model", default="smollm2")
    b.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    b.add_argument("--num-requests", type=int, default=16)
    b.add_argument("--max-num-seqs", type=int, default=4)
    b.add_argument("--max-tokens", type=int, default=256)
    b.add_argument("--repeats", type=int, default=3, help="runs, each on its own sample of the workload")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--json", help="write the report (every request's record) here")
    b.set_defaults(func=cmd_burst)


def _add_trace_parsers(sub) -> None:
    """make-trace, split-trace and predictor-errors."""
    t = sub.add_parser("make-trace", help="run the default model on the real prompts; write their lengths")
    t.add_argument("--out", required=True)
    t.add_argument("--max-tokens", type=int, default=W.TRACE_MAX_TOKENS)
    t.add_argument("--limit", type=int, default=None, help="stop after this many distinct prompts")
    t.add_argument("--max-num-seqs", type=int, default=64)
    t.set_defaults(func=cmd_make_trace)

    x = sub.add_parser("split-trace", help="split a trace into a predictor history and a measured part")
    x.add_argument("--trace", default="mtbench", help="mtbench (the default real-text trace) or a JSONL file")
    x.add_argument("--test", type=int, required=True, help="distinct prompts (at most) held out for measuring")
    x.add_argument("--history-out", required=True)
    x.add_argument("--test-out", required=True)
    x.add_argument("--seed", type=int, default=0)
    x.add_argument("--keep-repeats", action="store_true",
                   help="keep every line of a repeated prompt (default: one line per distinct prompt)")
    x.set_defaults(func=cmd_split_trace)

    e = sub.add_parser("predictor-errors", help="measure the real predictor's error (for length-only sims)")
    e.add_argument("--trace", help="a trace with prompts (default: the LMSYS + MT-Bench proxy set)")
    e.add_argument("--proxy-out", default="/tmp/alise_proxy.jsonl")
    e.add_argument("--out", default=str(S.ERRORS_PATH))
    e.add_argument("--max-tokens", type=int, default=None)
    e.add_argument("--history-frac", type=float, default=0.5)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--embed", default="model", choices=["model", "minilm"],
                   help="the predictor's prompt embedder (default: the engine's)")
    e.add_argument("--keep-duplicates", action="store_true",
                   help="keep repeated prompts (retrieval then finds exact repeats; optimistic for unique-prompt sets)")
    e.set_defaults(func=cmd_predictor_errors)


def main(argv: list[str] | None = None):
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    main()
