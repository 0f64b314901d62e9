"""What quantized KV costs and buys on the real model: perplexity, bytes, capacity and throughput per KV dtype.

    python -m alise.bench.kv                 # all dtypes, bfloat16 model
    python -m alise.bench.kv --quick         # fewer tokens and requests

Perplexity is measured on a fixed slice of real English text (CPython's ``pydoc_data/topics.py``) scored in
windows through the engine's own prefill (``prompt_logprobs``), so the K/V each window attends to went through
the quantized cache. Throughput is aggregate decode tokens/s with ``--concurrency`` requests in flight.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="KV dtypes to compare (default: %(default)s)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="model dtype")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens of text scored for perplexity")
    parser.add_argument("--window", type=int, default=1024, help="context window of each scored chunk")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight for throughput")
    parser.add_argument("--output-len", type=int, default=64, help="tokens generated per request")
    parser.add_argument("--budget-gb", type=float, default=1.0, help="KV budget for the capacity column")
    parser.add_argument("--quick", action="store_true", help="1024 tokens, 8 requests, 1 repeat")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.concurrency = 1024, 8
    repeats = 1 if args.quick else 3

    rows = []
    for kv_dtype in args.dtypes.split(","):
        llm = LLM("smollm2", dtype=args.dtype, kv_dtype=kv_dtype, policy="fcfs")
        cfg = llm.engine.model.config
        per_layer = bytes_per_token(kv_dtype, cfg.num_key_value_heads, cfg.head_dim)
        seq_bytes = 1024 * per_layer * cfg.num_hidden_layers
        ppl = perplexity(llm, real_text_ids(llm, args.tokens), args.window)
        tps = decode_throughput(llm, args.concurrency, args.output_len, repeats)
        rows.append((kv_dtype, per_layer, int(args.budget_gb * (1 << 30) // seq_bytes), ppl, tps))
        del llm
    base = {name: (b, p, t) for name, b, _, p, t in rows}.get("bf16", (rows[0][1], rows[0][3], rows[0][4]))
    from alise.bench.__main__ import cpu_kind
    print(f"\nmodel smollm2 ({args.dtype}, CPU {cpu_kind()}), {args.tokens} tokens of pydoc topics in windows of "
          f"{args.window}, "
          f"{args.concurrency} concurrent requests x {args.output_len} tokens")
    print(f"{'kv':>5} {'B/token/layer':>14} {'x bf16':>7} {'1k-seqs/' + str(args.budget_gb) + 'GiB':>14} "
          f"{'perplexity':>11} {'vs bf16':>8} {'tok/s':>8} {'vs bf16':>8}")
    for name, b, fit, ppl, tps in rows:
        print(f"{name:>5} {b:>14} {b / base[0]:>7.3f} {fit:>14} {ppl:>11.3f} {100 * (ppl / base[1] - 1):>+7.2f}% "
              f"{tps:>8.1f} {tps / base[2]:>8.2f}")


if __name__ == "__main__":
    main()
