"""compile=True: decode steps through one torch.compile graph give the eager engine's tokens, on one graph."""
from __future__ import annotations

import pytest
import torch

from alise import LLM, SamplingParams

VOCAB = 320   # tests/conftest.py TINY_CONFIG


def tiny(tiny_model_dir, **kwargs) -> LLM:
    return LLM(str(tiny_model_dir), **(dict(dtype="float32", policy="fcfs", kv_cache_blocks=64) | kwargs))


@pytest.mark.filterwarnings("error::RuntimeWarning")   # a failed compile warns and goes eager: fail instead
@pytest.mark.parametrize("kv_dtype", ["auto", "int4"])  # int4: rotation, key centre and balance in the graph
def test_compiled_decode_matches_eager_on_one_graph(tiny_model_dir, kv_dtype):
    g = torch.Generator().manual_seed(3)
    # lengths across block boundaries (block_size 16), a 1-token prompt; max_tokens differ so the batch
    # shrinks step by step from 6 rows to 1 (a padded row), and contexts grow into new blocks
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (1, 5, 15, 16, 17, 40)]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (20, 4, 9, 14, 6, 25)]
    # alone first: the first compiled step has 2 rows (one padding) and 2 table columns (one padding); the
    # table then grows to 3 columns, which must not need a second graph
    alone_params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    eager_llm = tiny(tiny_model_dir, kv_dtype=kv_dtype)
    eager_alone = eager_llm.generate([prompts[1]], alone_params)[0].token_ids
    eager = [o.token_ids for o in eager_llm.generate(prompts, params)]

    torch._dynamo.reset()   # compiled engines share the decode function's code object: start with no graphs
    llm = tiny(tiny_model_dir, kv_dtype=kv_dtype, compile=True)
    runner = llm.engine.runner
    compiled_rows = []
    run_compiled = runner.compiled_decode.run

    def counted(input_ids, *args, **kwargs):
        outputs = run_compiled(input_ids, *args, **kwargs)
        if outputs is not None:
            compiled_rows.append(len(input_ids))
        return outputs
    runner.compiled_decode.run = counted
    execute, executed = runner.execute, []
    runner.execute = lambda batch: executed.append(1) or execute(batch)
    with torch._dynamo.config.patch(error_on_recompile=True):     # every decode step on the first graph
        alone = llm.generate([prompts[1]], alone_params)[0].token_ids
        batch = [o.token_ids for o in llm.generate(prompts, params)]
    assert runner.compiled_decode is not None                      # no fallback to eager happened
    assert alone == eager_alone
    assert batch == eager
    # decode-only steps went through the graph, with 6 rows down to the padded minimum of 2
    assert max(compiled_rows) == 6 and min(compiled_rows) == 2
    assert len(compiled_rows) >= 39 + 24
    # the step that compiled is kept out of the step times the cost model is fitted to
    assert len(llm.engine.step_samples) == len(executed) - 1


def test_compile_arguments_are_checked(tiny_model_dir):
    with pytest.raises(ValueError, match="compile"):
        tiny(tiny_model_dir, compile="yes")
    with pytest.raises(ValueError, match="compile"):
        tiny(tiny_model_dir, compile=True, backend="triton")


def test_a_failing_compile_falls_back_to_eager(tiny_model_dir):
    """A compiler error (no C++ compiler, an inductor bug) warns once and the requests finish as eager ones."""
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (3, 20)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    eager = [o.token_ids for o in tiny(tiny_model_dir).generate(prompts, params)]
    llm = tiny(tiny_model_dir, compile=True)

    def broken(*args):
        raise RuntimeError("no C++ compiler")
    llm.engine.runner.compiled_decode.graph = broken
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        outs = llm.generate(prompts, params)
    assert [o.token_ids for o in outs] == eager
    assert llm.engine.runner.compiled_decode is None


def test_fp32_gemm_is_a_bf16_linear():
    """Inside cpu.fp32_gemm a bf16 projection is computed on float32 GEMMs and rounded back to bf16: the
    float64 product of the same bf16 operands, rounded to bf16 (within one bf16 step of float32 summation)."""
    from alise.cpu import fp32_gemm, linear
    g = torch.Generator().manual_seed(5)
    x = torch.randn(7, 96, generator=g).bfloat16()
    w = torch.randn(40, 96, generator=g).bfloat16()
    b = torch.randn(40, generator=g).bfloat16()
    exact = x.double() @ w.double().T + b.double()
    with fp32_gemm():
        out = linear(x, w, b)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), exact.bfloat16().double(), rtol=2 ** -7, atol=1e-6)
    with fp32_gemm(False):
        assert linear(x, w, b).dtype == torch.bfloat16
    with fp32_gemm():   # other dtypes are left alone
        assert torch.equal(linear(x.float(), w.float()), torch.nn.functional.linear(x.float(), w.float()))


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_bf16_batches_past_the_threshold_get_a_float32_gemm_graph(tiny_model_dir, monkeypatch):
    """bf16: a batch of FP32_GEMM_MIN_ROWS rows or more runs on a second graph (float32 GEMMs), fewer rows on
    the first; each one's logits match the eager engine's for the same decode step."""
    import alise.cpu
    import alise.runner
    monkeypatch.setattr(alise.cpu, "FP32_GEMM_MIN_ROWS", 4)
    g = torch.Generator().manual_seed(6)
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)   # prefill, then one decode step
    batches = [[torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]
               for lengths in ((5, 17, 30, 2, 9), (12, 3))]                 # 5 rows (float32 GEMMs), then 2

    def decode_logits(llm) -> list[torch.Tensor]:
        seen = []
        real_sample = alise.runner.sample
        monkeypatch.setattr(alise.runner, "sample", lambda logits, *a, **k: seen.append(logits.clone())
                            or real_sample(logits, *a, **k))
        for prompts in batches:
            llm.generate(prompts, params)
        monkeypatch.setattr(alise.runner, "sample", real_sample)
        return seen[1::2]      # [prefill, decode] per batch

    eager = decode_logits(tiny(tiny_model_dir, dtype="bfloat16"))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    llm = tiny(tiny_model_dir, dtype="bfloat16", compile=True)
    llm.engine.runner.compiled_decode.fp32_gemm_helps = True      # as on a CPU without AMX, whatever this one has
    compiled = decode_logits(llm)
    assert llm.engine.runner.compiled_decode.graphs == {True, False}
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    for e, c in zip(eager, compiled, strict=True):
        assert c.shape == e.shape
        torch.testing.assert_close(c, e, atol=0.02 * e.abs().max().item(), rtol=0)   # measured: 0.0075


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_compiled_steps_sample_seeded_rows_beside_greedy_ones(tiny_model_dir):
    """The graph's argmax serves the greedy rows; sampled rows in the same step still draw from their logits."""
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (4, 9, 13, 6)]
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0.9, top_k=40, seed=11, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=1.2, top_p=0.8, seed=12, max_tokens=12, ignore_eos=True)]
    eager = [o.token_ids for o in tiny(tiny_model_dir).generate(prompts, params)]
    torch._dynamo.reset()
    llm = tiny(tiny_model_dir, compile=True)
    assert [o.token_ids for o in llm.generate(prompts, params)] == eager
    assert llm.engine.runner.compiled_decode is not None
