"""What quantized KV costs and buys on the real model: perplexity, bytes, capacity and throughput per KV dtype.

    python -m alise.bench.kv                 # all dtypes, bfloat16 model
    python -m alise.bench.kv --quick         # fewer tokens and requests
    python -m alise.bench.kv --sections step # decode step time per KV dtype at fixed batch x context

Perplexity, capacity and throughput ("quality" section): 
Perplexity is measured on a fixed slice of real English text (CPython's ``pydoc_data/topics.py``) scored in
windows through the engine's own prefill (``prompt_logprobs``), so the K/V each window attends to went through
the quantized cache. Throughput is aggregate decode tokens/s with ``--concurrency`` requests in flight.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from alise import LLM, SamplingParams
from alise.kernels import bytes_per_token

DTYPES = ("bf16", "int8", "int4")


def real_text_ids(llm: LLM, num_tokens: int) -> list[int]:
    import pydoc_data.topics
    text = "\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    return llm.tokenizer.encode(text[: num_tokens * 8])[:num_tokens]


def perplexity(llm: LLM, ids: list[int], window: int) -> float:
    windows = [ids[i:i + window] for i in range(0, len(ids) - 1, window) if len(ids[i:i + window]) > 1]
    outs = llm.generate(windows, SamplingParams(max_tokens=1, prompt_logprobs=True), use_tqdm=False)
    logprobs = [lp for o in outs for lp in o.prompt_logprobs[1:]]
    return math.exp(-sum(logprobs) / len(logprobs))


def decode_throughput(llm: LLM, concurrency: int, output_len: int, repeats: int) -> float:
    prompts = [f"Write a short story about a robot named R{i}." for i in range(concurrency)]
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4), use_tqdm=False)   # warm up
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        rates.append(sum(len(o.token_ids) for o in outs) / (time.perf_counter() - start))
    return statistics.median(rates)


def decode_step_times(batch_contexts: list[tuple[int, int]], dtypes: list[str], model_dtype: str, steps: int,
                      rounds: int, compile: bool = False) -> dict[tuple[int, int, str], float]:
    """Median decode step time (seconds) of each KV dtype with ``batch`` sequences at ``context`` tokens each.

    One engine per dtype, all in this process; each is filled with ``batch`` random prompts of ``context``
    tokens and stepped until every sequence decodes (contexts then run up to a few dozen tokens past
    ``context``: the first sequences decode while the last ones prefill), then the engines take turns:
    ``rounds`` x ``steps`` timed steps each, so a slow spell on a shared machine hits every dtype alike.
    """
    from alise.config import EngineConfig
    times = {}
    for batch, context in batch_contexts:
        # chunked prefill staggers the sequences: the first ones decode while the last ones prefill, so none may
        # finish before all of them decode together (and the timed steps are done)
        prefill_steps = -(-batch * context // EngineConfig.max_num_batched_tokens)
        params = SamplingParams(temperature=0, max_tokens=2 * prefill_steps + rounds * steps + 16, ignore_eos=True)
        # a pool every sequence fits in at its longest: decode steps, never preemptions, are timed
        blocks = batch * -(-(context + params.max_tokens) // EngineConfig.block_size)
        engines = {}
        for kv_dtype in dtypes:
            llm = LLM("smollm2", dtype=model_dtype, kv_dtype=kv_dtype, policy="fcfs", max_num_seqs=batch,
                      compile=compile, kv_cache_blocks=blocks)
            gen = torch.Generator().manual_seed(context)
            vocab = llm.engine.model.config.vocab_size
            for _ in range(batch):
                llm.engine.add_request(torch.randint(100, vocab, (context,), generator=gen).tolist(), params)
            while True:     # until one step decodes every sequence (and, compiled, once more: the compile)
                progressed = llm.engine.step()
                if not progressed:
                    raise RuntimeError("the engine went idle before every sequence decoded")
                if len(progressed) == batch and all(len(r.output_token_ids) > 1 for r in progressed):
                    break
            engines[kv_dtype] = llm
        samples = {kv_dtype: [] for kv_dtype in dtypes}
        for _ in range(rounds):
            for kv_dtype, llm in engines.items():
                for _ in range(steps):
                    start = time.perf_counter()
                    llm.engine.step()
                    samples[kv_dtype].append(time.perf_counter() - start)
        for kv_dtype, values in samples.items():
            times[batch, context, kv_dtype] = statistics.median(values)
        del engines, llm
    return times


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"16x256,32x1024"`` -> ``[(16, 256), (32, 1024)]`` (sequences x context tokens)."""
    try:
        shapes = [tuple(int(n) for n in item.split("x")) for item in text.split(",")]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise ValueError(f"--shapes must look like 16x256,32x1024 (sequences x context tokens), got {text!r}")
    return shapes


