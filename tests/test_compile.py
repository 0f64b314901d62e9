"""compile=True: decode steps through one torch.compile graph give the eager engine's tokens, on one graph."""
from __future__ import annotations

import pytest
import torch

from alise import LLM, SamplingParams

VOCAB = 320   # tests/conftest.py TINY_CONFIG


def tiny(tiny_model_dir, **kwargs) -> LLM:
    return LLM(str(tiny_model_dir), **(dict(dtype="float32", scheduler="fcfs", kv_cache_blocks=64) | kwargs))


def test_compiled_decode_matches_eager_on_one_graph(tiny_model_dir):
    g = torch.Generator().manual_seed(3)
    # lengths across block boundaries (block_size 16), a 1-token prompt; max_tokens differ so the batch
    # shrinks step by step from 6 rows to 1 (a padded row), and contexts grow into new blocks
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (1, 5, 15, 16, 17, 40)]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (20, 4, 9, 14, 6, 25)]
    eager = [o.token_ids for o in tiny(tiny_model_dir).generate(prompts, params)]

    llm = tiny(tiny_model_dir, compile=True)
    runner = llm.engine.runner
    compiled_rows = []
    run_compiled = runner._run_compiled
    runner._run_compiled = lambda ids, *a: compiled_rows.append(len(ids)) or run_compiled(ids, *a)
    with torch._dynamo.config.patch(error_on_recompile=True):     # every decode step on the first graph
        batch = [o.token_ids for o in llm.generate(prompts, params)]
        alone = llm.generate([prompts[5]], params[5])[0].token_ids
    assert batch == eager
    assert alone == eager[5]
    # decode-only steps went through the graph, with 6 rows down to the padded minimum of 2
    assert max(compiled_rows) == 6 and min(compiled_rows) == 2
    # the padding rows wrote only the null block: every real block's pages are the allocator's business
    llm.engine.allocator.check_invariants([])
    assert llm.engine.allocator.num_free == llm.engine.allocator.num_blocks


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
    llm.engine.runner._compiled_decode = broken
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        outs = llm.generate(prompts, params)
    assert [o.token_ids for o in outs] == eager
    assert llm.engine.runner._compiled_decode is None
