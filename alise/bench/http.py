"""The serving benchmark over real HTTP: ``python -m alise.bench.http --url http://127.0.0.1:8000 --rates 1,2,4``.

Replays a workload against a running OpenAI-compatible server (``python -m alise.serve``; any server with
``/v1/completions`` streaming works) as concurrent streaming clients with Poisson arrivals, the way vLLM's
``benchmark_serving`` measures: each request is sent at its arrival time, TTFT is the time to its first SSE chunk
with text, time per output token (TPOT) is the rest of its latency over its remaining tokens, normalized latency
is latency over output tokens (the ALISE / vLLM papers' metric), and with ``--slo-ttft`` / ``--slo-tpot`` goodput
counts the requests per second that met both. Every request asks for exactly its trace output length (capped by
``--max-tokens``) with ``ignore_eos``, so runs are comparable with the in-process ``python -m alise.bench serve``.

Workloads: ``sharegpt`` / ``alpaca`` (length-only: the prompt is that many token ids), ``mtbench`` or a trace
file (JSONL, ``alise/bench/workloads.py``): prompts with text are sent as text. ``--disconnect-fraction`` makes
that share of clients hang up after a few chunks (the server must abort them and free their KV; the report shows
the server's KV blocks in use before and after).
"""
import argparse
import asyncio
import json
import math
import sys
import time

import numpy as np

from alise.bench import workloads as W

SYNTHETIC_TOKEN_RANGE = 300     # synthetic prompts use token ids 3..302: valid for any vocabulary of the size


def _prompt(t: W.TraceRequest):
    if t.prompt:
        return t.prompt
    return [3 + (7 * j) % SYNTHETIC_TOKEN_RANGE for j in range(t.prompt_len)]


