"""The Triton kernels against the torch reference: on CUDA when present, else on the CPU under the interpreter.

The interpreter is slow, so shapes are small. What it cannot show (speed, register pressure, GPU rounding of the
dots) is covered by ``test_kernels_compile_for_gpu`` (the kernels compile for sm_90 here) and by the benchmark.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile

import pytest
import torch

from alise import kernels
from alise.kernels import reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    try:
        kernels.enable_triton_interpreter()          # before anything imports triton
    except RuntimeError as exc:                      # pragma: no cover - depends on what ran earlier
        pytest.skip(str(exc), allow_module_level=True)

from hypothesis import given, settings, strategies as st  # noqa: E402
from test_kernels_helpers import dense_attention, dequantized_pages, random_batch, random_pool  # noqa: E402

SETTINGS = settings(max_examples=12, deadline=None, derandomize=True)
TOL = {torch.bfloat16: dict(atol=3e-2, rtol=3e-2), torch.float32: dict(atol=1e-4, rtol=1e-4)}


def pool(kv_dtype, num_blocks, block_size, num_kv_heads, head_dim, seed=0):
    return random_pool(kv_dtype=kv_dtype, num_blocks=num_blocks, block_size=block_size, num_kv_heads=num_kv_heads,
                       head_dim=head_dim, seed=seed, device=DEVICE)


def both(query, cache, meta, **triton_kwargs):
    ref = kernels.paged_attention(query=query, cache=cache, **meta)
    out = kernels.paged_attention(query=query, cache=cache, **meta, backend="triton", **triton_kwargs)
    assert out.dtype == query.dtype and out.shape == query.shape
    return out.float(), ref.float()


# ---------------------------------------------------------------------------------------------------------------
# write kernel
# ---------------------------------------------------------------------------------------------------------------

@SETTINGS
@given(kv_dtype=st.sampled_from(kernels.KV_DTYPES), num_tokens=st.integers(1, 9), num_kv_heads=st.integers(1, 3),
       head_dim=st.sampled_from([16, 32, 64, 128]), block_size=st.sampled_from([16, 32]),
       src_dtype=st.sampled_from([torch.bfloat16, torch.float32]), seed=st.integers(0, 999))
def test_write_kernel_matches_reference_slot_for_slot(kv_dtype, num_tokens, num_kv_heads, head_dim, block_size,
                                                      src_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    num_blocks = 3
    ref = pool(kv_dtype, num_blocks, block_size, num_kv_heads, head_dim, seed)   # pre-filled: untouched slots
    tri = pool(kv_dtype, num_blocks, block_size, num_kv_heads, head_dim, seed)   # must survive
    slots = torch.randperm(num_blocks * block_size, generator=g)[:num_tokens]
    slots[torch.rand(num_tokens, generator=g) < 0.3] = -1
    # K/V as slices of a fused projection (non-contiguous rows), with some all-zero rows and an outlier
    fused = torch.randn(num_tokens, 3 * num_kv_heads * head_dim, generator=g) * 3
    fused[0, : num_kv_heads * head_dim] = 0
    key, value = (t.reshape(num_tokens, num_kv_heads, head_dim).to(src_dtype)
                  for t in fused[:, num_kv_heads * head_dim:].split(num_kv_heads * head_dim, dim=1))
    key[-1, 0, 1] = 80.0
    slots, key, value = slots.to(DEVICE), key.to(DEVICE), value.to(DEVICE)
    kernels.write_kv(key=key, value=value, cache=ref, slot_mapping=slots)
    kernels.write_kv(key=key, value=value, cache=tri, slot_mapping=slots, backend="triton")
    for name in ("k_scale", "v_scale"):
        a, b = getattr(ref, name), getattr(tri, name)
        if a is not None:   # int4 rotates with a different summation order: scales may differ by an fp16 ulp
            assert torch.allclose(a.float(), b.float(), rtol=2e-3, atol=0) if kv_dtype == "int4" else torch.equal(a, b)
    for name in ("k", "v"):
        a, b = getattr(ref, name), getattr(tri, name)
        if kv_dtype != "int4":
            assert torch.equal(a, b)
        else:               # ... and a code may sit on the other side of a rounding boundary
            ca, cb = reference.unpack_int4(a).int(), reference.unpack_int4(b).int()
            assert (ca - cb).abs().max() <= 1 and (ca != cb).float().mean() < 0.01


def _fp32_from_bits(bits: torch.Tensor) -> torch.Tensor:
    return bits.to(torch.int64).sub(2 ** 32 * (bits >= 2 ** 31)).to(torch.int32).view(torch.float32)


@pytest.mark.parametrize("head_dim", [16, 64])
def test_write_kernel_rounds_fp32_to_bf16_pages_like_torch(head_dim):
    """fp32 K/V into bf16 pages: bit for bit torch's round-to-nearest-even (the interpreter's cast truncates).

    Every slot is written (no -1); the values include exact ties (low 16 bits 0x8000, odd and even high halves),
    values just above and below a tie, magnitudes from subnormal to past bf16's largest finite (rounding to inf),
    signed zeros and infinities. NaN must stay NaN (its bits are not compared: torch's own differ by code path).
    """
    g = torch.Generator().manual_seed(head_dim)
    num_blocks, block_size, heads = 4, 16, 2
    n = num_blocks * block_size * heads * head_dim
    high = torch.randint(0, 2 ** 16, (n,), generator=g, dtype=torch.int64)
    high = high.masked_fill((high & 0x7F80) == 0x7F80, 0x3F80)                     # no inf / NaN patterns here
    low = torch.randint(0, 2 ** 16, (n,), generator=g, dtype=torch.int64)
    kind = torch.randint(0, 4, (n,), generator=g)                                  # ties, tie +- 1, random
    low = torch.where(kind == 0, 0x8000, torch.where(kind == 1, 0x7FFF, torch.where(kind == 2, 0x8001, low)))
    key = _fp32_from_bits(high << 16 | low)
    specials = torch.tensor([0.0, -0.0, 1e-40, -1e-40, 1e-45, 3.4e38, -3.4e38, 3.39e38, float("inf"),
                             -float("inf"), 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 65504.0, 1e-20])
    key[: len(specials)] = specials
    value = torch.randn(n, generator=g) * torch.logspace(-30, 30, n).float()[torch.randperm(n, generator=g)]
    value[:4] = _fp32_from_bits(torch.tensor([0x3F808000, 0x3F818000, 0xBF808000, 0xBF818000]))   # ties both ways
    value[4] = float("nan")
    key, value = (t.view(num_blocks * block_size, heads, head_dim).to(DEVICE) for t in (key, value))
    cache = kernels.allocate_layer_cache(num_blocks=num_blocks, block_size=block_size, num_kv_heads=heads,
                                         head_dim=head_dim, kv_dtype="bf16", device=DEVICE)
    slots = torch.randperm(num_blocks * block_size, generator=g).to(DEVICE)
    kernels.write_kv(key=key, value=value, cache=cache, slot_mapping=slots, backend="triton")
    k_out = cache.k.flatten(0, 1)[slots].cpu()
    v_out = cache.v.flatten(0, 1)[slots].cpu()
    assert torch.equal(k_out.view(torch.int16), key.cpu().to(torch.bfloat16).view(torch.int16))
    nan = value.cpu().isnan()
    assert nan.sum() == 1 and torch.equal(v_out.isnan(), nan)
    assert torch.equal(v_out[~nan].view(torch.int16), value.cpu()[~nan].to(torch.bfloat16).view(torch.int16))


# ---------------------------------------------------------------------------------------------------------------
# attention kernel
# ---------------------------------------------------------------------------------------------------------------

CASES = [  # (kv_dtype, group, head_dim, block_size, query dtype)
    ("bf16", 1, 64, 16, torch.bfloat16), ("bf16", 3, 128, 32, torch.bfloat16), ("fp32", 8, 64, 16, torch.float32),
    ("int8", 3, 64, 16, torch.bfloat16), ("int8", 8, 128, 32, torch.bfloat16), ("int8", 1, 64, 32, torch.float32),
    ("int4", 3, 64, 16, torch.bfloat16), ("int4", 1, 128, 16, torch.bfloat16), ("int4", 8, 64, 32, torch.float32),
    ("int4", 2, 16, 16, torch.float32), ("int8", 2, 16, 16, torch.float32),     # the tiny test model's head_dim
]
MIXED = [(5, 37), (1, 20), (16, 16), (1, 70), (0, 9), (9, 45)]        # ragged prefill chunks + decode tokens


@pytest.mark.parametrize("kv_dtype,group,head_dim,block_size,dtype", CASES)
def test_attention_mixed_batch_matches_reference(kv_dtype, group, head_dim, block_size, dtype):
    num_kv_heads = 2
    need = sum(math.ceil(s / block_size) for _, s in MIXED)
    cache = pool(kv_dtype, need + 3, block_size, num_kv_heads, head_dim, seed=group)
    query, meta = random_batch(lens=MIXED, num_blocks=need + 3, block_size=block_size,
                               num_heads=num_kv_heads * group, head_dim=head_dim, seed=group, dtype=dtype, device=DEVICE)
    out, ref = both(query, cache, meta, block_n=16, prefill_block_m=16)
    torch.testing.assert_close(out, ref, **TOL[dtype])


@pytest.mark.parametrize("kv_dtype", kernels.KV_DTYPES)
def test_split_and_unsplit_decode_match_reference(kv_dtype):
    """Long-context decode through both paths; the split one crosses several 256-key chunks."""
    lens = [(1, 600), (1, 37), (1, 256), (1, 257), (1, 513)]
    block_size, dtype = 16, (torch.float32 if kv_dtype == "fp32" else torch.bfloat16)
    need = sum(math.ceil(s / block_size) for _, s in lens)
    cache = pool(kv_dtype, need, block_size, 1, 64)
    query, meta = random_batch(lens=lens, num_blocks=need, block_size=block_size, num_heads=3, head_dim=64, seed=1,
                               dtype=dtype, device=DEVICE)
    split, ref = both(query, cache, meta, split_kv=True)
    unsplit, _ = both(query, cache, meta, split_kv=False)
    torch.testing.assert_close(split, ref, **TOL[dtype])
    torch.testing.assert_close(unsplit, ref, **TOL[dtype])
    auto = kernels.paged_attention(query=query, cache=cache, **meta, backend="triton")   # picks split here
    assert torch.equal(auto.float(), split)


def test_split_path_is_batch_invariant():
    """A sequence's split-K result does not depend on the rest of the batch (fixed 256-key chunks)."""
    cache = pool("int8", 80, 16, 2, 64)
    query, meta = random_batch(lens=[(1, 300), (1, 700), (1, 20)], num_blocks=80, block_size=16, num_heads=6,
                               head_dim=64, seed=2, device=DEVICE)
    full = kernels.paged_attention(query=query, cache=cache, **meta, backend="triton", split_kv=True)
    alone = dict(meta, block_tables=meta["block_tables"][1:2], seq_lens=meta["seq_lens"][1:2],
                 query_start_loc=torch.tensor([0, 1], dtype=torch.int32, device=DEVICE), max_seq_len=700)
    single = kernels.paged_attention(query=query[1:2], cache=cache, **alone, backend="triton", split_kv=True)
    assert torch.equal(full[1:2], single)


@settings(max_examples=10, deadline=None, derandomize=True)
@given(kv_dtype=st.sampled_from(kernels.KV_DTYPES), group=st.sampled_from([1, 3, 8]),
       block_size=st.sampled_from([16, 32]), num_kv_heads=st.integers(1, 2), repeat=st.booleans(),
       lens=st.lists(st.tuples(st.integers(1, 40), st.integers(0, 30)), min_size=1, max_size=4),
       seed=st.integers(0, 999))
def test_attention_random_batches_match_reference(kv_dtype, group, block_size, num_kv_heads, repeat, lens, seed):
    """Drawn (lengths, GQA ratio, block permutation or repeating blocks); padding entries are -1."""
    lens = [(min(q, ctx + q), ctx + q) for q, ctx in lens]          # (q_len, seq_len) with q_len <= seq_len
    need = sum(math.ceil(s / block_size) for _, s in lens)
    cache = pool(kv_dtype, need + 1, block_size, num_kv_heads, 64, seed)
    dtype = torch.float32 if kv_dtype == "fp32" else torch.bfloat16
    query, meta = random_batch(lens=lens, num_blocks=need + 1, block_size=block_size, num_heads=num_kv_heads * group,
                               head_dim=64, seed=seed, dtype=dtype, device=DEVICE, repeat_blocks=repeat, pad_value=-1)
    out = kernels.paged_attention(query=query, cache=cache, **meta, backend="triton", block_n=16, prefill_block_m=32)
    # the reference gathers whole padded rows of the table, so give it a copy without the -1s
    ref_meta = dict(meta, block_tables=meta["block_tables"].clamp_min(0))
    ref = kernels.paged_attention(query=query, cache=cache, **ref_meta)
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])


