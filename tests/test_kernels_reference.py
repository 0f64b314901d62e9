"""The torch reference kernels: quantization formats, the byte budget, and attention vs an independent dense one."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from test_kernels_helpers import dense_attention, dequantized_pages, random_batch, random_pool

from alise import kernels
from alise.kernels import reference

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)


# ---------------------------------------------------------------------------------------------------------------
# layout and bytes
# ---------------------------------------------------------------------------------------------------------------

def test_bytes_per_token_default_model():
    """SmolLM2: 3 kv heads x head_dim 64. int8 and int4 meet the budget (<= 0.53x, <= 0.30x of bf16)."""
    bf16 = kernels.bytes_per_token("bf16", 3, 64)
    assert bf16 == 768
    assert kernels.bytes_per_token("fp32", 3, 64) == 1536
    assert kernels.bytes_per_token("int8", 3, 64) == 2 * 3 * (64 + 2)
    assert kernels.bytes_per_token("int4", 3, 64) == 3 * (2 * 32 + 2 * 4 + 4)   # keys: 2 groups of 32 channels
    assert kernels.bytes_per_token("int8", 3, 64) / bf16 <= 0.53
    assert kernels.bytes_per_token("int4", 3, 64) / bf16 <= 0.30
    with pytest.raises(ValueError, match="kv_dtype"):
        kernels.bytes_per_token("int2", 3, 64)


@pytest.mark.parametrize("kv_dtype", kernels.KV_DTYPES)
def test_allocation_matches_bytes_per_token(kv_dtype):
    cache = kernels.allocate_layer_cache(num_blocks=3, block_size=16, num_kv_heads=3, head_dim=64, kv_dtype=kv_dtype)
    total = sum(t.numel() * t.element_size() for t in (cache.k, cache.v, cache.k_scale, cache.v_scale) if t is not None)
    assert total == 3 * 16 * kernels.bytes_per_token(kv_dtype, 3, 64)
    assert cache.block_size == 16 and cache.kv_dtype == kv_dtype
    if kv_dtype == "int4":
        assert cache.k.shape == (3, 16, 3, 32) and cache.k.dtype == torch.uint8
        assert cache.k_scale.shape == (3, 16, 3, 4) and cache.k_scale.dtype == torch.float16
        assert cache.v_scale.shape == (3, 16, 3, 2)


def test_bad_arguments():
    with pytest.raises(ValueError, match="kv_dtype"):
        kernels.allocate_layer_cache(num_blocks=1, block_size=16, num_kv_heads=1, head_dim=64, kv_dtype="fp8")
    with pytest.raises(ValueError, match="head_dim"):
        kernels.allocate_layer_cache(num_blocks=1, block_size=16, num_kv_heads=1, head_dim=48, kv_dtype="int4")
    cache = kernels.allocate_layer_cache(num_blocks=1, block_size=16, num_kv_heads=1, head_dim=64, kv_dtype="bf16")
    with pytest.raises(ValueError, match="backend"):
        kernels.write_kv(key=torch.zeros(1, 1, 64), value=torch.zeros(1, 1, 64), cache=cache,
                         slot_mapping=torch.zeros(1, dtype=torch.long), backend="auto")


# ---------------------------------------------------------------------------------------------------------------
# quantization round trips
# ---------------------------------------------------------------------------------------------------------------

@st.composite
def head_vectors(draw):
    """``[T, H, D]`` fp32 values over many magnitudes, with all-zero rows and outliers mixed in."""
    t, h = draw(st.integers(1, 6)), draw(st.integers(1, 3))
    d = draw(st.sampled_from([16, 32, 64, 128]))
    seed = draw(st.integers(0, 2 ** 16))
    magnitude = 10.0 ** draw(st.integers(-6, 4))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, d, generator=g) * magnitude
    if draw(st.booleans()):
        x[0, 0] = 0.0                                                 # an all-zero row
    if draw(st.booleans()):
        x[-1, -1, d // 3] = magnitude * draw(st.sampled_from([50.0, -300.0]))   # an outlier
    if draw(st.booleans()):
        x = x + magnitude * 5                                         # a common offset
    return x


@SETTINGS
@given(head_vectors())
def test_int8_round_trip_within_half_a_step(x):
    q, scale = reference.quantize_int8(x)
    assert q.dtype == torch.int8 and scale.dtype == torch.float16 and scale.shape == x.shape[:-1] + (1,)
    deq = reference.dequantize_int8(q, scale)
    assert torch.isfinite(deq).all()
    err = (x - deq).abs()
    assert (err <= scale.float() / 2 * (1 + 1e-6) + 1e-30).all()
    assert q.abs().max() <= 127


@SETTINGS
@given(head_vectors(), st.sampled_from([1, 2, 4]))
def test_int4_round_trip_within_half_a_step(x, groups):
    """Per element in the rotated basis: |x - deq| <= its group's scale / 2 (what a rounding quantizer can
    promise), for one (scale, offset) pair per vector (values) and per group of channels (keys)."""
    d = x.shape[-1]
    packed, params = reference.quantize_int4(x, groups=groups)
    assert packed.dtype == torch.uint8 and packed.shape == x.shape[:-1] + (d // 2,)
    assert params.dtype == torch.float16 and params.shape == x.shape[:-1] + (2 * groups,)
    xr = reference.rotate(x)
    deq = reference.dequantize_int4(packed, params)
    scale = params[..., 0::2].float().repeat_interleave(d // groups, dim=-1)   # each channel's group scale
    assert scale.shape == x.shape
    assert torch.isfinite(deq).all()
    err = (xr - deq).abs()
    assert (err <= scale / 2 * (1 + 1e-5) + 1e-6 * xr.abs()).all()
    # back in the original basis the error is bounded by the 2-norm of the rotated error
    back = reference.dequantize_int4(packed, params, unrotate=True)
    assert ((x - back).norm(dim=-1) <= err.norm(dim=-1) * (1 + 1e-4) + 1e-6 * x.norm(dim=-1)).all()


@pytest.mark.parametrize("kv_dtype", ["int8", "int4"])
def test_all_zero_rows_dequantize_to_zero(kv_dtype):
    x = torch.zeros(3, 2, 64)
    data, scale = reference.quantize(x, kv_dtype)
    deq = reference.dequantize(data, scale, kv_dtype)
    assert torch.equal(deq, torch.zeros_like(deq))
    cache = kernels.allocate_layer_cache(num_blocks=2, block_size=16, num_kv_heads=2, head_dim=64, kv_dtype=kv_dtype)
    query, meta = random_batch(lens=[(3, 20)], num_blocks=2, block_size=16, num_heads=4, head_dim=64, seed=0)
    out = kernels.paged_attention(query=query, cache=cache, **meta)   # a zeroed pool: zero output, no NaN
    assert torch.equal(out, torch.zeros_like(out))


def test_rounding_is_to_nearest_not_truncation():
    x = torch.tensor([[127.0, 0.6, -0.6, 1.49, -1.51]]).repeat(1, 1).view(1, 1, 5)
    x = torch.nn.functional.pad(x, (0, 11))                           # scale = 1 exactly
    q, scale = reference.quantize_int8(x)
    assert scale.item() == 1.0
    assert q[0, 0, :5].tolist() == [127, 1, -1, 1, -2]


@SETTINGS
@given(st.lists(st.integers(0, 255), min_size=1, max_size=64))
def test_nibble_pack_unpack_is_identity(raw):
    packed = torch.tensor(raw, dtype=torch.uint8)
    codes = reference.unpack_int4(packed)
    assert codes.shape == (2 * len(raw),) and int(codes.max()) <= 15
    assert torch.equal(codes[0::2], packed & 0xF) and torch.equal(codes[1::2], packed >> 4)   # low = even
    assert torch.equal(reference.pack_int4(codes), packed)


def test_rotation_is_orthonormal_and_self_inverse():
    for d in (16, 64, 128):
        x = torch.randn(5, d)
        assert torch.allclose(reference.rotate(reference.rotate(x)), x, atol=1e-5)
        assert torch.allclose(reference.rotate(x).norm(dim=-1), x.norm(dim=-1), rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# write_kv and attention vs independent definitions
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kv_dtype", kernels.KV_DTYPES)
def test_write_kv_skips_minus_one_and_leaves_other_slots(kv_dtype):
    cache = random_pool(kv_dtype=kv_dtype, num_blocks=4, block_size=16, num_kv_heads=2, head_dim=32, seed=1)
    before = [t.clone() for t in (cache.k, cache.v, cache.k_scale, cache.v_scale) if t is not None]
    key, value = torch.randn(3, 2, 32), torch.randn(3, 2, 32)
    slots = torch.tensor([5, -1, 40])
    kernels.write_kv(key=key, value=value, cache=cache, slot_mapping=slots)
    after = [t for t in (cache.k, cache.v, cache.k_scale, cache.v_scale) if t is not None]
    for b, a in zip(before, after):
        flat_b, flat_a = b.flatten(0, 1), a.flatten(0, 1)
        untouched = torch.ones(64, dtype=torch.bool)
        untouched[[5, 40]] = False
        assert torch.equal(flat_b[untouched], flat_a[untouched])
    k_pages, _ = dequantized_pages(cache)
    tol = {"bf16": 2e-2, "fp32": 0, "int8": 5e-2, "int4": 0.6}[kv_dtype]
    assert torch.allclose(k_pages.flatten(0, 1)[[5, 40]], key[[0, 2]], atol=tol, rtol=tol)


@st.composite
def batches(draw):
    block_size = draw(st.sampled_from([1, 4, 16, 32]))
    group = draw(st.sampled_from([1, 3, 8]))
    num_kv_heads = draw(st.sampled_from([1, 2]))
    n = draw(st.integers(1, 4))
    lens = []
    for _ in range(n):
        seq_len = draw(st.integers(1, 70))
        q_len = draw(st.sampled_from([1, 1, seq_len, max(1, seq_len // 2)]))
        lens.append((q_len, seq_len))
    return dict(lens=lens, block_size=block_size, group=group, num_kv_heads=num_kv_heads,
                head_dim=draw(st.sampled_from([16, 64])), repeat=draw(st.booleans()), seed=draw(st.integers(0, 999)),
                kv_dtype=draw(st.sampled_from(kernels.KV_DTYPES)))


@settings(max_examples=30, deadline=None, derandomize=True)
@given(batches())
def test_reference_attention_matches_dense_loop(case):
    """Reference (padded, vectorized SDPA) == per-sequence dense causal softmax, on the dequantized pages."""
    need = sum(math.ceil(s / case["block_size"]) for _, s in case["lens"])
    cache = random_pool(kv_dtype=case["kv_dtype"], num_blocks=need + 2, block_size=case["block_size"],
                        num_kv_heads=case["num_kv_heads"], head_dim=case["head_dim"], seed=case["seed"])
    query, meta = random_batch(lens=case["lens"], num_blocks=need + 2, block_size=case["block_size"],
                               num_heads=case["num_kv_heads"] * case["group"], head_dim=case["head_dim"],
                               seed=case["seed"], dtype=torch.float32, repeat_blocks=case["repeat"])
    out = reference.paged_attention(query=query, cache=cache, **meta)   # the torch ops (decode: not the C kernel)
    want = dense_attention(query, *dequantized_pages(cache), **meta)
    assert torch.allclose(out.double(), want, atol=2e-5, rtol=1e-4)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(batches(), st.integers(0, 3))
def test_torch_backend_matches_dense_loop(case, num_decodes):
    """The CPU backend as the engine calls it: mixed steps (decode rows beside prefill chunks) split into a decode
    batch (the C kernel on quantized pages) and a padded prefill batch; every row == dense causal softmax."""
    lens = case["lens"] + [(1, 1 + 23 * i) for i in range(num_decodes)]
    need = sum(math.ceil(s / case["block_size"]) for _, s in lens)
    cache = random_pool(kv_dtype=case["kv_dtype"], num_blocks=need + 2, block_size=case["block_size"],
                        num_kv_heads=case["num_kv_heads"], head_dim=case["head_dim"], seed=case["seed"])
    query, meta = random_batch(lens=lens, num_blocks=need + 2, block_size=case["block_size"],
                               num_heads=case["num_kv_heads"] * case["group"], head_dim=case["head_dim"],
                               seed=case["seed"], dtype=torch.float32, repeat_blocks=case["repeat"])
    scratch = {}
    for _ in range(2):                                   # two layers of one step: the split is kept and reused
        out = kernels.paged_attention(query=query, cache=cache, **meta, scratch=scratch)
        want = dense_attention(query, *dequantized_pages(cache), **meta)
        assert torch.allclose(out.double(), want, atol=2e-5, rtol=1e-4)
    mixed = meta["max_query_len"] > 1 and any(q == 1 for q, _ in lens)
    assert (scratch.get("mixed_split") is not None) == mixed


@pytest.mark.parametrize("kv_dtype", kernels.KV_DTYPES)
def test_decode_attention_ignores_padding_columns(kv_dtype):
    """Decode reads whole table rows (compile-friendly): padding columns on a block full of other keys, and
    the masked tail of each sequence's last block, must not count."""
    lens = [(1, 1), (1, 16), (1, 17), (1, 45)]
    cache = random_pool(kv_dtype=kv_dtype, num_blocks=12, block_size=16, num_kv_heads=2, head_dim=16, seed=5)
    query, meta = random_batch(lens=lens, num_blocks=11, block_size=16, num_heads=6, head_dim=16, seed=5,
                               dtype=torch.float32, pad_value=11)       # block 11: in no sequence
    assert meta["max_query_len"] == 1 and meta["block_tables"].shape[1] == 4
    out = kernels.paged_attention(query=query, cache=cache, **meta)
    want = dense_attention(query, *dequantized_pages(cache), **meta)
    assert torch.allclose(out.double(), want, atol=2e-5, rtol=1e-4)


