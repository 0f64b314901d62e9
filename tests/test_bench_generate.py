"""The generation benchmark's step accounting (alise.bench.generate.bench_batch) on the tiny model."""
from __future__ import annotations

import dataclasses

from alise import LLM
from alise.bench.generate import bench_batch


def test_bench_batch_counts_decode_steps_and_leaves_out_compiling_ones(tiny_model_dir):
    llm = LLM(str(tiny_model_dir), dtype="float32", policy="fcfs", kv_cache_blocks=64)
    prompts = [[5 + i, 6, 7, 8] for i in range(4)]          # one prefill step for all, then 7 decode steps
    r = bench_batch(llm, prompts, output_tokens=8)
    assert (r["steps"], r["decode_steps"]) == (8, 7)
    assert r["decode_tok_s"] == r["decode_tok_s"] and r["decode_tok_s"] > 0    # not NaN
    assert llm.engine.stats().num_requests == 0              # the bench cleans up after itself

    runner = llm.engine.runner
    execute, calls = runner.execute, []

    def first_decode_compiles(batch):   # as a compiled engine's first step of a new graph reports itself
        result = execute(batch)
        calls.append(1)
        return dataclasses.replace(result, compiled_now=len(calls) == 2)
    runner.execute = first_decode_compiles
    r = bench_batch(llm, prompts, output_tokens=8)
    assert (r["steps"], r["decode_steps"]) == (8, 6)
