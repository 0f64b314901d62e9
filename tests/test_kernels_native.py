"""The C decode kernel over int8 / int4 pages (``alise/kernels/native.py``) vs an independent dense attention."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from test_kernels_helpers import dense_attention, dequantized_pages, random_batch, random_pool

from alise import kernels
from alise.kernels import native, reference

needs_native = pytest.mark.skipif(not native.available(), reason="no C compiler: the native kernel is not built")


@st.composite
def decode_batches(draw):
    head_dim = draw(st.sampled_from([16, 32, 64, 128]))
    return dict(lens=[(1, draw(st.integers(1, 90))) for _ in range(draw(st.integers(1, 5)))],
                block_size=draw(st.sampled_from([1, 4, 16, 32])), group=draw(st.sampled_from([1, 3, 8])),
                num_kv_heads=draw(st.sampled_from([1, 2, 3])), head_dim=head_dim,
                repeat=draw(st.booleans()), seed=draw(st.integers(0, 999)),
                kv_dtype=draw(st.sampled_from(["int8", "int4"])), pad_value=draw(st.sampled_from([0, -1])),
                scale=10.0 ** draw(st.integers(-3, 2)))


@needs_native
@settings(max_examples=40, deadline=None, derandomize=True)
@given(decode_batches())
def test_native_decode_matches_dense_loop(case):
    """Across head sizes (int4: 1 to 4 key groups), GQA groups, block sizes, shared blocks, magnitudes and
    padding columns (on a block of other keys, or the pool's last block), the C kernel equals exact attention on
    the dequantized pages, in float32."""
    need = sum(math.ceil(s / case["block_size"]) for _, s in case["lens"])
    num_blocks = need + 2
    cache = random_pool(kv_dtype=case["kv_dtype"], num_blocks=num_blocks, block_size=case["block_size"],
                        num_kv_heads=case["num_kv_heads"], head_dim=case["head_dim"], seed=case["seed"],
                        scale=case["scale"])
    query, meta = random_batch(lens=case["lens"], num_blocks=need + 1, block_size=case["block_size"],
                               num_heads=case["num_kv_heads"] * case["group"], head_dim=case["head_dim"],
                               seed=case["seed"], dtype=torch.float32, repeat_blocks=case["repeat"],
                               pad_value=num_blocks - 1 if case["pad_value"] < 0 else 0)
    out = native.decode_attention(query=query, cache=cache, block_tables=meta["block_tables"],
                                  seq_lens=meta["seq_lens"], sm_scale=meta["sm_scale"])
    assert out is not None and out.dtype == torch.float32 and out.shape == query.shape
    want = dense_attention(query, *dequantized_pages(cache), **meta)
    assert torch.allclose(out.double(), want, atol=2e-5 * case["scale"], rtol=1e-4)


@needs_native
@pytest.mark.parametrize("kv_dtype", ["int8", "int4"])
def test_torch_backend_decodes_quantized_pages_natively(kv_dtype, monkeypatch):
    """The torch backend sends decode batches on quantized pages to the C kernel (and bf16 queries come back
    bf16); prefill chunks, float pages and ``ALISE_NATIVE=0`` take the torch ops."""
    calls = []
    kernel = native.decode_attention
    monkeypatch.setattr(native, "decode_attention", lambda **kw: calls.append(kw) or kernel(**kw))
    cache = random_pool(kv_dtype=kv_dtype, num_blocks=10, block_size=16, num_kv_heads=3, head_dim=64, seed=4)
    query, meta = random_batch(lens=[(1, 1), (1, 33), (1, 64)], num_blocks=10, block_size=16, num_heads=9,
                               head_dim=64, seed=4)
    out = kernels.paged_attention(query=query, cache=cache, **meta)
    assert len(calls) == 1 and out.dtype == torch.bfloat16
    want = dense_attention(query, *dequantized_pages(cache), **meta)
    assert torch.allclose(out.double(), want, atol=2e-2, rtol=2e-2)
    prefill, prefill_meta = random_batch(lens=[(5, 20)], num_blocks=10, block_size=16, num_heads=9, head_dim=64,
                                         seed=4)
    kernels.paged_attention(query=prefill, cache=cache, **prefill_meta)
    assert len(calls) == 1
    native.load.cache_clear()
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    try:
        assert not native.available()
        assert torch.equal(kernels.paged_attention(query=query, cache=cache, **meta),
                           reference.paged_attention(query=query, cache=cache, **meta))
    finally:
        native.load.cache_clear()


def test_build_failure_warns_and_falls_back(monkeypatch, tmp_path):
    """A compiler that fails: one warning naming the cause, then None (the torch ops run), never an exception."""
    native.load.cache_clear()
    monkeypatch.setenv("CC", "false")                     # /bin/false: exits 1, builds nothing
    monkeypatch.setenv("ALISE_CACHE", str(tmp_path))
    try:
        with pytest.warns(RuntimeWarning, match="native decode kernel"):
            assert native.load() is None
        cache = random_pool(kv_dtype="int8", num_blocks=4, block_size=16, num_kv_heads=1, head_dim=16, seed=0)
        query, meta = random_batch(lens=[(1, 30)], num_blocks=4, block_size=16, num_heads=2, head_dim=16, seed=0,
                                   dtype=torch.float32)
        out = kernels.paged_attention(query=query, cache=cache, **meta)
        assert torch.allclose(out.double(), dense_attention(query, *dequantized_pages(cache), **meta), atol=2e-5)
        assert not list(tmp_path.rglob("*.so"))
    finally:
        native.load.cache_clear()


def _write_both(kv_dtype, head_dim, num_kv_heads, dtype, seed, magnitude):
    """The same K/V written by the C quantizer and by the torch ops into two pools; returns both pools and the
    slots written (a -1 among them: skipped)."""
    gen = torch.Generator().manual_seed(seed)
    num_tokens = 7
    key = (torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen) * magnitude).to(dtype)
    value = (torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen) * magnitude).to(dtype)
    key[0, 0] = 0                                               # an all-zero row
    key[1, 0, 3] *= 40                                          # an outlier
    slots = torch.tensor([5, -1, 40, 0, 63, 17, 18])
    pools = [kernels.allocate_layer_cache(num_blocks=4, block_size=16, num_kv_heads=num_kv_heads,
                                          head_dim=head_dim, kv_dtype=kv_dtype) for _ in range(2)]
    assert native.write_kv(key=key, value=value, cache=pools[0], slot_mapping=slots)
    reference.write_kv(key=key, value=value, cache=pools[1], slot_mapping=slots)
    return pools, slots


@needs_native
@settings(max_examples=20, deadline=None, derandomize=True)
@given(st.sampled_from([16, 64, 128]), st.integers(1, 3), st.sampled_from([torch.float32, torch.bfloat16]),
       st.integers(0, 999), st.sampled_from([1e-4, 1.0, 300.0]))
def test_native_int8_writer_reproduces_the_reference(head_dim, num_kv_heads, dtype, seed, magnitude):
    """int8: the same codes and fp16 scales as ``reference.write_kv``, bit for bit; slot -1 and every slot not
    written stay zero."""
    (ours, theirs), _ = _write_both("int8", head_dim, num_kv_heads, dtype, seed, magnitude)
    for mine, want in zip((ours.k, ours.v, ours.k_scale, ours.v_scale),
                          (theirs.k, theirs.v, theirs.k_scale, theirs.v_scale)):
        assert torch.equal(mine, want)
    assert ours.k.abs().sum() > 0


@needs_native
@settings(max_examples=20, deadline=None, derandomize=True)
@given(st.sampled_from([16, 64, 128]), st.integers(1, 3), st.sampled_from([torch.float32, torch.bfloat16]),
       st.integers(0, 999), st.sampled_from([1e-4, 1.0, 300.0]))
def test_native_int4_writer_matches_the_reference(head_dim, num_kv_heads, dtype, seed, magnitude):
    """int4: the fast Walsh-Hadamard rotation sums in another order than torch's matmul, so a code may differ by
    one at a rounding boundary: at most 1% of codes, by at most one step, with (scale, offset) pairs within fp16
    rounding; the written slots are the same."""
    (ours, theirs), slots = _write_both("int4", head_dim, num_kv_heads, dtype, seed, magnitude)
    for mine, want in ((ours.k, theirs.k), (ours.v, theirs.v)):
        codes = [torch.stack([x & 0xF, x >> 4], -1).int() for x in (mine, want)]
        diff = (codes[0] - codes[1]).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() <= 0.01
    for mine, want in ((ours.k_scale, theirs.k_scale), (ours.v_scale, theirs.v_scale)):
        assert torch.allclose(mine.float(), want.float(), rtol=2e-3, atol=1e-7)
    written = torch.zeros(64, dtype=torch.bool)
    written[slots[slots >= 0]] = True
    assert (ours.k_scale.flatten(0, 1)[~written] == 0).all() and (ours.k_scale.flatten(0, 1)[written] != 0).any()


@needs_native
@pytest.mark.parametrize("kv_dtype", ["int8", "int4"])
def test_native_kernels_refuse_metadata_outside_the_pool(kv_dtype):
    """A block id past the pool, a sequence longer than its table row, or a slot past the pool: ValueError, and
    nothing written (never a read or write outside the pages)."""
    cache = random_pool(kv_dtype=kv_dtype, num_blocks=4, block_size=16, num_kv_heads=1, head_dim=16, seed=0)
    query, meta = random_batch(lens=[(1, 20)], num_blocks=4, block_size=16, num_heads=2, head_dim=16, seed=0,
                               dtype=torch.float32)
    args = dict(query=query, cache=cache, sm_scale=meta["sm_scale"])
    bad_block = meta["block_tables"].clone()
    bad_block[0, 1] = 4
    with pytest.raises(ValueError, match="outside the KV pool"):
        native.decode_attention(**args, block_tables=bad_block, seq_lens=meta["seq_lens"])
    too_long = torch.tensor([meta["block_tables"].shape[1] * 16 + 1], dtype=torch.int32)
    with pytest.raises(ValueError, match="outside the KV pool"):
        native.decode_attention(**args, block_tables=meta["block_tables"], seq_lens=too_long)
    before = cache.k.clone()
    with pytest.raises(ValueError, match="outside the KV pool"):
        native.write_kv(key=torch.ones(2, 1, 16), value=torch.ones(2, 1, 16), cache=cache,
                        slot_mapping=torch.tensor([3, 64]))
    assert torch.equal(cache.k, before)
