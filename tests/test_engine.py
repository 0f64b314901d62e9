"""The engine end to end: batching, memory pressure and preemption, chunked prefill, abort, bad input, API."""
from __future__ import annotations

import pytest
import torch

from alise import LLM, SamplingParams


VOCAB = 320   # tests/conftest.py TINY_CONFIG


def tiny(tiny_model_dir, **kwargs) -> LLM:
    kwargs = dict(dtype="float32", policy="fcfs", kv_cache_blocks=256) | kwargs
    if kwargs["policy"] != "fcfs":
        kwargs.setdefault("embedder", "model")   # the cheap embedder: no MiniLM load in unit tests
    return LLM(str(tiny_model_dir), **kwargs)


def random_prompts(n: int, lo: int, hi: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(3, VOCAB, (m,), generator=g).tolist() for m in lengths]


def one_at_a_time(llm: LLM, prompts, params) -> list[list[int]]:
    return [llm.generate([p], params)[0].token_ids for p in prompts]


@pytest.fixture(scope="module")
def tiny_llm(tiny_model_dir):
    return tiny(tiny_model_dir)


# ---------------------------------------------------------------------------------------------------------
# batching


def test_batch_equals_one_at_a_time_tiny(tiny_llm):
    prompts = random_prompts(8, 1, 70, seed=1)
    params = SamplingParams(temperature=0, max_tokens=16)
    batch = tiny_llm.generate(prompts, params)
    assert [o.prompt_token_ids for o in batch] == prompts          # outputs in prompt order
    assert [o.token_ids for o in batch] == one_at_a_time(tiny_llm, prompts, params)
    assert all(o.finished and o.finish_reason in ("stop", "length") for o in batch)
    assert all(len(o.token_ids) == 16 for o in batch if o.finish_reason == "length")
    assert all(o.token_ids[-1] == 2 for o in batch if o.finish_reason == "stop")   # tiny eos = 2


def test_batch_with_mixed_params_respects_each(tiny_llm):
    prompts = random_prompts(3, 5, 20, seed=2)
    params = [SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=17, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)]
    out = tiny_llm.generate(prompts, params)
    assert [len(o.token_ids) for o in out] == [3, 17, 40]
    assert all(o.finish_reason == "length" for o in out)
    # a stop token ends the request and is kept as its last token
    stop = out[2].token_ids[5]
    first = out[2].token_ids.index(stop)
    stopped = tiny_llm.generate([prompts[2]], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                                                              stop_token_ids=[stop]))[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids == out[2].token_ids[:first + 1]


@pytest.fixture(scope="module")
def real_llm(real_model_dir):
    return LLM(str(real_model_dir), dtype="float32", policy="fcfs")


REAL_PROMPTS = ["The history of the Roman Empire began when a small city on the Tiber",
                "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
                "Three reasons to learn a second language are: first, it helps you travel;"]


@pytest.mark.slow
def test_batch_equals_one_at_a_time_real(real_llm):
    prompts = [real_llm.tokenizer.encode(p) for p in REAL_PROMPTS]
    assert all(4 <= len(p) <= 24 for p in prompts)
    params = SamplingParams(temperature=0, max_tokens=10)
    batch = real_llm.generate(prompts, params)
    assert [o.token_ids for o in batch] == one_at_a_time(real_llm, prompts, params)
    assert all(len(o.token_ids) > 0 for o in batch)


# ---------------------------------------------------------------------------------------------------------
# memory pressure and preemption


PRESSURE_PROMPTS = random_prompts(16, 20, 40, seed=3)
PRESSURE_PARAMS = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)   # <= 64 tokens: 4 blocks


@pytest.fixture(scope="module")
def unconstrained_outputs(tiny_model_dir):
    return [o.token_ids for o in tiny(tiny_model_dir).generate(PRESSURE_PROMPTS, PRESSURE_PARAMS)]


def _assert_pool_whole(engine):
    engine.allocator.check_invariants([])
    stats = engine.stats()
    assert stats.kv_blocks_used == 0 and stats.swap_bytes_used == 0
    assert stats.num_running == stats.num_waiting == 0


@pytest.mark.parametrize("policy, swap_kv_dtype", [("fcfs", "int8"), ("alise", "auto")])
def test_memory_pressure_preempts_and_still_matches(tiny_model_dir, unconstrained_outputs, policy,
                                                    swap_kv_dtype):
    """16 requests of <= 4 blocks each in a 16-block pool: about a quarter fit at once."""
    llm = tiny(tiny_model_dir, policy=policy, kv_cache_blocks=16, block_size=16,
               swap_kv_dtype=swap_kv_dtype)   # "auto" (the default): an exact host copy; fcfs never swaps
    copied_out = []
    copy_out = llm.engine.runner.swap.copy_out
    llm.engine.runner.swap.copy_out = lambda blocks: copied_out.append(len(blocks)) or copy_out(blocks)
    outs = llm.generate(PRESSURE_PROMPTS, PRESSURE_PARAMS)
    assert all(o.finished and o.finish_reason == "length" and o.error is None for o in outs)
    assert [o.token_ids for o in outs] == unconstrained_outputs
    assert sum(o.metrics.num_preemptions for o in outs) > 0
    if policy == "alise":
        assert copied_out, "ALISE should have swapped some preempted KV to host memory"
    _assert_pool_whole(llm.engine)