def print_step_table(times: dict[tuple[int, int, str], float], dtypes: list[str]) -> None:
    base = "bf16" if "bf16" in dtypes else dtypes[0]
    print(f"{'seqs':>5} {'context':>8} " + " ".join(f"{d + ' ms':>9} {'vs ' + base:>8}" for d in dtypes))
    for batch, context in dict.fromkeys((b, c) for b, c, _ in times):
        cells = [f"{1e3 * times[batch, context, d]:>9.1f} {times[batch, context, d] / times[batch, context, base]:>8.2f}"
                 for d in dtypes]
        print(f"{batch:>5} {context:>8} " + " ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="quality", help="comma-separated: quality (perplexity, capacity, "
                        "throughput), step (decode step time per KV dtype); default: %(default)s")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="KV dtypes to compare (default: %(default)s)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="model dtype")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens of text scored for perplexity")
    parser.add_argument("--window", type=int, default=1024, help="context window of each scored chunk")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight for throughput")
    parser.add_argument("--output-len", type=int, default=64, help="tokens generated per request")
    parser.add_argument("--budget-gb", type=float, default=1.0, help="KV budget for the capacity column")
    parser.add_argument("--shapes", default="16x256,16x1024,32x256,32x1024",
                        help="step section: sequences x context tokens (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=5, help="step section: timed steps per turn")
    parser.add_argument("--rounds", type=int, default=3, help="step section: turns per engine")
    parser.add_argument("--compile", action="store_true", help="step section: compiled decode steps "
                        "(torch.compile, about a minute per engine)")
    parser.add_argument("--quick", action="store_true", help="1024 tokens, 8 requests, 1 repeat")
    args = parser.parse_args()
    sections = args.sections.split(",")
    dtypes = args.dtypes.split(",")
    for name, allowed, given in (("--sections", ("quality", "step"), sections), ("--dtypes", DTYPES, dtypes)):
        if not given or any(g not in allowed for g in given):
            parser.error(f"{name} takes a comma-separated list of {', '.join(allowed)}; got {','.join(given)!r}")
    try:
        shapes = parse_shapes(args.shapes)
    except ValueError as error:
        parser.error(str(error))
    from alise.bench.__main__ import cpu_kind
    if "quality" in sections:
        quality(args, dtypes, cpu_kind())
    if "step" in sections:
        times = decode_step_times(shapes, dtypes, args.dtype, args.steps, args.rounds, args.compile)
        print(f"\n{'compiled' if args.compile else 'eager'} decode step time, model smollm2 ({args.dtype}, "
              f"CPU {cpu_kind()}, {torch.get_num_threads()} threads), median of "
              f"{args.rounds} x {args.steps} steps per engine, engines taking turns")
        print_step_table(times, dtypes)


def quality(args: argparse.Namespace, dtypes: list[str], cpu: str) -> None:
    if args.quick:
        args.tokens, args.concurrency = 1024, 8
    repeats = 1 if args.quick else 3
    rows = []
    for kv_dtype in dtypes:
        llm = LLM("smollm2", dtype=args.dtype, kv_dtype=kv_dtype, policy="fcfs")
        cfg = llm.engine.model.config
        per_layer = bytes_per_token(kv_dtype, cfg.num_key_value_heads, cfg.head_dim)
        seq_bytes = 1024 * per_layer * cfg.num_hidden_layers
        ppl = perplexity(llm, real_text_ids(llm, args.tokens), args.window)
        tps = decode_throughput(llm, args.concurrency, args.output_len, repeats)
        rows.append((kv_dtype, per_layer, int(args.budget_gb * (1 << 30) // seq_bytes), ppl, tps))
        del llm
    base = {name: (b, p, t) for name, b, _, p, t in rows}.get("bf16", (rows[0][1], rows[0][3], rows[0][4]))
    print(f"\nmodel smollm2 ({args.dtype}, CPU {cpu}), {args.tokens} tokens of pydoc topics in windows of "
          f"{args.window}, "
          f"{args.concurrency} concurrent requests x {args.output_len} tokens")
    print(f"{'kv':>5} {'B/token/layer':>14} {'x bf16':>7} {'1k-seqs/' + str(args.budget_gb) + 'GiB':>14} "
          f"{'perplexity':>11} {'vs bf16':>8} {'tok/s':>8} {'vs bf16':>8}")
    for name, b, fit, ppl, tps in rows:
        print(f"{name:>5} {b:>14} {b / base[0]:>7.3f} {fit:>14} {ppl:>11.3f} {100 * (ppl / base[1] - 1):>+7.2f}% "
              f"{tps:>8.1f} {tps / base[2]:>8.2f}")


if __name__ == "__main__":
    main()