def test_reference_attention_bf16_query():
    cache = random_pool(kv_dtype="bf16", num_blocks=12, block_size=16, num_kv_heads=2, head_dim=64, seed=3)
    query, meta = random_batch(lens=[(7, 50), (1, 33), (20, 20)], num_blocks=12, block_size=16, num_heads=6,
                               head_dim=64, seed=3)
    out = kernels.paged_attention(query=query, cache=cache, **meta)
    assert out.dtype == torch.bfloat16 and out.shape == query.shape
    want = dense_attention(query, *dequantized_pages(cache), **meta)
    assert torch.allclose(out.double(), want, atol=3e-2, rtol=2e-2)


@pytest.mark.parametrize("kv_dtype", ["int8", "int4"])
def test_attention_quantization_error_within_analytical_bound(kv_dtype):
    """Attention on a quantized pool vs exact attention on the original fp32 K/V, against a worst-case bound.

    Per key n the quantizer promises |dk| <= s_k/2 and |dv| <= s_v/2 per element of the stored basis (int4: the
    rotated one, where q is rotated too). So a score moves by at most eps_n = sm_scale * ||q||_1 * s_k[n] / 2;
    softmax weights then move by |p' - p| <= p * (exp(2 eps) - 1) with eps = max_n eps_n, and
    |o' - o|_d <= (exp(2 eps) - 1) * max_n |v[n, d]| + max_n |dv[n, d]|, where in the original basis
    |dv| <= s_v/2 (int8) or <= sqrt(D) * s_v/2 (int4: the rotated error's 2-norm bounds each element).
    """
    g = torch.Generator().manual_seed(0)
    heads, d, seq_len = 1, 64, 40
    k = torch.randn(seq_len, heads, d, generator=g)
    v = torch.randn(seq_len, heads, d, generator=g)
    k[:, :, 5] *= 6                                                # an outlier channel
    cache = kernels.allocate_layer_cache(num_blocks=3, block_size=16, num_kv_heads=heads, head_dim=d, kv_dtype=kv_dtype)
    kernels.write_kv(key=k, value=v, cache=cache, slot_mapping=torch.arange(seq_len))
    query = torch.randn(1, heads, d, generator=g) * 2
    meta = dict(block_tables=torch.tensor([[0, 1, 2]], dtype=torch.int32), seq_lens=torch.tensor([seq_len]),
                query_start_loc=torch.tensor([0, 1]), max_query_len=1, max_seq_len=seq_len, sm_scale=d ** -0.5)
    out = kernels.paged_attention(query=query, cache=cache, **meta)[0, 0].double()
    p = torch.softmax((k[:, 0] @ query[0, 0]).double() * meta["sm_scale"], 0)
    exact = p @ v[:, 0].double()
    s_k = cache.k_scale.flatten(0, 1)[:seq_len, 0, 0::2].double()   # (n, groups): int4 keys have 2 groups
    s_v = cache.v_scale.flatten(0, 1)[:seq_len, 0, 0].double()
    q_stored = reference.rotate(query[0, 0]) if kv_dtype == "int4" else query[0, 0]
    q_abs_per_group = q_stored.abs().double().view(s_k.shape[1], -1).sum(-1)   # (groups,)
    eps = (meta["sm_scale"] * s_k / 2 @ q_abs_per_group).max()
    dv = s_v.max() / 2 * (math.sqrt(d) if kv_dtype == "int4" else 1)
    bound = (math.exp(2 * eps) - 1) * v[:, 0].abs().max(0).values.double() + dv
    err = (out - exact).abs()
    assert (err <= bound).all()
    assert err.max() > 0                                           # the test does see quantization error


