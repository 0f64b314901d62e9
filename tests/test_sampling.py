"""SamplingParams validation and the sampler: seeds, greedy, top-k, top-p, and seeded requests in a batch."""
from __future__ import annotations

import pytest
import torch

from alise import LLM, SamplingParams
from alise.sampling import sample


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize("kwargs, name", [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature="hot"), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.01), "top_p"),
    (dict(top_p=float("nan")), "top_p"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=-3), "max_tokens"),
    (dict(max_tokens=1.5), "max_tokens"),
    (dict(max_tokens=True), "max_tokens"),
    (dict(stop_token_ids=[5, -1]), "stop_token_ids"),
    (dict(stop_token_ids=["a"]), "stop_token_ids"),
    (dict(seed="7"), "seed"),
    (dict(seed=1.0), "seed"),
    # bool is not a number
    (dict(temperature=True), "temperature"),
    (dict(temperature=False), "temperature"),
    (dict(top_k=True), "top_k"),
    (dict(top_p=True), "top_p"),
    (dict(max_tokens=False), "max_tokens"),
    (dict(seed=True), "seed"),
    (dict(seed=False), "seed"),
    (dict(stop_token_ids=[2, True]), "stop_token_ids"),
    (dict(stop_token_ids=(False,)), "stop_token_ids"),
    # finite real numbers only
    (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=10 ** 400), "temperature"),      # an int too large for a float
    (dict(top_p=float("inf")), "top_p"),
    (dict(top_p=float("-inf")), "top_p"),
    (dict(top_p="0.5"), "top_p"),
    # seed: None or an int in [0, 2**63 - 1]
    (dict(seed=2 ** 63), "seed"),
    (dict(seed=2 ** 70), "seed"),
    (dict(seed=-1), "seed"),
    # real bools
    (dict(ignore_eos="no"), "ignore_eos"),
    (dict(ignore_eos=1), "ignore_eos"),
    (dict(ignore_eos=None), "ignore_eos"),
    (dict(prompt_logprobs="yes"), "prompt_logprobs"),
    (dict(prompt_logprobs=0), "prompt_logprobs"),
])
def test_bad_sampling_params_raise_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("seed", [0, 1, 2 ** 62, 2 ** 63 - 1])
def test_seed_range_limits_are_accepted_and_seed_a_generator(seed):
    assert SamplingParams(seed=seed).seed == seed
    torch.Generator().manual_seed(seed)             # what the engine does with it: must not overflow


def test_int_temperature_and_top_p_and_bool_flags_are_accepted():
    p = SamplingParams(temperature=2, top_p=1, ignore_eos=True, prompt_logprobs=True, seed=None)
    assert p.temperature == 2 and p.top_p == 1 and p.ignore_eos is True and p.prompt_logprobs is True


def test_nan_temperature_is_rejected():
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=float("nan"))


def test_scalar_stop_token_ids_raise_value_error():
    with pytest.raises(ValueError, match="stop_token_ids"):
        SamplingParams(stop_token_ids=5)


def test_good_sampling_params_are_accepted():
    p = SamplingParams(temperature=0, top_k=5, top_p=0.5, max_tokens=1, stop_token_ids=(3, 4), seed=0)
    assert p.greedy and p.stop_token_ids == [3, 4]
    assert not SamplingParams(temperature=0.7).greedy


# ---------------------------------------------------------------------------------------------------------
# the sampler


def random_logits(rows: int, vocab: int = 500, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=gen(seed)) * scale


def draws(logits_row: torch.Tensor, params: SamplingParams, n: int, seed: int) -> torch.Tensor:
    """``n`` samples from one row with one generator (batched as n identical rows sharing the generator)."""
    g = gen(seed)
    return torch.tensor(sample(logits_row.expand(n, -1).clone(), [params] * n, [g] * n))


def test_same_seed_same_samples_different_seeds_differ():
    logits = random_logits(1, scale=0.5)[0]          # flat-ish: many likely tokens
    p = SamplingParams(temperature=1.0)
    a, b, c = draws(logits, p, 64, seed=3), draws(logits, p, 64, seed=3), draws(logits, p, 64, seed=4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert len(set(a.tolist())) > 10                  # and it does sample, not argmax


def test_greedy_is_argmax():
    logits = random_logits(8)
    params = [SamplingParams(temperature=0)] * 8
    assert sample(logits, params, [gen(i) for i in range(8)]) == logits.argmax(-1).tolist()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 5.0])
def test_top_k_1_is_greedy(temperature):
    logits = random_logits(16, scale=0.3)
    params = [SamplingParams(temperature=temperature, top_k=1)] * 16
    assert sample(logits, params, [gen(i) for i in range(16)]) == logits.argmax(-1).tolist()


def test_top_k_keeps_only_the_k_best():
    logits = random_logits(1, scale=0.2)[0]
    out = draws(logits, SamplingParams(temperature=1.0, top_k=5), 2000, seed=0)
    allowed = set(torch.topk(logits, 5).indices.tolist())
    assert set(out.tolist()) == allowed               # all five appear (p ~ 0.2 each), nothing else


