"""Nothing lost, nothing hangs: exact swap under memory pressure, threads, request release, the oracle's inputs."""
from __future__ import annotations

import threading

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from alise import LLM, SamplingParams

from test_engine import random_prompts, tiny

PROMPTS = random_prompts(12, 10, 40, seed=11)
PARAMS = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)


@pytest.fixture(scope="module")
def alone(tiny_model_dir) -> list[list[int]]:
    """Each prompt's greedy tokens on an engine with room for everything (no preemption)."""
    llm = tiny(tiny_model_dir)
    return [llm.generate([p], PARAMS)[0].token_ids for p in PROMPTS]


@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(num_blocks=st.integers(4, 24), block_size=st.sampled_from([4, 8, 16]), max_num_seqs=st.integers(2, 12))
def test_greedy_outputs_do_not_depend_on_memory_pressure(tiny_model_dir, alone, num_blocks, block_size,
                                                         max_num_seqs):
    """The default (exact) swap and recompute alike: preempted requests continue with the same tokens."""
    num_blocks = max(num_blocks, -(-60 // block_size))      # the longest request (40 + 20 tokens) must fit alone
    llm = tiny(tiny_model_dir, policy="alise", kv_cache_blocks=num_blocks, block_size=block_size,
               max_num_seqs=max_num_seqs, swap_space_gb=2e-5)   # room for ~40 tokens: some swap, some recompute
    outs = llm.generate(PROMPTS, PARAMS)
    assert [o.token_ids for o in outs] == alone
    engine = llm.engine
    assert engine.stats().kv_blocks_used == 0 and engine.stats().num_requests == 0


def test_pressure_run_swaps_and_recomputes(tiny_model_dir, alone):
    """The case above really exercises both paths (else it would pass vacuously)."""
    llm = tiny(tiny_model_dir, policy="alise", kv_cache_blocks=8, block_size=8, max_num_seqs=12,
               swap_space_gb=2e-5)   # room for ~40 tokens: the rest recompute
    outs = llm.generate(PROMPTS, PARAMS)
    assert [o.token_ids for o in outs] == alone
    assert sum(o.metrics.num_swapped_tokens for o in outs) > 0
    assert sum(o.metrics.num_recomputed_tokens for o in outs) > 0


def test_concurrent_generate_from_threads(tiny_model_dir, alone):
    """Four threads share one engine: each gets exactly its own outputs, and nothing hangs."""
    llm = tiny(tiny_model_dir, policy="alise", kv_cache_blocks=24, block_size=8)
    results, errors = {}, []

    def work(i):
        try:
            mine = PROMPTS[3 * i:3 * i + 3]
            results[i] = [o.token_ids for o in llm.generate(mine, PARAMS)]
            stream = "".join(llm.stream(PROMPTS[i], PARAMS))
            results[(i, "stream")] = stream
        except Exception as e:         # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors
    for i in range(4):
        assert results[i] == alone[3 * i:3 * i + 3]
        assert results[(i, "stream")] == llm.tokenizer.decode(alone[i])
    assert llm.engine.stats().num_requests == 0 and not llm.engine.has_unfinished()


def test_generate_releases_its_requests_on_any_exception(tiny_model_dir):
    llm = tiny(tiny_model_dir)
    engine = llm.engine
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        llm.generate(["fine", "\ud800 a lone surrogate"], PARAMS)      # the tokenizer refuses it
    assert engine.stats().num_requests == 0 and not engine.has_unfinished()
    step = engine.step
    calls = []

    def interrupted():
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return step()
    engine.step = interrupted
    with pytest.raises(KeyboardInterrupt):
        llm.generate(PROMPTS[:4], PARAMS)
    engine.step = step
    assert engine.stats().num_requests == 0 and not engine.has_unfinished()
    assert engine.stats().kv_blocks_used == 0
    assert llm.generate(PROMPTS[:1], PARAMS)[0].token_ids     # the next call runs only its own request


def test_pop_releases_and_automatic_ids_skip_user_ids(tiny_model_dir):
    engine = tiny(tiny_model_dir).engine
    user = engine.add_request([5, 6, 7], PARAMS, request_id="1")
    auto = [engine.add_request([5, 6, 7], PARAMS) for _ in range(3)]
    assert user == "1" and "1" not in auto and len(set(auto)) == 3
    out = engine.pop(auto[0])                        # unfinished: aborted and released
    assert out.finish_reason == "abort" and not engine.has_request(auto[0])
    while engine.has_unfinished():
        engine.step()
    out = engine.pop(user)
    assert out.finish_reason == "length" and len(out.token_ids) == PARAMS.max_tokens
    with pytest.raises(ValueError, match="unknown request_id"):
        engine.pop(user)


def test_oracle_needs_true_lengths(tiny_model_dir):
    llm = tiny(tiny_model_dir, policy="oracle")
    with pytest.raises(ValueError, match="true_output_len"):
        llm.generate(["hello"], PARAMS)
    assert llm.engine.stats().num_requests == 0
    engine = llm.engine
    rid = engine.add_request([5, 6, 7], PARAMS, true_output_len=20)
    assert engine._request(rid).true_output_len == 20                # (white box: what the oracle ranks by)


@pytest.mark.parametrize("bad, name", [(None, "prompts"), (b"hi", "prompts"), ([[5, 6], 3.5], "prompt"),
                                       ([[5, True]], "prompt")])
def test_bad_prompt_containers_name_the_argument(tiny_model_dir, bad, name):
    llm = tiny(tiny_model_dir)
    with pytest.raises(ValueError, match=name):
        llm.generate(bad, PARAMS)
    assert llm.engine.stats().num_requests == 0


@pytest.mark.parametrize("messages, where", [([[]], r"messages\[0\]"), ([{"role": "user"}], "content"),
                                             ([{"role": "user", "content": None}], "content"), ([], "messages")])
def test_bad_chat_messages_name_the_message(tiny_model_dir, messages, where):
    llm = tiny(tiny_model_dir)
    with pytest.raises(ValueError, match=where):
        llm.chat(messages, PARAMS)
    assert llm.engine.stats().num_requests == 0


def test_validation_happens_before_the_model_loads(tmp_path):
    """A bad option or a missing history file is reported without touching the (missing) model folder."""
    with pytest.raises(ValueError, match="predictor_history"):
        LLM(str(tmp_path / "no-model"), predictor_history=str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="swap_space_gb"):
        LLM(str(tmp_path / "no-model"), swap_space_gb=float("inf"))