def test_kernel_benchmark_byte_table(capsys):
    from alise.bench import kernels as bench
    bench.main(["--skip-accuracy", "--budget-gib", "1", "--batch", "2", "--contexts", "256"])
    out = capsys.readouterr().out
    assert "0.516x" in out and "0.297x" in out and "1.000x" in out   # (64 + 2) / 128, (2 * 32 + 3 * 4) / 256
    assert ("needs CUDA" in out) != torch.cuda.is_available()


@pytest.mark.parametrize("lens", [[(1, 37), (1, 37), (1, 37)], [(1, 5), (1, 37), (1, 16)], [(1, 20), (9, 30)]])
def test_step_scratch_is_shared_by_layers(lens):
    """One ``scratch`` dict per step, shared by two layers' pools: each layer still gets its own exact result
    (decode batches of equal and unequal lengths share decode's mask, mixed ones the padding plan)."""
    need = sum(math.ceil(s / 16) for _, s in lens)
    scratch = {}
    for layer in range(2):
        cache = random_pool(kv_dtype="fp32", num_blocks=need + 1, block_size=16, num_kv_heads=2, head_dim=16,
                            seed=layer)
        query, meta = random_batch(lens=lens, num_blocks=need + 1, block_size=16, num_heads=6, head_dim=16,
                                   seed=7, dtype=torch.float32)
        key = value = torch.randn(query.shape[0], 2, 16, generator=torch.Generator().manual_seed(layer))
        slots = torch.arange(query.shape[0]) + 3          # one step: the same slots in every layer
        kernels.write_kv(key=key, value=value, cache=cache, slot_mapping=slots, scratch=scratch)
        assert torch.equal(cache.k.flatten(0, 1)[slots], key)
        out = kernels.paged_attention(query=query, cache=cache, **meta, scratch=scratch)
        want = dense_attention(query, *dequantized_pages(cache), **meta)
        assert torch.allclose(out.double(), want, atol=2e-5, rtol=1e-4)
    assert scratch   # the plan was kept for the second layer