async def _one(client, url: str, model: str | None, t: W.TraceRequest, max_tokens: int, send_at: float,
               hang_up_after: int | None) -> dict:
    """One streaming request sent at ``send_at`` (perf_counter seconds); its timings."""
    await asyncio.sleep(max(0.0, send_at - time.perf_counter()))
    body = {"prompt": _prompt(t), "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    if model:
        body["model"] = model
    start = time.perf_counter()
    rec = {"sent": start - send_at, "send_at": send_at, "ttft": None, "latency": None, "output_tokens": 0,
           "status": "ok", "max_tokens": max_tokens, "chunks": 0}
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                rec["status"] = f"http {r.status_code}"
                rec["error"] = (await r.aread()).decode(errors="replace")[:300]
                return rec
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    rec["output_tokens"] = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    rec["chunks"] += 1
                    rec["last_chunk_at"] = time.perf_counter()
                    if rec["ttft"] is None:
                        rec["ttft"] = time.perf_counter() - start
                        rec["first_chunk_at"] = rec["last_chunk_at"]
                    if hang_up_after is not None and rec["chunks"] >= hang_up_after:
                        rec["status"] = "disconnected"
                        return rec           # leaving the block closes the connection
    except Exception as e:   # noqa: BLE001 - a failed request is a result, not a crash
        rec["status"], rec["error"] = "error", f"{type(e).__name__}: {e}"
        return rec
    rec["latency"] = time.perf_counter() - start
    if rec["ttft"] is None:
        rec["ttft"] = rec["latency"]
    if not rec["output_tokens"]:
        rec["status"] = "no usage"
    return rec


async def _metrics(client, url: str) -> dict | None:
    try:
        r = await client.get(url + "/metrics", params={"format": "json"})
        return r.json() if r.status_code == 200 else None
    except Exception:   # noqa: BLE001 - another server may have no such endpoint
        return None


async def run_rate(url: str, trace: list[W.TraceRequest], rate: float, max_tokens: int, seed: int = 0,
                   model: str | None = None, disconnect_fraction: float = 0.0,
                   slo_ttft: float | None = None, slo_tpot: float | None = None) -> dict:
    """Send ``trace`` at Poisson ``rate`` (req/s; ``inf``: all at once) and summarize."""
    import httpx
    url = url.rstrip("/")
    n = len(trace)
    arrivals = np.zeros(n) if math.isinf(rate) else W.poisson_arrivals(n, rate, seed)
    rng = np.random.default_rng(seed + 1)
    hang = [int(rng.integers(1, 6)) if rng.random() < disconnect_fraction else None for _ in range(n)]
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as client:
        if model is None:
            models = (await client.get(url + "/v1/models")).json()["data"]
            model = models[0]["id"]
        before = await _metrics(client, url)
        t0 = time.perf_counter() + 0.05
        recs = await asyncio.gather(*[
            _one(client, url, model, t, min(max_tokens, t.max_tokens or t.output_len, t.output_len) or 1,
                 t0 + float(a), h) for t, a, h in zip(trace, arrivals, hang)])
        span = time.perf_counter() - t0
        await asyncio.sleep(0.2)      # let the server notice the last disconnects
        after = await _metrics(client, url)
    return summarize(recs, rate, span, before, after, slo_ttft, slo_tpot)


def summarize(recs: list[dict], rate: float, span: float, before: dict | None = None, after: dict | None = None,
              slo_ttft: float | None = None, slo_tpot: float | None = None) -> dict:
    ok = [r for r in recs if r["status"] == "ok"]
    out = {"rate": rate, "num_requests": len(recs), "completed": len(ok),
           "disconnected": sum(r["status"] == "disconnected" for r in recs),
           "failed": sum(r["status"] not in ("ok", "disconnected") for r in recs),
           "duration_s": span, "errors": sorted({r.get("error", r["status"]) for r in recs
                                                if r["status"] not in ("ok", "disconnected")})[:5]}
    if ok:
        lat = np.array([r["latency"] for r in ok])
        ttft = np.array([r["ttft"] for r in ok])
        toks = np.array([r["output_tokens"] for r in ok])
        tpot = np.array([(r["latency"] - r["ttft"]) / (r["output_tokens"] - 1) for r in ok if r["output_tokens"] > 1])
        out |= {"requests_per_s": len(ok) / span, "output_tokens_per_s": float(toks.sum() / span),
                "ttft_mean": float(ttft.mean()), "ttft_p50": float(np.percentile(ttft, 50)),
                "ttft_p99": float(np.percentile(ttft, 99)),
                "tpot_mean": float(tpot.mean()) if len(tpot) else None,
                "tpot_p99": float(np.percentile(tpot, 99)) if len(tpot) else None,
                "normalized_latency": float(np.mean(lat / np.maximum(toks, 1))),
                "latency_mean": float(lat.mean()), "latency_p50": float(np.percentile(lat, 50)),
                "latency_p99": float(np.percentile(lat, 99)), "send_delay_max": max(r["sent"] for r in recs)}
        out["backlog_fraction"] = backlog_fraction(recs)
        if slo_ttft is not None or slo_tpot is not None:
            good = [r for r in ok if (slo_ttft is None or r["ttft"] <= slo_ttft) and
                    (slo_tpot is None or r["output_tokens"] <= 1 or
                     (r["latency"] - r["ttft"]) / (r["output_tokens"] - 1) <= slo_tpot)]
            out["goodput"] = len(good) / span
    if before is not None and after is not None:
        out["kv_blocks_used_before"] = before.get("kv_blocks_used")
        out["kv_blocks_used_after"] = after.get("kv_blocks_used")
        out["requests_in_flight_after"] = after.get("requests_in_flight")
        out["server_policy"] = after.get("scheduler_policy")
    out["requests"] = recs
    return out


def backlog_fraction(recs: list[dict]) -> float:
    """Share of the completed requests' output tokens still to come when the last request was sent (the
    in-process ``serve``'s overload measure), from the client's view: a request's tokens arrive evenly between
    its first and last text chunk."""
    done = [r for r in recs if r["status"] == "ok" and r.get("first_chunk_at") is not None]
    if not done:
        return 0.0
    last_sent = max(r["send_at"] + r["sent"] for r in recs)
    total = left = 0.0
    for r in done:
        tokens, first, last = r["output_tokens"], r["first_chunk_at"], r["last_chunk_at"]
        total += tokens
        if last_sent < first:
            left += tokens
        elif last_sent < last:
            left += tokens * (last - last_sent) / (last - first)
    return left / total if total else 0.0


COLUMNS = [("rate", "rate", "{:g}"), ("done", "completed", "{}"), ("fail", "failed", "{}"),
           ("hung up", "disconnected", "{}"), ("req/s", "requests_per_s", "{:.2f}"),
           ("out tok/s", "output_tokens_per_s", "{:.1f}"), ("TTFT ms", "ttft_mean", "ms"),
           ("p99 TTFT", "ttft_p99", "ms"), ("TPOT ms", "tpot_mean", "ms"),
           ("norm lat ms/tok", "normalized_latency", "ms"), ("p99 lat s", "latency_p99", "{:.2f}"),
           ("goodput", "goodput", "{:.2f}"), ("KV after", "kv_blocks_used_after", "{}")]


def print_table(results: list[dict], file=sys.stdout) -> None:
    cols = [c for c in COLUMNS if any(r.get(c[1]) is not None for r in results)]
    rows = [[("-" if r.get(key) is None else f"{r[key] * 1000:.1f}" if fmt == "ms" else fmt.format(r[key]))
             for _, key, fmt in cols] for r in results]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, (h, _, _) in enumerate(cols)]
    print("  ".join(h.rjust(w) for (h, _, _), w in zip(cols, widths)), file=file)
    for row in rows:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)), file=file)
    for r in results:
        for e in r.get("errors", []):
            print(f"rate {r['rate']:g}: {e}", file=file)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m alise.bench.http", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL (without /v1)")
    ap.add_argument("--model", default=None, help="model name to send (default: the server's first model)")
    ap.add_argument("--workload", default="sharegpt", help="sharegpt | alpaca | mtbench | a trace file (JSONL)")
    ap.add_argument("--num-requests", type=int, default=100)
    ap.add_argument("--rates", default="1,2,4", help="comma-separated request rates (req/s); 'inf': all at once")
    ap.add_argument("--max-tokens", type=int, default=64, help="cap on each request's output length")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--disconnect-fraction", type=float, default=0.0,
                    help="share of clients that hang up after 1-5 chunks")
    ap.add_argument("--slo-ttft", type=float, default=None, help="goodput: TTFT bound (s)")
    ap.add_argument("--slo-tpot", type=float, default=None, help="goodput: time-per-output-token bound (s)")
    ap.add_argument("--json", help="write the report (every request's record) here")
    return ap


def main(argv: list[str] | None = None) -> list[dict]:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        rates = [float(x) for x in args.rates.split(",") if x.strip()]
        if not rates or any(not r > 0 for r in rates):
            raise ValueError
    except ValueError:
        ap.error(f"--rates must be comma-separated positive numbers or inf, got {args.rates!r}")
    if not 0 <= args.disconnect_fraction <= 1:
        ap.error("--disconnect-fraction must be in [0, 1]")
    if args.max_tokens < 1 or args.num_requests < 1:
        ap.error("--max-tokens and --num-requests must be >= 1")
    try:
        trace = W.workload(args.workload, args.num_requests, args.seed)
    except ValueError as e:
        ap.error(str(e))
    trace = W.sample_requests(trace, args.num_requests, args.seed)
    results = []
    for rate in rates:
        results.append(asyncio.run(run_rate(args.url, trace, rate, args.max_tokens, args.seed, args.model,
                                            args.disconnect_fraction, args.slo_ttft, args.slo_tpot)))
    print(f"{args.url}: {len(trace)} requests of {args.workload}, outputs capped at {args.max_tokens} tokens, "
          f"policy {results[-1].get('server_policy', '?')}")
    print_table(results)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