@pytest.mark.parametrize("kv_dtype", ["int8", "int4"])
@pytest.mark.parametrize("split", [False, True])
def test_kernel_on_quantized_pool_equals_reference_on_dequantized_pool(kv_dtype, split):
    """The dequantize-on-load algebra (column scales, nibble split-dots, offsets, rotation) is exact up to fp32."""
    lens = [(1, 300), (1, 45), (1, 16)] if split else [(6, 30), (1, 45), (16, 16)]
    need = sum(math.ceil(s / 16) for _, s in lens)
    cache = pool(kv_dtype, need, 16, 2, 64, seed=5)
    k, v = dequantized_pages(cache)
    plain = kernels.LayerKVCache(k, v, None, None, "fp32")
    query, meta = random_batch(lens=lens, num_blocks=need, block_size=16, num_heads=4, head_dim=64, seed=5,
                               dtype=torch.float32, device=DEVICE)
    out = kernels.paged_attention(query=query, cache=cache, **meta, backend="triton", split_kv=split, block_n=32)
    want = kernels.paged_attention(query=query, cache=plain, **meta)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)
    dense = dense_attention(query.cpu(), k.cpu(), v.cpu(), **{n: t.cpu() if torch.is_tensor(t) else t for n, t in meta.items()})
    torch.testing.assert_close(out.double().cpu(), dense, atol=2e-5, rtol=2e-5)