def test_memory_pressure_with_compressed_swap_finishes_everything(tiny_model_dir):
    """int8 swap compression is lossy: outputs may drift, but every request finishes and nothing leaks."""
    llm = tiny(tiny_model_dir, policy="alise", kv_cache_blocks=16, block_size=16, swap_kv_dtype="int8")
    outs = llm.generate(PRESSURE_PROMPTS, PRESSURE_PARAMS)
    assert all(o.finish_reason == "length" and len(o.token_ids) == 24 for o in outs)
    assert sum(o.metrics.num_preemptions for o in outs) > 0
    _assert_pool_whole(llm.engine)


def test_memory_pressure_small_blocks_and_few_seats(tiny_model_dir, unconstrained_outputs):
    llm = tiny(tiny_model_dir, kv_cache_blocks=40, block_size=4, max_num_seqs=3, max_num_batched_tokens=24)
    outs = llm.generate(PRESSURE_PROMPTS, PRESSURE_PARAMS)
    assert [o.token_ids for o in outs] == unconstrained_outputs
    _assert_pool_whole(llm.engine)


# ---------------------------------------------------------------------------------------------------------
# chunked prefill


@pytest.mark.parametrize("budget", [1, 7, 16])
def test_chunked_prefill_matches_one_shot(tiny_model_dir, tiny_llm, budget):
    prompts = random_prompts(3, 30, 60, seed=4)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, prompt_logprobs=True)
    want = tiny_llm.generate(prompts, params)
    got = tiny(tiny_model_dir, max_num_batched_tokens=budget).generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    for g, w in zip(got, want):
        assert len(g.prompt_logprobs) == len(g.prompt_token_ids) and g.prompt_logprobs[0] is None
        torch.testing.assert_close(torch.tensor(g.prompt_logprobs[1:]), torch.tensor(w.prompt_logprobs[1:]),
                                   atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# abort


def test_abort_in_the_middle_of_a_batch(tiny_model_dir):
    prompts = random_prompts(4, 10, 30, seed=5)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    reference = [o.token_ids for o in tiny(tiny_model_dir).generate(prompts, params)]

    engine = tiny(tiny_model_dir, kv_cache_blocks=64).engine
    ids = [engine.add_request(p, params) for p in prompts]
    for _ in range(5):
        engine.step()
    victim = engine._request(ids[1])          # (white box: its block table against the allocator)
    assert victim.num_output_tokens > 0 and victim.block_table and not victim.is_finished
    engine.abort(ids[1])
    assert victim.is_finished and victim.block_table == []
    assert engine.output(ids[1]).finish_reason == "abort"
    live = [engine._request(i).block_table for i in ids if not engine.is_finished(i)]
    engine.allocator.check_invariants(live)
    assert engine.stats().kv_blocks_used == sum(len(t) for t in live)
    engine.abort(ids[1])                      # aborting a finished request is a no-op
    while engine.has_unfinished():
        engine.step()
    outs = [engine.output(i) for i in ids]
    assert outs[1].finish_reason == "abort" and len(outs[1].token_ids) < 20
    assert outs[1].token_ids == reference[1][:len(outs[1].token_ids)]
    for i in (0, 2, 3):
        assert outs[i].finish_reason == "length" and outs[i].token_ids == reference[i]
    engine.allocator.check_invariants([])
    assert engine.stats().kv_blocks_used == 0


def test_abort_a_waiting_request(tiny_model_dir):
    engine = tiny(tiny_model_dir, kv_cache_blocks=64, max_num_seqs=1).engine
    a = engine.add_request([5, 6, 7], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    b = engine.add_request([8, 9], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    engine.step()
    engine.abort(b)
    assert engine.output(b).finish_reason == "abort" and engine.output(b).token_ids == []
    while engine.has_unfinished():
        engine.step()
    assert engine.output(a).finish_reason == "length"
    assert engine.stats().kv_blocks_used == 0


def test_abort_a_swapped_out_request(tiny_model_dir):
    """Aborting a request whose KV sits in host swap space gives the swap space back."""
    llm = tiny(tiny_model_dir, policy="alise", kv_cache_blocks=16, block_size=16)
    engine = llm.engine
    ids = [engine.add_request(p, PRESSURE_PARAMS) for p in PRESSURE_PROMPTS]
    swapped = None
    for _ in range(400):
        engine.step()
        swapped = next((engine._request(i) for i in ids if engine._request(i).swapped), None)   # (white box)
        if swapped is not None:
            break
    assert swapped is not None, "no request was swapped out under memory pressure"
    used = engine.stats().swap_bytes_used
    assert used > 0 and swapped.block_table == []
    engine.abort(swapped.request_id)
    assert engine.stats().swap_bytes_used < used and swapped.swapped_kv is None
    while engine.has_unfinished():
        engine.step()
    assert all(engine.output(i).finish_reason == ("abort" if i == swapped.request_id else "length")
               for i in ids)
    _assert_pool_whole(engine)


def test_abort_unknown_request_raises(tiny_llm):
    with pytest.raises(ValueError, match="nope"):
        tiny_llm.engine.abort("nope")


# ---------------------------------------------------------------------------------------------------------
# bad input


def test_bad_prompts_finish_with_an_error_and_the_others_go_on(tiny_model_dir):
    llm = tiny(tiny_model_dir, kv_cache_blocks=8, block_size=16, max_model_len=200)   # pool: 128 tokens
    good = random_prompts(2, 5, 15, seed=6)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    want = [o.token_ids for o in llm.generate(good, params)]
    bad = {"too long for max_model_len": list(range(3, 203)),
           "too long for the KV pool": [5] * 150,
           "empty": [],
           "out of vocab": [5, VOCAB, 6],
           "negative id": [5, -1]}
    outs = llm.generate([good[0], *bad.values(), good[1]], params)
    assert [outs[0].token_ids, outs[-1].token_ids] == want
    assert outs[0].finish_reason == outs[-1].finish_reason == "length"
    for what, out in zip(bad, outs[1:-1]):
        assert out.finished and out.finish_reason == "abort", what
        assert out.error, what
        assert out.token_ids == [], what
    assert "max_model_len" in outs[1].error and "KV pool" in outs[2].error and "empty" in outs[3].error
    _assert_pool_whole(llm.engine)


def test_context_and_pool_limits_end_a_request_with_length(tiny_model_dir):
    """A sequence stops at max_model_len tokens, and at the size of the whole KV pool (it could never run again)."""
    llm = tiny(tiny_model_dir, kv_cache_blocks=4, block_size=8, max_model_len=24)    # pool: 32 tokens
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    outs = llm.generate([list(range(5, 25)), list(range(5, 28)), [7]], params)
    assert [o.finish_reason for o in outs] == ["length", "length", "length"]
    assert [len(o.prompt_token_ids) + len(o.token_ids) for o in outs] == [24, 24, 24]
    big = tiny(tiny_model_dir, kv_cache_blocks=4, block_size=8)                       # max_model_len 256
    out = big.generate([list(range(5, 25))], params)[0]
    assert out.finish_reason == "length" and len(out.prompt_token_ids) + len(out.token_ids) == 32
    _assert_pool_whole(big.engine)


def test_empty_text_prompt_is_an_error_not_a_crash(tiny_llm):
    out = tiny_llm.generate(["", "hello"], SamplingParams(temperature=0, max_tokens=3))
    assert out[0].finish_reason == "abort" and out[0].error
    assert out[1].finish_reason in ("stop", "length") and out[1].error is None


def test_bad_arguments_raise_value_error(tiny_model_dir, tiny_llm):
    with pytest.raises(ValueError, match="max_tokens"):
        tiny_llm.generate(["hi"], SamplingParams(max_tokens=0))
    with pytest.raises(ValueError, match="params"):
        tiny_llm.generate(["a", "b"], [SamplingParams()])
    with pytest.raises(ValueError, match="prompt"):
        tiny_llm.generate([3.5])
    for kwargs, name in [(dict(kv_dtype="fp8"), "kv_dtype"), (dict(policy="x"), "policy"),
                         (dict(block_size=0), "block_size"), (dict(dtype="float16"), "dtype"),
                         (dict(max_num_seqs=0), "max_num_seqs"), (dict(kv_cache_blocks=0), "kv_cache_blocks"),
                         (dict(backend="cuda"), "backend")]:
        with pytest.raises(ValueError, match=name):
            LLM(str(tiny_model_dir), **kwargs)
    with pytest.raises(ValueError, match="no-such-model"):
        LLM("no-such-model")
    assert not tiny_llm.engine.has_unfinished()        # nothing half-added by the failed calls


def test_duplicate_request_id_raises(tiny_model_dir):
    engine = tiny(tiny_model_dir, kv_cache_blocks=16).engine
    engine.add_request([5, 6], SamplingParams(max_tokens=1), request_id="x")
    with pytest.raises(ValueError, match="x"):
        engine.add_request([5, 6], SamplingParams(max_tokens=1), request_id="x")


# ---------------------------------------------------------------------------------------------------------
# stream, chat, metrics


def test_stream_concatenates_to_the_generated_text_tiny(tiny_llm):
    params = SamplingParams(temperature=0, max_tokens=40)
    for prompt in ("The assert statement", "x = 1"):
        want = tiny_llm.generate([prompt], params)[0]
        deltas = list(tiny_llm.stream(prompt, params))
        assert "".join(deltas) == want.text
        assert all(deltas)
    assert tiny_llm.engine.stats().num_requests == 0    # stream cleans up after itself


def test_stream_matches_generate_with_a_stop_token(tiny_llm):
    prompt = "The assert statement"
    free_run = tiny_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0]
    stop = free_run.token_ids[4]
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop_token_ids=[stop])
    want = tiny_llm.generate([prompt], params)[0]
    assert want.finish_reason == "stop" and tiny_llm.tokenizer.decode([stop])   # a token with visible text
    assert "".join(tiny_llm.stream(prompt, params)) == want.text


def test_stream_stopped_early_aborts_and_frees(tiny_model_dir):
    llm = tiny(tiny_model_dir, kv_cache_blocks=16)
    it = llm.stream("The assert statement", SamplingParams(temperature=0, max_tokens=60, ignore_eos=True))
    next(it)
    it.close()
    assert not llm.engine.has_unfinished() and llm.engine.stats().num_requests == 0
    assert llm.engine.stats().kv_blocks_used == 0


def test_stream_of_a_bad_prompt_raises(tiny_llm):
    with pytest.raises(ValueError, match="empty"):
        list(tiny_llm.stream([], SamplingParams(max_tokens=4)))


@pytest.mark.slow
def test_stream_concatenates_to_the_generated_text_real(real_llm):
    params = SamplingParams(temperature=0, max_tokens=16)
    prompt = real_llm.tokenizer.encode(real_llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write a haiku about the sea, with an emoji."}]))
    want = real_llm.generate([prompt], params)[0].text
    assert "".join(real_llm.stream(prompt, params)) == want and want


def test_chat_single_and_list(tiny_llm):
    params = SamplingParams(temperature=0, max_tokens=6)
    convs = [[{"role": "user", "content": "Hi"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]]
    single = tiny_llm.chat(convs[0], params)
    many = tiny_llm.chat(convs, params)
    assert isinstance(many, list) and len(many) == 2
    assert many[0].token_ids == single.token_ids
    template = tiny_llm.tokenizer.apply_chat_template(convs[1])
    assert many[1].prompt_token_ids == tiny_llm.tokenizer.encode(template)
    with pytest.raises(ValueError):
        tiny_llm.chat([], params)


def test_metrics_are_ordered(tiny_model_dir):
    llm = tiny(tiny_model_dir, policy="alise", kv_cache_blocks=16)
    outs = llm.generate(random_prompts(8, 5, 40, seed=7), SamplingParams(temperature=0, max_tokens=12))
    for o in outs:
        m = o.metrics
        assert m.arrival_time <= m.first_token_time <= m.finish_time
        assert m.num_preemptions >= 0
        assert m.predicted_output_len is not None and m.predicted_output_len >= 1
    fcfs = tiny(tiny_model_dir, kv_cache_blocks=16).generate(["hello"], SamplingParams(max_tokens=2))[0]
    assert fcfs.metrics.arrival_time <= fcfs.metrics.first_token_time <= fcfs.metrics.finish_time


def test_cost_model_is_fitted_to_this_machine_within_a_few_steps(tiny_model_dir):
    """The speculative ranking must not run long on the default costs (on a CPU they are ~10x off and make
    every request look overdue): the first refit comes after 4 measured steps."""
    from alise.sched.cost import CostModel
    llm = tiny(tiny_model_dir, policy="alise")
    engine = llm.engine
    engine.add_request(list(range(5, 40)), SamplingParams(max_tokens=8, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine.cost == CostModel()
    engine.step()
    # the policy ranks with a least-squares fit to exactly the steps measured so far (no wall-clock comparison:
    # that was flaky on a loaded machine)
    assert len(engine.step_samples) == 4 and engine.cost != CostModel()
    assert engine.cost == CostModel.fit(engine.step_samples)
    assert engine.policy.cost is engine.cost
    engine.step_samples.clear()        # what a benchmark does between runs; the next refit comes with 1 sample
    engine.num_steps = 63
    engine.step()                      # must not fit (nor raise) on fewer than 4 samples
    assert engine.num_steps == 64 and len(engine.step_samples) == 1
