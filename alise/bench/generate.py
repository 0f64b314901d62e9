"""Generation speed benchmark: single-stream latency, batched decode throughput, scheduler overhead.

    python -m alise.bench.generate                       # all three sections, bf16 and fp32
    python -m alise.bench.generate --quick               # fewer runs, shorter outputs, smaller batches
    python -m alise.bench.generate --dtypes bfloat16 --sections batch --concurrency 1,8,32,64
    python -m alise.bench.generate --threads 1             # on a CPU shared with other jobs
    python -m alise.bench.generate --compile               # decode steps compiled (LLM(compile=True))

Sections (printed as tables; nothing is asserted):

1. ``single``: one request at a time on the default model. Prefill tokens/s of a 512-token prompt
   (arrival -> first token) and decode tokens/s (first token -> last token, ``--decode-tokens`` tokens),
   for each ``--dtypes``; median of ``--runs`` runs after a warm-up run.
2. ``batch``: ``N`` concurrent requests (prompts of ~32 tokens, ``--batch-tokens`` output tokens each with
   ``ignore_eos``) for each ``--concurrency``; aggregate decode throughput (output tokens of decode-only steps
   per second of those steps) and the mean time of one decode step split into scheduler
   (``engine.scheduler.schedule``), attention (calls of ``alise.kernels.paged_attention``), the rest of the
   model step (``runner.execute`` minus attention: matmuls, norms, KV writes, sampling) and engine bookkeeping.
3. ``sched``: the scheduler alone (no model): a ``Scheduler`` over a ``BlockAllocator`` with 256 and 4096
   queued fake requests, driven by a fake executor; median and p90 time of ``schedule()`` per step, for the
   fcfs and alise policies.
4. ``compile`` (not in the default sections): eager and ``compile=True`` engines in one process, runs
   alternating, for each ``--concurrency``: median decode tokens/s (as in ``batch``) of each and their ratio.

Prompts are real text (CPython's ``pydoc_data/topics.py``). Timings on a shared CPU are noisy: the load
average is printed with the results.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import time
from contextlib import contextmanager

import torch

from alise import LLM, SamplingParams
from alise.config import add_renamed_flag


def _topic_text() -> str:
    import pydoc_data.topics
    return "\n".join(pydoc_data.topics.topics.values())


def _load() -> str:
    try:
        return "load average %.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return "load average n/a"


def _table(title: str, header: list[str], rows: list[list]) -> None:
    cells = [header] + [[c if isinstance(c, str) else f"{c:.4g}" if isinstance(c, float) else str(c) for c in r]
                        for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    line = "  ".join("-" * w for w in widths)
    print(line)
    for i, r in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
        if i == 0:
            print(line)
    print(line)


# -- 1. single stream -------------------------------------------------------------------------------------


def bench_single(llm: LLM, prompt_ids: list[int], decode_tokens: int, runs: int) -> dict:
    """Median prefill tok/s (``len(prompt_ids)`` tokens) and decode tok/s of one request."""
    prefill_params = SamplingParams(temperature=0, max_tokens=1)
    decode_prompt = prompt_ids[:32]
    decode_params = SamplingParams(temperature=0, max_tokens=decode_tokens, ignore_eos=True)
    llm.generate([prompt_ids], prefill_params)                    # warm-up
    llm.generate([decode_prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    prefill, decode = [], []
    for _ in range(runs):
        m = llm.generate([prompt_ids], prefill_params)[0].metrics
        prefill.append(len(prompt_ids) / (m.first_token_time - m.arrival_time))
        out = llm.generate([decode_prompt], decode_params)[0]
        m = out.metrics
        decode.append((len(out.token_ids) - 1) / (m.finish_time - m.first_token_time))
    return {"prefill": statistics.median(prefill), "decode": statistics.median(decode),
            "decode_ms": 1e3 / statistics.median(decode), "prefill_all": prefill, "decode_all": decode}


# -- 2. batched decode --------------------------------------------------------------------------------------


class StepTimer:
    """Wraps the scheduler, the runner and ``alise.kernels.paged_attention`` to time each engine step.

    With ``compile=True`` attention runs inside the compiled graph and is not timed apart (NaN).
    """

    def __init__(self, engine):
        import alise.kernels as kernels
        self.engine, self.kernels = engine, kernels
        self.attn = 0.0
        self._orig_attention = kernels.paged_attention
        self._orig_schedule = engine.scheduler.schedule
        self._orig_execute = engine.runner.execute

    @contextmanager
    def installed(self):
        def attention(**kwargs):
            t = time.perf_counter()
            try:
                return self._orig_attention(**kwargs)
            finally:
                self.attn += time.perf_counter() - t

        def schedule():
            t = time.perf_counter()
            batch = self._orig_schedule()
            self.sched = time.perf_counter() - t
            self.last_batch = batch
            return batch

        def execute(batch):
            t = time.perf_counter()
            result = self._orig_execute(batch)
            self.model = time.perf_counter() - t
            self.compiled_now = result.compiled_now
            return result

        if not self.engine.config.compile:    # a wrapper would be traced into (and break) the compiled graph
            self.kernels.paged_attention = attention
        self.engine.scheduler.schedule = schedule
        self.engine.runner.execute = execute
        try:
            yield self
        finally:
            self.kernels.paged_attention = self._orig_attention
            del self.engine.scheduler.schedule
            del self.engine.runner.execute

    def step(self) -> dict:
        self.attn = self.sched = self.model = 0.0
        self.last_batch, self.compiled_now = None, False
        t = time.perf_counter()
        self.engine.step()
        total = time.perf_counter() - t
        batch = self.last_batch
        attn = float("nan") if self.engine.config.compile else self.attn
        return {"total": total, "sched": self.sched, "model": self.model, "attn": attn,
                "tokens": len(batch.requests) if batch is not None else 0,
                "decode_only": batch is not None and bool(batch.requests)
                and all(n == 1 for n in batch.num_new_tokens), "compiled_now": self.compiled_now}


def bench_batch(llm: LLM, prompts: list[list[int]], output_tokens: int) -> dict:
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=output_tokens, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    steps = []
    start = time.perf_counter()
    with StepTimer(engine).installed() as timer:
        while engine.has_unfinished():
            steps.append(timer.step())
    wall = time.perf_counter() - start
    outs = [engine.pop(i) for i in ids]
    assert all(len(o.token_ids) == output_tokens for o in outs)
    decode = [s for s in steps if s["decode_only"] and not s["compiled_now"]]   # (compiling: a minute)
    dt = sum(s["total"] for s in decode)
    mean = lambda k: 1e3 * sum(s[k] for s in decode) / max(len(decode), 1)  # noqa: E731
    return {"n": len(prompts), "steps": len(steps), "decode_steps": len(decode),
            "decode_tok_s": sum(s["tokens"] for s in decode) / dt if dt else float("nan"),
            "e2e_tok_s": len(prompts) * output_tokens / wall, "wall": wall,
            "step_ms": mean("total"), "sched_ms": mean("sched"), "attn_ms": mean("attn"),
            "model_ms": mean("model") - (0 if math.isnan(mean("attn")) else mean("attn")),
            "other_ms": mean("total") - mean("sched") - mean("model"),
            "preemptions": sum(o.metrics.num_preemptions for o in outs)}


def bench_compile_ratio(model: str, dtype: str, policy: str, concurrency: list[int], prompts_of,
                        output_tokens: int, runs: int) -> list[list]:
    """Eager and compiled engines side by side: for each batch size, ``runs`` alternating runs of each;
    median decode tokens/s (decode-only steps, as in ``bench_batch``) of each and their ratio."""
    engines = {compiled: LLM(model, dtype=dtype, policy=policy, max_num_seqs=max(concurrency),
                             compile=compiled) for compiled in (False, True)}
    for llm in engines.values():
        warm_up(llm, [prompts_of(n) for n in concurrency])
    rows = []
    for n in concurrency:
        prompts, speeds = prompts_of(n), {False: [], True: []}
        for _ in range(runs):
            for compiled, llm in engines.items():
                speeds[compiled].append(bench_batch(llm, prompts, output_tokens)["decode_tok_s"])
        eager, compiled = statistics.median(speeds[False]), statistics.median(speeds[True])
        rows.append([n, eager, compiled, compiled / eager])
    return rows


def warm_up(llm: LLM, batches: list[list[list[int]]]) -> None:
    """Run each batch of prompts long enough that all of it decodes together (prefill takes a few steps at
    64 prompts): a compiled engine then has every decode graph these batch sizes need."""
    for prompts in batches:
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)


def batch_prompts(words: list[int], n: int, rng: random.Random) -> list[list[int]]:
    """``n`` prompts of 28-36 tokens from random places in ``words``."""
    starts = [rng.randrange(0, len(words) - 40) for _ in range(n)]
    return [words[s:s + rng.randint(28, 36)] for s in starts]


# -- 3. scheduler alone -----------------------------------------------------------------------------------


def bench_scheduler(policy_name: str, num_requests: int, steps: int, seed: int = 0,
                    max_num_seqs: int = 64, num_blocks: int = 2048, block_size: int = 16) -> dict:
    """Time ``schedule()`` with ``num_requests`` queued fake requests, executed by a fake clock."""
    from alise.sched.blocks import BlockAllocator, SwapSpace
    from alise.sched.cost import CostModel
    from alise.sched.policy import make_policy
    from alise.sched.request import Request
    from alise.sched.scheduler import Scheduler

    rng = random.Random(seed)
    scheduler = Scheduler(policy=make_policy(policy_name, CostModel()),
                          allocator=BlockAllocator(num_blocks, block_size), max_num_seqs=max_num_seqs,
                          max_num_batched_tokens=512, swap_space=SwapSpace(1 << 30, 1024))
    for i in range(num_requests):
        out_len = rng.randint(8, 512)
        r = Request(str(i), [0] * rng.randint(16, 256), SamplingParams(max_tokens=out_len, ignore_eos=True),
                    arrival_time=i * 1e-3)
        r.true_output_len = out_len
        r.predicted_output_len = max(1, int(out_len * rng.uniform(0.5, 1.5)))
        scheduler.add(r)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        batch = scheduler.schedule()
        times.append(time.perf_counter() - t)
        # the fake executor: a token for every request whose step covers its last pending token
        sampled = {id(r): 0 for r, n in zip(batch.requests, batch.num_new_tokens)
                   if r.num_computed_tokens + n == r.num_tokens}
        scheduler.postprocess(batch, sampled, 0.0)       # finishes each at max_tokens (its true length)
        for r, _ in batch.swap_out:
            r.swapped_kv = object()
    times.sort()
    return {"median_ms": 1e3 * statistics.median(times), "p90_ms": 1e3 * times[int(0.9 * (len(times) - 1))],
            "queued": num_requests}


# -- main ---------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m alise.bench.generate", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--model", default="smollm2", help="model name or HF-style folder (default: smollm2)")
    ap.add_argument("--dtypes", default="bfloat16,float32",
                    help="comma-separated model dtypes for the single-stream section (default: bfloat16,float32)")
    ap.add_argument("--batch-dtype", default="bfloat16", help="model dtype of the batch section")
    ap.add_argument("--sections", default="single,batch,sched",
                    help="which of single,batch,sched,compile to run (compile: eager vs compiled decode, side by "
                         "side in one process)")
    ap.add_argument("--concurrency", default=None, help="batch sizes of the batch section (default 1,8,32,64)")
    ap.add_argument("--runs", type=int, default=None, help="runs per single-stream figure (median; default 5)")
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=None, help="single-stream output tokens (default 64)")
    ap.add_argument("--batch-tokens", type=int, default=None, help="output tokens per batched request (default 64)")
    ap.add_argument("--sched-queued", default="256,4096", help="queue sizes of the scheduler section")
    ap.add_argument("--sched-steps", type=int, default=None, help="schedule() calls timed (default 50)")
    ap.add_argument("--policy", default="fcfs", help="engine policy for the model sections (default fcfs)")
    add_renamed_flag(ap, "--scheduler", "--policy")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's choice). On a CPU shared with other jobs, "
                         "1 is often much faster than oversubscribed OpenMP threads")
    ap.add_argument("--compile", action="store_true",
                    help="compile decode steps (LLM(compile=True)); each model's first decode step compiles, "
                         "about a minute, before the timed runs")
    ap.add_argument("--quick", action="store_true", help="fewer runs, shorter outputs, batches of 1 and 8 only")
    return ap


def main(argv: list[str] | None = None) -> None:
    ap = build_parser()
    args = ap.parse_args(argv)
    # the defaults that --quick shrinks
    args.runs = args.runs or (2 if args.quick else 5)
    args.decode_tokens = args.decode_tokens or (24 if args.quick else 64)
    args.batch_tokens = args.batch_tokens or (16 if args.quick else 64)
    args.concurrency = [int(x) for x in (args.concurrency or ("1,8" if args.quick else "1,8,32,64")).split(",")]
    args.sched_steps = args.sched_steps or (10 if args.quick else 50)
    if args.threads is not None:
        if args.threads < 1:
            ap.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    sections = set(args.sections.split(","))
    unknown = sections - {"single", "batch", "sched", "compile"}
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}")

    from alise.bench.__main__ import cpu_kind
    print(f"alise generation benchmark: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU {cpu_kind()}, cuda={torch.cuda.is_available()}, decode steps "
          f"{'compiled' if args.compile else 'eager'}, {_load()}")
    text = _topic_text()
    if "single" in sections:
        section_single(args, text)
    if "batch" in sections:
        section_batch(args, text)
    if "compile" in sections:
        section_compile(args, text)
    if "sched" in sections:
        section_sched(args)


def section_single(args: argparse.Namespace, text: str) -> None:
    rows = []
    for dtype in args.dtypes.split(","):
        llm = LLM(args.model, dtype=dtype, policy=args.policy, compile=args.compile)
        ids = llm.tokenizer.encode(text)[:args.prefill_tokens]
        r = bench_single(llm, ids, args.decode_tokens, args.runs)
        rows.append([dtype, len(ids), r["prefill"], args.decode_tokens, r["decode"], r["decode_ms"],
                     f"{min(r['decode_all']):.3g}-{max(r['decode_all']):.3g}"])
        del llm
    _table(f"1. single stream (median of {args.runs} runs; {_load()})",
           ["dtype", "prompt", "prefill tok/s", "out", "decode tok/s", "ms/token", "decode range"], rows)


def section_batch(args: argparse.Namespace, text: str) -> None:
    llm = LLM(args.model, dtype=args.batch_dtype, policy=args.policy, max_num_seqs=max(args.concurrency),
              compile=args.compile)
    words = llm.tokenizer.encode(text)
    rng = random.Random(0)
    warm_up(llm, [batch_prompts(words, n, rng) for n in args.concurrency])
    rows = []
    for n in args.concurrency:
        r = bench_batch(llm, batch_prompts(words, n, rng), args.batch_tokens)
        rows.append([n, r["decode_tok_s"], r["e2e_tok_s"], r["step_ms"], r["sched_ms"], r["attn_ms"],
                     r["model_ms"], r["other_ms"], r["decode_steps"]])
    _table(f"2. batched decode, {args.batch_dtype}, ~32-token prompts, {args.batch_tokens} output tokens each "
           f"({_load()}); per decode step, ms",
           ["concurrent", "decode tok/s", "end-to-end tok/s", "step", "scheduler", "attention",
            "model (rest)", "engine other", "decode steps"], rows)


def section_compile(args: argparse.Namespace, text: str) -> None:
    from alise.hub import resolve_model
    from alise.tokenizer import Tokenizer
    words = Tokenizer.from_folder(resolve_model(args.model)).encode(text)
    rng = random.Random(0)
    rows = bench_compile_ratio(args.model, args.batch_dtype, args.policy, args.concurrency,
                               lambda n: batch_prompts(words, n, rng), args.batch_tokens, args.runs)
    _table(f"4. eager vs compiled decode, {args.batch_dtype}, side by side ({args.runs} alternating runs each, "
           f"median; {_load()}); tokens/s",
           ["concurrent", "eager", "compiled", "compiled / eager"], rows)


def section_sched(args: argparse.Namespace) -> None:
    rows = []
    for queued in [int(x) for x in args.sched_queued.split(",")]:
        for policy in ("fcfs", "alise"):
            r = bench_scheduler(policy, queued, args.sched_steps)
            rows.append([policy, queued, r["median_ms"], r["p90_ms"]])
    _table(f"3. scheduler alone: schedule() per step, max_num_seqs=64, {args.sched_steps} steps ({_load()})",
           ["policy", "queued", "median ms", "p90 ms"], rows)


if __name__ == "__main__":
    main()