@pytest.mark.parametrize("kv_dtype", ["int8", "int4"])
def test_decode_on_codes_bf16_query(kv_dtype):
    """A bf16 model's decode on quantized pages (codes converted to bf16, dot products rounded to bf16 before the
    scales) stays within bf16 accuracy of exact attention on the dequantized pages."""
    lens = [(1, 1), (1, 16), (1, 33), (1, 64)]
    cache = random_pool(kv_dtype=kv_dtype, num_blocks=10, block_size=16, num_kv_heads=3, head_dim=64, seed=4)
    query, meta = random_batch(lens=lens, num_blocks=10, block_size=16, num_heads=9, head_dim=64, seed=4)
    assert query.dtype == torch.bfloat16 and meta["max_query_len"] == 1
    out = reference.paged_attention(query=query, cache=cache, **meta)     # the torch ops, not the C kernel
    assert out.dtype == torch.bfloat16
    want = dense_attention(query, *dequantized_pages(cache), **meta)
    assert torch.allclose(out.double(), want, atol=3e-2, rtol=2e-2)


@pytest.mark.parametrize("kv_dtype", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_buffer_shared_by_layers(kv_dtype, dtype):
    """Decode on quantized pages converts codes into one buffer per step (kept in ``scratch``) that every layer
    overwrites: each layer's output must equal what it gets alone."""
    lens = [(1, 5), (1, 40), (1, 17)]
    scratch = {}
    for layer in range(3):
        cache = random_pool(kv_dtype=kv_dtype, num_blocks=8, block_size=16, num_kv_heads=2, head_dim=32, seed=layer)
        query, meta = random_batch(lens=lens, num_blocks=8, block_size=16, num_heads=4, head_dim=32, seed=layer,
                                   dtype=dtype)
        shared = reference.paged_attention(query=query, cache=cache, **meta, scratch=scratch)
        alone = reference.paged_attention(query=query, cache=cache, **meta)
        assert torch.equal(shared, alone)
    assert any(key.startswith("codes/") for key in scratch)


def test_prefill_sdpa_runs_at_bucketed_lengths(monkeypatch):
    """Prefill SDPA sees query and key lengths rounded up to SDPA_LENGTH_STEP (the CPU flash kernel keeps a
    compiled kernel per shape for good), and the result is still exact attention, also where the padded keys
    reach past the block table (read from block 0, masked)."""
    seen = []
    sdpa = reference.F.scaled_dot_product_attention

    def recording(q, k, v, **kw):
        seen.append((q.shape[-2], k.shape[-2]))
        return sdpa(q, k, v, **kw)
    monkeypatch.setattr(reference.F, "scaled_dot_product_attention", recording)
    step, group, past_the_table = reference.SDPA_LENGTH_STEP, 2, 0
    for seed, lens in enumerate([[(5, 5)], [(7, 20), (3, 30)], [(17, 70), (1, 9)], [(40, 40), (2, 66)]]):
        cache = random_pool(kv_dtype="fp32", num_blocks=12, block_size=16, num_kv_heads=2, head_dim=32, seed=seed)
        query, meta = random_batch(lens=lens, num_blocks=12, block_size=16, num_heads=2 * group, head_dim=32,
                                   seed=seed, dtype=torch.float32)
        past_the_table += meta["block_tables"].shape[1] * 16 < -(-meta["max_seq_len"] // step) * step
        out = reference.paged_attention(query=query, cache=cache, **meta)    # the padded path, mixed batches too
        want = dense_attention(query, *dequantized_pages(cache), **meta)
        assert torch.allclose(out.double(), want, atol=2e-5, rtol=1e-4)
    assert past_the_table >= 2
    # four batches with seven different query and key lengths: two SDPA shapes
    assert set(seen) == {(group * step, step), (group * step, 2 * step)}
