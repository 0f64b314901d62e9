"""Triton: quantize a step's new K and V and write them into their cache slots.

One program per (token, kv head): it reads the token's ``head_dim`` values of K (then V), quantizes them to the
page dtype and stores them at ``slot_mapping[token]`` (slot -1: the program returns). Offsets are int64
(``block * stride`` can pass 2**31 on a large pool).

Formats (defined in ``reference.py``, reproduced here code for code):

* bf16 / fp32: a cast (fp32 -> bf16 rounds to nearest even on the bits: ``fp32_to_bf16_rne``).
* int8: symmetric, ``scale = absmax / 127`` (fp16), codes ``round(x / scale)`` in [-127, 127].
* int4: rotate the head vector by the orthonormal Hadamard matrix, then asymmetric codes in [0, 15] with fp16
  (scale, offset) pairs: keys one pair per group of 32 rotated channels (2 for head_dim 64), values one pair per
  (token, kv head); two codes per byte (low nibble = even channel).

Why this int4 format: the Hadamard rotation spreads K's outlier channels over the whole head, and the offset
fits the rotated values' range; of the formats within the byte budget (0.30 of bf16) it cost the least
perplexity, and K carries the damage. **Key calibration** (``calibration.py``, applied at the kernels' entry
points, exact for attention): an int4 pool stores each key minus its layer's mean key (per kv head and channel,
after RoPE), divided per channel by balance weights that multiply the queries instead (``(E[k^2] / E[q^2]) **
0.1``), both calibrated at load on 512 tokens of a fixed text. Each extra key group costs two more nibble dots
in the attention kernel (the K tile is loaded once). Scales are fp16 (bf16's 8-bit mantissa is too coarse for
int8's 127 levels), which keeps int8 at 0.516x and int4 at 0.297x of bf16's bytes. The measurements behind
each choice: docs/design.md, "Measured choices".

Rounding is to nearest (``floor(y + 0.5)``) with no clipping, so ``|x - dequant(x)| <= scale / 2`` per element
(in the rotated basis for int4).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from alise.kernels import reference

# the reference's constants as compile-time constants (a @triton.jit function may only read constexpr globals)
INT8_MAX = tl.constexpr(reference.INT8_MAX)
INT4_MAX = tl.constexpr(reference.INT4_MAX)
SCALE_MIN = tl.constexpr(reference.SCALE_MIN)
SCALE_MAX = tl.constexpr(reference.SCALE_MAX)
OFFSET_MARGIN = tl.constexpr(reference.OFFSET_MARGIN)

MODE_FLOAT, MODE_INT8, MODE_INT4 = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)   # the kernels' KV_MODE
KV_MODES = {"bf16": 0, "fp32": 0, "int8": 1, "int4": 2}   # plain ints for the launch; kernels compare with MODE_*
INT4_CENTER = tl.constexpr(8)   # the attention kernel reads int4 codes as u - 8 (-8..7)
NIBBLE_BITS = tl.constexpr(4)   # int4 packing: byte = even | odd << 4
NIBBLE_MASK = tl.constexpr(0xF)
BF16_ROUND_BIAS = tl.constexpr(0x7FFF)   # fp32 -> bf16 round to nearest even: + 0x7FFF + lsb, keep the high half
BF16_QUIET_NAN = tl.constexpr(0x7FC0)


@triton.jit
def hadamard_tile(rows, cols, LOG2_D: tl.constexpr):
    """Entries ``H[rows[:, None], cols[None, :]] = (-1) ** popcount(row & col)`` of the Sylvester Hadamard
    matrix, as fp32 +-1 (built in registers, no memory traffic)."""
    bits = rows[:, None] & cols[None, :]
    parity = bits & 0
    for b in tl.static_range(LOG2_D):
        parity = parity ^ ((bits >> b) & 1)
    return (1 - 2 * parity).to(tl.float32)


@triton.jit
def round_half_up(y):
    """Round to nearest, ties up: ``floor(y + 0.5)``, as ``reference.round_half_up``."""
    return tl.floor(y + 0.5)


@triton.jit
def fp32_to_bf16_rne(x):
    """fp32 -> bf16 rounded to nearest, ties to even, as torch's ``.to(torch.bfloat16)``, on the bits.

    A plain cast is not enough: Triton's CPU interpreter (3.8/3.9) truncates fp32 -> bf16, leaving about half the
    values one bf16 ulp off torch's. Overflow rounds to +-inf as in torch; NaN becomes the quiet NaN 0x7FC0 (the
    rounding add could otherwise carry a NaN's mantissa into inf, or into the sign bit).
    """
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + (BF16_ROUND_BIAS + ((bits >> 16) & 1))) >> 16
    rounded = tl.where(x != x, BF16_QUIET_NAN, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _quantize_store(src_ptr, dst_ptr, scale_ptr, HEAD_DIM: tl.constexpr, KV_MODE: tl.constexpr,
                    LOG2_D: tl.constexpr, GROUPS: tl.constexpr):
    """Quantize one head vector at ``src_ptr`` into ``dst_ptr`` (+ its scales at ``scale_ptr``); int4 stores one
    (scale, offset) pair per group of ``HEAD_DIM // GROUPS`` rotated channels."""
    offs_d = tl.arange(0, HEAD_DIM)
    if KV_MODE == MODE_FLOAT:
        x = tl.load(src_ptr + offs_d)
        if src_ptr.dtype.element_ty == tl.float32 and dst_ptr.dtype.element_ty == tl.bfloat16:
            tl.store(dst_ptr + offs_d, fp32_to_bf16_rne(x))
        else:
            tl.store(dst_ptr + offs_d, x.to(dst_ptr.dtype.element_ty))
    elif KV_MODE == MODE_INT8:
        x = tl.load(src_ptr + offs_d).to(tl.float32)
        scale = tl.math.div_rn(tl.max(tl.abs(x), axis=0), tl.full((), INT8_MAX, tl.float32))   # IEEE, as torch
        scale = tl.minimum(tl.maximum(scale, SCALE_MIN), SCALE_MAX).to(tl.float16)
        q = round_half_up(tl.math.div_rn(x, scale.to(tl.float32)))
        q = tl.minimum(tl.maximum(q, -INT8_MAX), INT8_MAX)
        tl.store(dst_ptr + offs_d, q.to(tl.int8))
        tl.store(scale_ptr, scale)
    else:
        # rotate: the even / odd channels of x @ H / sqrt(D), each [HEAD_DIM // 2]
        half = tl.arange(0, HEAD_DIM // 2)
        x = tl.load(src_ptr + offs_d).to(tl.float32)
        norm = 1.0 / tl.sqrt(HEAD_DIM * 1.0)
        even = tl.sum(x[:, None] * hadamard_tile(offs_d, 2 * half, LOG2_D), axis=0) * norm
        odd = tl.sum(x[:, None] * hadamard_tile(offs_d, 2 * half + 1, LOG2_D), axis=0) * norm
        # channels 2j and 2j + 1 share byte j, and a group never splits a byte: byte j is in group j // (bytes
        # per group); each element gets its group's offset and scale
        group_of_byte = half // (HEAD_DIM // 2 // GROUPS)
        offset_of_byte = tl.zeros([HEAD_DIM // 2], tl.float32)
        scale_of_byte = tl.zeros([HEAD_DIM // 2], tl.float32)
        for g in tl.static_range(GROUPS):
            in_group = group_of_byte == g
            lo = tl.min(tl.where(in_group, tl.minimum(even, odd), float("inf")), axis=0)
            hi = tl.max(tl.where(in_group, tl.maximum(even, odd), float("-inf")), axis=0)
            offset = (lo - tl.abs(lo) * OFFSET_MARGIN)
            offset = tl.minimum(tl.maximum(offset, -SCALE_MAX), SCALE_MAX).to(tl.float16).to(tl.float32)
            scale = tl.math.div_rn(hi - offset, tl.full((), INT4_MAX, tl.float32))
            scale = tl.minimum(tl.maximum(scale, SCALE_MIN), SCALE_MAX).to(tl.float16).to(tl.float32)
            tl.store(scale_ptr + 2 * g, scale.to(tl.float16))
            tl.store(scale_ptr + 2 * g + 1, offset.to(tl.float16))
            offset_of_byte = tl.where(in_group, offset, offset_of_byte)
            scale_of_byte = tl.where(in_group, scale, scale_of_byte)
        u_even = round_half_up(tl.math.div_rn(even - offset_of_byte, scale_of_byte))
        u_odd = round_half_up(tl.math.div_rn(odd - offset_of_byte, scale_of_byte))
        u_even = tl.minimum(tl.maximum(u_even, 0), INT4_MAX).to(tl.uint8)
        u_odd = tl.minimum(tl.maximum(u_odd, 0), INT4_MAX).to(tl.uint8)
        tl.store(dst_ptr + half, u_even | (u_odd << NIBBLE_BITS))


@triton.jit
def _write_kv_kernel(key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, slot_ptr,
                     stride_key_tok, stride_key_head, stride_value_tok, stride_value_head,
                     stride_page_block, stride_page_slot, stride_page_head,
                     stride_k_scale_block, stride_k_scale_slot, stride_k_scale_head,
                     stride_v_scale_block, stride_v_scale_slot, stride_v_scale_head,
                     BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, KV_MODE: tl.constexpr,
                     LOG2_D: tl.constexpr, K_GROUPS: tl.constexpr):
    tok = tl.program_id(0)
    head = tl.program_id(1)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    page = block * stride_page_block + offset * stride_page_slot + head * stride_page_head
    k_scale = block * stride_k_scale_block + offset * stride_k_scale_slot + head * stride_k_scale_head
    v_scale = block * stride_v_scale_block + offset * stride_v_scale_slot + head * stride_v_scale_head
    _quantize_store(key_ptr + tok.to(tl.int64) * stride_key_tok + head * stride_key_head,
                    k_cache_ptr + page, k_scale_ptr + k_scale, HEAD_DIM, KV_MODE, LOG2_D, K_GROUPS)
    _quantize_store(value_ptr + tok.to(tl.int64) * stride_value_tok + head * stride_value_head,
                    v_cache_ptr + page, v_scale_ptr + v_scale, HEAD_DIM, KV_MODE, LOG2_D, 1)


def check_head_dim(head_dim: int) -> None:
    if head_dim & (head_dim - 1) or head_dim < 16:
        raise ValueError(f"the Triton kernels need a power-of-two head_dim >= 16, got {head_dim}")


def write_kv(*, key: torch.Tensor, value: torch.Tensor, cache, slot_mapping: torch.Tensor) -> None:
    """Quantize (if needed) ``key``/``value`` ``[T, Hkv, D]`` and store token t at ``slot_mapping[t]``."""
    num_tokens, num_kv_heads, head_dim = key.shape
    check_head_dim(head_dim)
    if num_tokens == 0:
        return
    assert key.stride(-1) == 1 and value.stride(-1) == 1, "key/value need a contiguous last dim"
    assert cache.k.stride() == cache.v.stride() and cache.k.stride(-1) == 1
    quantized = cache.k_scale is not None
    k_scale = cache.k_scale if quantized else cache.k            # dummies: never touched for float pages
    v_scale = cache.v_scale if quantized else cache.v
    _write_kv_kernel[(num_tokens, num_kv_heads)](
        key, value, cache.k, cache.v, k_scale, v_scale, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        cache.k.stride(0), cache.k.stride(1), cache.k.stride(2),
        k_scale.stride(0), k_scale.stride(1), k_scale.stride(2),
        v_scale.stride(0), v_scale.stride(1), v_scale.stride(2),
        BLOCK_SIZE=cache.k.shape[1], HEAD_DIM=head_dim, KV_MODE=KV_MODES[cache.kv_dtype],
        LOG2_D=int(math.log2(head_dim)), K_GROUPS=reference.scale_groups(k_scale, cache.kv_dtype),
        num_warps=8 if cache.kv_dtype == "int4" and head_dim >= 128 else 4)   # int4 holds a [D, D] rotation tile