def _sparse_tensor(num_bytes: int, dtype: torch.dtype, folder: str, name: str) -> torch.Tensor:
    """A zero-filled tensor backed by a sparse file: only the pages touched take memory."""
    path = os.path.join(folder, name)
    with open(path, "wb") as f:
        f.truncate(num_bytes)
    return torch.from_file(path, shared=True, size=num_bytes // dtype.itemsize, dtype=dtype)


@pytest.mark.parametrize("kv_dtype", ["int8", "int4"])
def test_large_pool_needs_64_bit_offsets(kv_dtype):
    """Blocks past 2**32 bytes into the pool: block * stride must be computed in int64.

    On the CPU the 4.3 GB K and V pools are sparse memory-mapped files, so only the touched pages take memory. The
    interpreter computes addresses with numpy, where an int32 product wraps around; past 2**32 the wrapped address
    still lies inside the pool, so a missing int64 cast shows up as wrong values rather than a crash.
    """
    heads, head_dim, block_size = 1, 64, 16
    bytes_per_block = block_size * heads * (head_dim if kv_dtype == "int8" else head_dim // 2)
    num_blocks = (2 ** 32) // bytes_per_block + 8
    far = [num_blocks - 1, num_blocks - 5, 3]                     # offsets > 2**32, and a near one
    with tempfile.TemporaryDirectory() as folder:
        if DEVICE == "cpu":
            dtype = torch.int8 if kv_dtype == "int8" else torch.uint8
            shape = (num_blocks, block_size, heads, bytes_per_block // block_size)
            k = _sparse_tensor(num_blocks * bytes_per_block, dtype, folder, "k").view(shape)
            v = _sparse_tensor(num_blocks * bytes_per_block, dtype, folder, "v").view(shape)
            k_entries, v_entries = kernels.scale_entries(kv_dtype, head_dim)
            ks = _sparse_tensor(num_blocks * block_size * heads * k_entries * 2, torch.float16, folder, "ks").view(
                num_blocks, block_size, heads, k_entries)
            vs = _sparse_tensor(num_blocks * block_size * heads * v_entries * 2, torch.float16, folder, "vs").view(
                num_blocks, block_size, heads, v_entries)
            cache = kernels.LayerKVCache(k, v, ks, vs, kv_dtype)
        else:
            cache = kernels.allocate_layer_cache(num_blocks=num_blocks, block_size=block_size, num_kv_heads=heads,
                                                 head_dim=head_dim, kv_dtype=kv_dtype, device=DEVICE)
        assert cache.k.stride(0) * far[1] > 2 ** 32
        seq_len = 3 * block_size
        table = torch.tensor([far], dtype=torch.int32, device=DEVICE)
        pos = torch.arange(seq_len, device=DEVICE)
        slots = table[0, pos // block_size].long() * block_size + pos % block_size
        g = torch.Generator().manual_seed(0)
        key = torch.randn(seq_len, heads, head_dim, generator=g).to(DEVICE)
        value = torch.randn(seq_len, heads, head_dim, generator=g).to(DEVICE)
        kernels.write_kv(key=key, value=value, cache=cache, slot_mapping=slots, backend="triton")
        k_pages, _ = dequantized_pages(kernels.LayerKVCache(cache.k[far], cache.v[far], cache.k_scale[far],
                                                            cache.v_scale[far], kv_dtype))
        tol = 0.05 if kv_dtype == "int8" else 0.6
        assert torch.allclose(k_pages.flatten(0, 1).cpu(), key.cpu(), atol=tol, rtol=tol)
        query = torch.randn(2, 2 * heads, head_dim, generator=g).to(torch.bfloat16).to(DEVICE)
        meta = dict(block_tables=table, seq_lens=torch.tensor([seq_len], dtype=torch.int32, device=DEVICE),
                    query_start_loc=torch.tensor([0, 2], dtype=torch.int32, device=DEVICE), max_query_len=2,
                    max_seq_len=seq_len, sm_scale=head_dim ** -0.5)
        out, ref = both(query, cache, meta)
        torch.testing.assert_close(out, ref, **TOL[torch.bfloat16])
        del cache, k, v, ks, vs


# ---------------------------------------------------------------------------------------------------------------
# backend plumbing and GPU compilation
# ---------------------------------------------------------------------------------------------------------------

def _python(code: str, **env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", code], env=clean | env, capture_output=True, text=True, timeout=300)


def test_import_alise_does_not_import_triton_and_interpreter_guard():
    run = _python("import sys, alise, alise.kernels, alise.kernels.reference; assert 'triton' not in sys.modules")
    assert run.returncode == 0, run.stderr
    run = _python("import triton\nfrom alise.kernels import enable_triton_interpreter\nenable_triton_interpreter()")
    assert run.returncode != 0 and "RuntimeError" in run.stderr and "TRITON_INTERPRET" in run.stderr
    run = _python("import os\nfrom alise.kernels import enable_triton_interpreter\nenable_triton_interpreter()\n"
                  "import triton; assert os.environ['TRITON_INTERPRET'] == '1'")
    assert run.returncode == 0, run.stderr


COMPILE_CHECK = r'''
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from alise.kernels import attention, quant

def sig(fn, types):
    return {n: next((t for key, t in types.items() if key in n), "constexpr") for n in fn.arg_names}

def build(fn, types, consts):
    triton.compile(ASTSource(fn=fn, signature=sig(fn, types), constexprs=consts), target=GPUTarget("cuda", 90, 32))

for mode, page in ((0, "*bf16"), (1, "*i8"), (2, "*u8")):
    scale = "*bf16" if mode == 0 else "*fp16"
    build(quant._write_kv_kernel, {"stride": "i64", "key_ptr": "*bf16", "value_ptr": "*bf16", "cache_ptr": page, "scale_ptr": scale,
                                   "slot_ptr": "*i64"},
          dict(BLOCK_SIZE=16, HEAD_DIM=64, KV_MODE=mode, LOG2_D=6, K_GROUPS=2 if mode == 2 else 1))
    for split in ((0, 256) if mode == 2 else (0,)):
        build(attention._paged_attention_kernel,
              {"stride": "i64", "part_": "*fp32", "query_ptr": "*bf16", "out_ptr": "*bf16", "k_ptr": page, "v_ptr": page,
               "scale_ptr": scale, "tables_ptr": "*i32", "lens_ptr": "*i32", "loc_ptr": "*i32", "sm_scale": "fp32",
               "num_seqs": "i32"},
              dict(GROUP=3, HEAD_DIM=64, BLOCK_SIZE=16, BLOCK_M=16, BLOCK_N=64, KV_MODE=mode, LOG2_D=6, HALF=32, K_GROUPS=2 if mode == 2 else 1, SPLIT=split,
                   PV_DTYPE=tl.float16 if mode else tl.bfloat16, PRECISION="tf32", INTERPRET=False))
build(attention._paged_attention_kernel,                  # head_dim 16: int4 nibble dots padded to 16
      {"stride": "i64", "part_": "*fp32", "query_ptr": "*fp32", "out_ptr": "*fp32", "k_ptr": "*u8", "v_ptr": "*u8",
       "scale_ptr": "*fp16", "tables_ptr": "*i32", "lens_ptr": "*i32", "loc_ptr": "*i32", "sm_scale": "fp32",
       "num_seqs": "i32"},
      dict(GROUP=2, HEAD_DIM=16, BLOCK_SIZE=16, BLOCK_M=64, BLOCK_N=64, KV_MODE=2, LOG2_D=4, HALF=16, K_GROUPS=1, SPLIT=0,
           PV_DTYPE=tl.float32, PRECISION="ieee", INTERPRET=False))
build(attention._merge_kernel, {"stride": "i64", "part_": "*fp32", "out_ptr": "*bf16", "lens_ptr": "*i32"},
      dict(SPLIT=256, HEAD_DIM=64, MERGE_TILE=16))
for page in ("*bf16", "*fp32"):                            # fp32 K/V: rounded to bf16 pages on the bits
    build(quant._write_kv_kernel, {"stride": "i64", "key_ptr": "*fp32", "value_ptr": "*fp32", "cache_ptr": page,
                                   "scale_ptr": page, "slot_ptr": "*i64"},
          dict(BLOCK_SIZE=16, HEAD_DIM=64, KV_MODE=0, LOG2_D=6, K_GROUPS=1))
print("compiled")
'''


def test_kernels_compile_for_gpu():
    """Without a GPU, compile every kernel mode for sm_90 (front end, LLVM and ptxas) to catch GPU-only errors."""
    with tempfile.TemporaryDirectory() as cache_dir:
        run = _python(COMPILE_CHECK, TRITON_CACHE_DIR=cache_dir)
    if "ptxas" in run.stderr and "not found" in run.stderr:   # pragma: no cover
        pytest.skip("no ptxas in this triton install")
    assert run.returncode == 0 and "compiled" in run.stdout, run.stderr[-3000:]