def _frequencies(samples: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.bincount(samples, minlength=vocab).double() / len(samples)


def test_top_p_keeps_only_the_nucleus_with_renormalized_probabilities():
    probs = torch.tensor([0.05, 0.40, 0.02, 0.25, 0.15, 0.08, 0.05])
    logits = probs.log()
    # sorted: .40 .25 .15 | .08 .05 .05 .02; cumulative .40 .65 .80: top_p = 0.7 keeps {1, 3, 4}
    n = 6000
    out = draws(logits, SamplingParams(temperature=1.0, top_p=0.7), n, seed=11)
    assert set(out.tolist()) == {1, 3, 4}
    freq = _frequencies(out, len(probs))
    nucleus = torch.zeros_like(probs, dtype=torch.float64)
    nucleus[[1, 3, 4]] = probs[[1, 3, 4]].double() / 0.80
    sd = (nucleus * (1 - nucleus) / n).sqrt()
    assert ((freq - nucleus).abs() <= 5 * sd + 1e-12).all(), (freq, nucleus)


def test_top_p_boundary_token_is_kept():
    """The token that crosses top_p stays; the first token always stays, even for a tiny top_p."""
    logits = torch.tensor([0.5, 0.3, 0.2]).log()
    assert set(draws(logits, SamplingParams(top_p=0.6), 2000, seed=0).tolist()) == {0, 1}
    assert set(draws(logits, SamplingParams(top_p=0.4), 2000, seed=0).tolist()) == {0}
    assert set(draws(logits, SamplingParams(top_p=0.9), 2000, seed=0).tolist()) == {0, 1, 2}
    assert set(draws(logits, SamplingParams(top_p=1e-6), 500, seed=0).tolist()) == {0}


def test_unfiltered_samples_follow_softmax_of_logits_over_temperature():
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0, 0.5])
    n = 8000
    for t in (0.5, 2.0):
        want = torch.softmax(logits.double() / t, -1)
        freq = _frequencies(draws(logits, SamplingParams(temperature=t), n, seed=5), len(logits))
        sd = (want * (1 - want) / n).sqrt()
        assert ((freq - want).abs() <= 5 * sd).all(), (t, freq, want)


def test_a_row_sample_depends_only_on_its_own_generator():
    logits = random_logits(4, scale=0.5)
    p = SamplingParams(temperature=1.0, top_p=0.9, top_k=50)
    alone = sample(logits[2:3].clone(), [p], [gen(42)])
    mixed = sample(logits.clone(), [SamplingParams(temperature=0.3), SamplingParams(temperature=0), p,
                                    SamplingParams(top_k=3)], [gen(1), gen(2), gen(42), gen(3)])
    assert mixed[2] == alone[0]


# ---------------------------------------------------------------------------------------------------------
# a seeded request in the engine


@pytest.fixture(scope="module")
def tiny_llm(tiny_model_dir):
    return LLM(str(tiny_model_dir), dtype="float32", policy="fcfs", kv_cache_blocks=128)


def test_seeded_request_is_the_same_alone_and_in_a_batch(tiny_llm):
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=24, ignore_eos=True)
    prompt = list(range(40, 60))
    alone = tiny_llm.generate([prompt], seeded)[0].token_ids
    again = tiny_llm.generate([prompt], seeded)[0].token_ids
    assert alone == again and len(alone) == 24
    others = [list(range(5, 5 + n)) for n in (3, 30, 11)]
    params = [SamplingParams(temperature=0.8, max_tokens=30, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=5),
              SamplingParams(temperature=1.5, seed=9, max_tokens=17, ignore_eos=True)]
    batch = tiny_llm.generate(others[:2] + [prompt] + others[2:], params[:2] + [seeded] + params[2:])
    assert batch[2].token_ids == alone
    other_seed = tiny_llm.generate([prompt], SamplingParams(temperature=1.0, top_p=0.95, seed=1235,
                                                            max_tokens=24, ignore_eos=True))[0].token_ids
    assert other_seed != alone


def test_unseeded_requests_are_reproducible_per_engine_seed(tiny_model_dir):
    """Without a per-request seed, the engine's seed decides: two fresh engines with seed=0 agree."""
    p = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    prompts = [list(range(7, 20)), list(range(30, 35))]
    a = LLM(str(tiny_model_dir), dtype="float32", policy="fcfs", kv_cache_blocks=32, seed=0).generate(prompts, p)
    b = LLM(str(tiny_model_dir), dtype="float32", policy="fcfs", kv_cache_blocks=32, seed=0).generate(prompts, p)
    c = LLM(str(tiny_model_dir), dtype="float32", policy="fcfs", kv_cache_blocks=32, seed=1).generate(prompts, p)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert [o.token_ids for o in a] != [o.token_ids for o in c]
    assert a[0].token_ids != a[1].token_ids
