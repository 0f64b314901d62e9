"""Triton: paged attention over bf16 / fp32 / int8 / int4 pages, for prefill chunks and decode tokens alike.

Memory layout (see ``alise/kernels/__init__.py``). Pages are token-major: K and V ``[num_blocks, block_size,
Hkv, D]`` (int4: ``D // 2`` bytes, low nibble = even channel), scales ``[num_blocks, block_size, Hkv, entries]``
fp16. Key ``n`` of sequence ``b`` lives in page ``block_tables[b, n // block_size]`` at slot ``n % block_size``;
its address is ``page * stride_block + slot * stride_slot + head * stride_head``, computed in int64.

Tiling (one kernel for the whole mixed batch, after vLLM's unified kernel):

* Grid ``(q_blocks, Hkv)``. A program owns ``BLOCK_Q`` consecutive query tokens of one sequence and *all*
  ``GROUP = Hq / Hkv`` query heads that share kv head ``h``, packed as ``BLOCK_M = BLOCK_Q * GROUP`` rows
  (row ``r`` = token ``r // GROUP``, head ``h * GROUP + r % GROUP``; rows past ``BLOCK_Q * GROUP`` are padding).
  So each K/V tile is loaded once per group, not once per query head. ``BLOCK_M`` is 16 rows for decode-only
  batches (the least ``tl.dot`` takes) and 64 when a prefill chunk is present.
* Query blocks are numbered ``query_start_loc[b] // BLOCK_Q + b + i``; a program finds its sequence ``b`` by a
  binary search over that (monotone) sequence, with no host sync. The numbering has a few holes; those programs
  exit at once.
* The program walks the keys ``0 .. last row's position`` in tiles of ``BLOCK_N`` keys (any page size: each key
  looks up its own page), with an online softmax in fp32 and base 2 (``exp2``, ``log2(e)`` folded into the
  scale). Causal mask: row at position ``p`` sees keys ``<= p``, where a sequence's query rows are its last
  ``q_len`` positions of ``seq_len``.
* Dequantization on load, with no dequantized tile (vLLM-style): int8 codes are cast to the query dtype, the
  **columns of S** are multiplied by ``k_scale[key]`` and the **columns of P** by ``v_scale[key]`` before P @ V.
  int4 uses a split dot over nibbles: the query is rotated by the Hadamard matrix (pages hold rotated K/V; the
  +-1 matrix is built in registers) and split into its even and odd channels. With centred codes
  ``c = u - 8`` a stored value is ``c * scale + const`` (``const = offset + 8 * scale``), so
  ``S = (Q_even @ C_lo^T + Q_odd @ C_hi^T) * k_scale[n] + sum(Q_rot) * k_const[n]`` per column ``n``. Keys
  carry one (scale, const) per group of 32 rotated channels: the sum runs over the groups, each with the
  query's channels of the other groups zeroed (two dots more per group; the K tile is loaded once); V
  accumulates ``P' @ C_lo`` and ``P' @ C_hi`` (``P' = P * v_scale``) plus a per-row ``sum(P * v_const)``. The
  epilogue rotates the output back with two more dots by H's even / odd rows, so even/odd channels never need
  interleaving. Split-dot was chosen over unpacking into a ``[BLOCK_N, D]`` tile (join + reshape) because it
  needs no register shuffle and, with the rotation folded into the query and the output, costs only two small
  dots per program; this is a design argument, not a GPU measurement. Head_dim 16 pads the nibble dots to 16.
* Precision: dots accumulate in fp32; P @ V operands are fp16 for quantized pages (codes are exact in fp16 and
  ``P * v_scale`` keeps 3 more bits than bf16: centring the codes and fp16 keep rounding errors, which would
  be common to all rotated channels, from piling up in output channel 0), the query dtype otherwise; fp32
  queries use IEEE fp32 dots. Under the CPU interpreter dots run on fp32 copies of the rounded operands
  (Triton 3.8's interpreter multiplies bf16 bit patterns as integers and casts integers to bf16 wrongly; it
  also truncates fp32 -> bf16 casts where GPUs round to nearest, which the tests' tolerances absorb).
* Split-K for long-context decode (after SGLang / LightLLM): grid ``(num_seqs, Hkv, max_splits)``, each program
  covers a fixed ``SPLIT_SIZE`` = 256 keys and writes its normalized fp32 partial output and log2-sum-exp;
  ``_merge_kernel`` (grid ``(num_seqs, Hq)``) combines them. The split count depends only on a sequence's own
  length, so its result does not depend on the rest of the batch. ``split_kv=None`` takes this path for
  decode-only batches whose longest context exceeds ``SPLIT_SIZE``.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from alise.kernels import reference
from alise.kernels.quant import (INT4_CENTER, KV_MODES, MODE_INT4, MODE_INT8, NIBBLE_BITS, NIBBLE_MASK,
                                 check_head_dim, hadamard_tile)

KV_TILE = 32             # BLOCK_N: keys per inner-loop iteration
MIN_DOT = 16             # tl.dot's smallest M / N / K
DECODE_BLOCK_M = MIN_DOT # rows per program for decode-only batches
PREFILL_BLOCK_M = 64     # rows per program when the batch has prefill chunks
SPLIT_SIZE = 256         # keys per split-K chunk (fixed, so results are batch-invariant)
MERGE_TILE = 16          # partial results merged per iteration of the merge kernel
LOG2E = tl.constexpr(1.4426950408889634)
TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}
NEG_BIG = tl.constexpr(-1.0e30)   # running-max start: finite, so fully masked rows give 0, not NaN


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """``a @ b`` accumulated in fp32, the operands already rounded to the MMA dtype. Under the CPU interpreter
    they are widened (exactly) to fp32 first: Triton 3.8's interpreter multiplies bf16 bit patterns as integers."""
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _nibbles(x):
    """Packed int4 bytes -> (even, odd) channel codes, centred to -8..7 (int32)."""
    return (x & NIBBLE_MASK).to(tl.int32) - INT4_CENTER, (x >> NIBBLE_BITS).to(tl.int32) - INT4_CENTER


@triton.jit
def _as(x, DTYPE: tl.constexpr):
    """Page values (float or integer codes) as ``DTYPE``, through fp32: exact, and the interpreter of Triton 3.8
    casts integers straight to bf16 wrongly (it reinterprets the value as bf16 bits)."""
    return x.to(tl.float32).to(DTYPE)


@triton.jit
def _find_sequence(q_block, query_start_loc_ptr, num_seqs, BLOCK_Q: tl.constexpr):
    """The last sequence b with ``query_start_loc[b] // BLOCK_Q + b <= q_block`` (binary search)."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid <= q_block:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _locate_keys(offs_n, kv_end, table_ptr, kv_head, stride_page_block, stride_page_slot, stride_page_head,
                 stride_k_scale_block, stride_k_scale_slot, stride_k_scale_head,
                 stride_v_scale_block, stride_v_scale_slot, stride_v_scale_head, BLOCK_SIZE: tl.constexpr):
    """int64 offsets of keys ``offs_n`` (masked past ``kv_end``) through the block table: into the pages, the K
    scales and the V scales (whose entries per key can differ: int4 keys carry a pair per channel group)."""
    key_ok = offs_n < kv_end
    block = tl.load(table_ptr + offs_n // BLOCK_SIZE, mask=key_ok, other=0).to(tl.int64)
    slot = offs_n % BLOCK_SIZE
    page_off = block * stride_page_block + slot * stride_page_slot + kv_head * stride_page_head
    k_scale_off = block * stride_k_scale_block + slot * stride_k_scale_slot + kv_head * stride_k_scale_head
    v_scale_off = block * stride_v_scale_block + slot * stride_v_scale_slot + kv_head * stride_v_scale_head
    return page_off, k_scale_off, v_scale_off, key_ok


@triton.jit
def _softmax_step(s, visible, m_i, l_i):
    """One online-softmax step on log2-scaled scores ``s``: returns (p, alpha, new max, new sum)."""
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _attend(q, row_pos, kv_start, kv_end, qk_scale, table_ptr, kv_head, k_ptr, v_ptr, k_scale_ptr, v_scale_ptr,
            stride_page_block, stride_page_slot, stride_page_head,
            stride_k_scale_block, stride_k_scale_slot, stride_k_scale_head,
            stride_v_scale_block, stride_v_scale_slot, stride_v_scale_head,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
            KV_MODE: tl.constexpr, PV_DTYPE: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """bf16 / fp32 / int8 pages: the (normalized output, running max, running sum) of keys [kv_start, kv_end)."""
    offs_d = tl.arange(0, HEAD_DIM)
    m_i = tl.full([BLOCK_M], NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start in range(kv_start, kv_end, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        page_off, k_scale_off, v_scale_off, key_ok = _locate_keys(
            offs_n, kv_end, table_ptr, kv_head, stride_page_block, stride_page_slot, stride_page_head,
            stride_k_scale_block, stride_k_scale_slot, stride_k_scale_head,
            stride_v_scale_block, stride_v_scale_slot, stride_v_scale_head, BLOCK_SIZE)
        k = tl.load(k_ptr + page_off[:, None] + offs_d[None, :], mask=key_ok[:, None], other=0)
        s = _dot(q, tl.trans(_as(k, q.dtype)), PRECISION, INTERPRET)                  # (M, N)
        if KV_MODE == MODE_INT8:                                                        # scale S's columns
            s = s * tl.load(k_scale_ptr + k_scale_off, mask=key_ok, other=0).to(tl.float32)[None, :]
        visible = key_ok[None, :] & (offs_n[None, :] <= row_pos[:, None])
        p, alpha, m_i, l_i = _softmax_step(s * qk_scale, visible, m_i, l_i)
        if KV_MODE == MODE_INT8:                                                        # scale P's columns
            p = p * tl.load(v_scale_ptr + v_scale_off, mask=key_ok, other=0).to(tl.float32)[None, :]
        v = tl.load(v_ptr + page_off[:, None] + offs_d[None, :], mask=key_ok[:, None], other=0)
        acc = acc * alpha[:, None] + _dot(p.to(PV_DTYPE), _as(v, PV_DTYPE), PRECISION, INTERPRET)
    return acc / tl.where(l_i > 0, l_i, 1.0)[:, None], m_i, l_i


@triton.jit
def _attend_int4(q, row_pos, kv_start, kv_end, qk_scale, table_ptr, kv_head, k_ptr, v_ptr, k_scale_ptr, v_scale_ptr,
                 stride_page_block, stride_page_slot, stride_page_head,
                 stride_k_scale_block, stride_k_scale_slot, stride_k_scale_head,
                 stride_v_scale_block, stride_v_scale_slot, stride_v_scale_head,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                 LOG2_D: tl.constexpr, HALF: tl.constexpr, K_GROUPS: tl.constexpr, PV_DTYPE: tl.constexpr,
                 PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """int4 pages (rotated, asymmetric): same contract as ``_attend``, by split dots over the nibbles.

    With centred codes ``c = u - 8``, a stored value is ``c * scale + (offset + 8 * scale)``: the dots see
    codes in -8..7 (exact in bf16/fp16) and the per-key constant is folded in separately. ``HALF`` is
    ``HEAD_DIM // 2`` padded to tl.dot's minimum of 16 (head_dim 16); padded columns meet zero Hadamard entries.
    """
    offs_d = tl.arange(0, HEAD_DIM)
    half = tl.arange(0, HALF)
    half_ok = half < HEAD_DIM // 2
    norm = 1.0 / tl.sqrt(HEAD_DIM * 1.0)
    # the query's rotated even / odd channels, (M, HALF) each, and the sum of all its rotated channels
    h_even = tl.where(half_ok[None, :], hadamard_tile(offs_d, 2 * half, LOG2_D), 0.0)        # (D, HALF)
    h_odd = tl.where(half_ok[None, :], hadamard_tile(offs_d, 2 * half + 1, LOG2_D), 0.0)
    q_even = (_dot(q, h_even.to(q.dtype), PRECISION, INTERPRET) * norm).to(q.dtype)
    q_odd = (_dot(q, h_odd.to(q.dtype), PRECISION, INTERPRET) * norm).to(q.dtype)
    q_sum = tl.sum(q_even.to(tl.float32), 1) + tl.sum(q_odd.to(tl.float32), 1)
    m_i = tl.full([BLOCK_M], NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc_even = tl.zeros([BLOCK_M, HALF], tl.float32)
    acc_odd = tl.zeros([BLOCK_M, HALF], tl.float32)
    acc_const = tl.zeros([BLOCK_M], tl.float32)           # sum_n P[:, n] * v_const[n], the same for every channel
    for start in range(kv_start, kv_end, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        page_off, k_scale_off, v_scale_off, key_ok = _locate_keys(
            offs_n, kv_end, table_ptr, kv_head, stride_page_block, stride_page_slot, stride_page_head,
            stride_k_scale_block, stride_k_scale_slot, stride_k_scale_head,
            stride_v_scale_block, stride_v_scale_slot, stride_v_scale_head, BLOCK_SIZE)
        byte_ok = key_ok[:, None] & half_ok[None, :]
        k_even, k_odd = _nibbles(tl.load(k_ptr + page_off[:, None] + half[None, :], mask=byte_ok, other=0))
        k_even, k_odd = tl.trans(_as(k_even, q.dtype)), tl.trans(_as(k_odd, q.dtype))     # (HALF, N)
        s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        tl.static_assert(K_GROUPS == 1 or HALF == HEAD_DIM // 2)   # groups index the unpadded half
        for g in tl.static_range(K_GROUPS):     # each channel group of the keys has its own (scale, offset)
            if K_GROUPS == 1:
                q_even_g, q_odd_g, q_sum_g = q_even, q_odd, q_sum
            else:                               # the query's channels of group g, the others zeroed
                in_group = (half // (HEAD_DIM // 2 // K_GROUPS) == g)[None, :]
                q_even_g, q_odd_g = tl.where(in_group, q_even, 0.0), tl.where(in_group, q_odd, 0.0)
                q_sum_g = tl.sum(q_even_g.to(tl.float32), 1) + tl.sum(q_odd_g.to(tl.float32), 1)
            k_scale = tl.load(k_scale_ptr + k_scale_off + 2 * g, mask=key_ok, other=0).to(tl.float32)
            k_const = (tl.load(k_scale_ptr + k_scale_off + 2 * g + 1, mask=key_ok, other=0).to(tl.float32)
                       + INT4_CENTER * k_scale)
            s += ((_dot(q_even_g, k_even, PRECISION, INTERPRET) + _dot(q_odd_g, k_odd, PRECISION, INTERPRET))
                  * k_scale[None, :] + q_sum_g[:, None] * k_const[None, :])           # (M, N)
        visible = key_ok[None, :] & (offs_n[None, :] <= row_pos[:, None])
        p, alpha, m_i, l_i = _softmax_step(s * qk_scale, visible, m_i, l_i)
        v_scale = tl.load(v_scale_ptr + v_scale_off, mask=key_ok, other=0).to(tl.float32)
        v_const = tl.load(v_scale_ptr + v_scale_off + 1, mask=key_ok, other=0).to(tl.float32) + INT4_CENTER * v_scale
        p_scaled = (p * v_scale[None, :]).to(PV_DTYPE)
        v_even, v_odd = _nibbles(tl.load(v_ptr + page_off[:, None] + half[None, :], mask=byte_ok, other=0))
        acc_even = acc_even * alpha[:, None] + _dot(p_scaled, _as(v_even, PV_DTYPE), PRECISION, INTERPRET)
        acc_odd = acc_odd * alpha[:, None] + _dot(p_scaled, _as(v_odd, PV_DTYPE), PRECISION, INTERPRET)
        acc_const = acc_const * alpha + tl.sum(p * v_const[None, :], 1)
    inv_l = 1.0 / tl.where(l_i > 0, l_i, 1.0)
    out_even = (acc_even + acc_const[:, None]) * inv_l[:, None]
    out_odd = (acc_odd + acc_const[:, None]) * inv_l[:, None]
    # rotate back: out = out_rot @ H / sqrt(D), with H's even / odd rows
    out = (_dot(out_even, tl.trans(h_even), PRECISION, INTERPRET)
           + _dot(out_odd, tl.trans(h_odd), PRECISION, INTERPRET)) * norm      # tf32 for half queries
    return out, m_i, l_i


@triton.jit
def _paged_attention_kernel(
        query_ptr, out_ptr, k_ptr, v_ptr, k_scale_ptr, v_scale_ptr, block_tables_ptr, seq_lens_ptr,
        query_start_loc_ptr, part_out_ptr, part_lse_ptr, sm_scale, num_seqs,
        stride_q_tok, stride_q_head, stride_o_tok, stride_o_head,
        stride_page_block, stride_page_slot, stride_page_head,
        stride_k_scale_block, stride_k_scale_slot, stride_k_scale_head,
        stride_v_scale_block, stride_v_scale_slot, stride_v_scale_head, stride_table,
        stride_part_tok, stride_part_head, stride_part_split, stride_lse_tok, stride_lse_head,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, KV_MODE: tl.constexpr, LOG2_D: tl.constexpr, HALF: tl.constexpr,
        K_GROUPS: tl.constexpr, SPLIT: tl.constexpr,
        PV_DTYPE: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    BLOCK_Q: tl.constexpr = BLOCK_M // GROUP
    kv_head = tl.program_id(1)
    if SPLIT > 0:                                   # split-K decode: program (sequence, kv head, split)
        seq = tl.program_id(0)
        q_first = 0
    else:                                           # unified: program (query block, kv head)
        q_block = tl.program_id(0)
        seq = _find_sequence(q_block, query_start_loc_ptr, num_seqs, BLOCK_Q)
        q_first = (q_block - tl.load(query_start_loc_ptr + seq) // BLOCK_Q - seq) * BLOCK_Q
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if q_first >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    first_pos = seq_len - q_len                     # position of the sequence's first query row

    # rows: (query token, head of the group)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_q = q_first + offs_m // GROUP
    row_head = kv_head * GROUP + offs_m % GROUP
    row_ok = (offs_m < BLOCK_Q * GROUP) & (row_q < q_len)
    row_pos = first_pos + row_q
    row_tok = (q_start + row_q).to(tl.int64)
    q = tl.load(query_ptr + row_tok[:, None] * stride_q_tok + row_head[:, None] * stride_q_head + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)

    kv_start = 0
    kv_end = first_pos + tl.minimum(q_len, q_first + BLOCK_Q)       # one past the last key any row sees
    if SPLIT > 0:
        split = tl.program_id(2)
        kv_start = split * SPLIT
        if kv_start >= kv_end:
            return
        kv_end = tl.minimum(kv_end, kv_start + SPLIT)

    table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_table
    qk_scale = sm_scale * LOG2E
    if KV_MODE == MODE_INT4:
        out, m_i, l_i = _attend_int4(q, row_pos, kv_start, kv_end, qk_scale, table_ptr, kv_head, k_ptr, v_ptr,
                                     k_scale_ptr, v_scale_ptr, stride_page_block, stride_page_slot,
                                     stride_page_head, stride_k_scale_block, stride_k_scale_slot,
                                     stride_k_scale_head, stride_v_scale_block, stride_v_scale_slot,
                                     stride_v_scale_head, BLOCK_M, BLOCK_N, BLOCK_SIZE, HEAD_DIM, LOG2_D, HALF,
                                     K_GROUPS, PV_DTYPE, PRECISION, INTERPRET)
    else:
        out, m_i, l_i = _attend(q, row_pos, kv_start, kv_end, qk_scale, table_ptr, kv_head, k_ptr, v_ptr,
                                k_scale_ptr, v_scale_ptr, stride_page_block, stride_page_slot, stride_page_head,
                                stride_k_scale_block, stride_k_scale_slot, stride_k_scale_head,
                                stride_v_scale_block, stride_v_scale_slot, stride_v_scale_head,
                                BLOCK_M, BLOCK_N, BLOCK_SIZE, HEAD_DIM, KV_MODE, PV_DTYPE, PRECISION, INTERPRET)

    if SPLIT > 0:                                   # partial result and its log2-sum-exp
        part = row_tok[:, None] * stride_part_tok + row_head[:, None] * stride_part_head + split * stride_part_split
        tl.store(part_out_ptr + part + offs_d[None, :], out, mask=row_ok[:, None])
        lse = row_tok * stride_lse_tok + row_head * stride_lse_head + split
        tl.store(part_lse_ptr + lse, m_i + tl.log2(l_i), mask=row_ok)
    else:
        o = row_tok[:, None] * stride_o_tok + row_head[:, None] * stride_o_head + offs_d[None, :]
        tl.store(out_ptr + o, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _merge_kernel(part_out_ptr, part_lse_ptr, out_ptr, seq_lens_ptr,
                  stride_part_tok, stride_part_head, stride_part_split, stride_lse_tok, stride_lse_head,
                  stride_o_tok, stride_o_head,
                  SPLIT: tl.constexpr, HEAD_DIM: tl.constexpr, MERGE_TILE: tl.constexpr):
    """Combine a decode token's split partials: ``out = sum_s 2**lse_s * out_s / sum_s 2**lse_s``."""
    tok = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    num_splits = tl.cdiv(tl.load(seq_lens_ptr + tok), SPLIT)
    offs_d = tl.arange(0, HEAD_DIM)
    part = part_out_ptr + tok * stride_part_tok + head * stride_part_head
    lse_ptr = part_lse_ptr + tok * stride_lse_tok + head * stride_lse_head
    m = tl.full([1], NEG_BIG, tl.float32)
    total = tl.zeros([1], tl.float32)
    acc = tl.zeros([HEAD_DIM], tl.float32)
    for first in range(0, num_splits, MERGE_TILE):
        offs_s = first + tl.arange(0, MERGE_TILE)
        ok = offs_s < num_splits
        lse = tl.load(lse_ptr + offs_s, mask=ok, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(lse, 0))
        alpha = tl.exp2(m - m_new)
        w = tl.exp2(lse - m_new)
        o = tl.load(part + offs_s[:, None] * stride_part_split + offs_d[None, :], mask=ok[:, None], other=0.0)
        acc = acc * alpha + tl.sum(w[:, None] * o, 0)
        total = total * alpha + tl.sum(w, 0)
        m = m_new
    tl.store(out_ptr + tok * stride_o_tok + head * stride_o_head + offs_d,
             (acc / total).to(out_ptr.dtype.element_ty))


def paged_attention(*, query: torch.Tensor, cache, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                    query_start_loc: torch.Tensor, max_query_len: int, max_seq_len: int, sm_scale: float,
                    split_kv: bool | None = None, block_n: int = KV_TILE,
                    prefill_block_m: int = PREFILL_BLOCK_M) -> torch.Tensor:
    """Causal attention of ``query [T, Hq, D]`` over paged KV; returns ``[T, Hq, D]`` in the query's dtype.

    ``split_kv``: True forces the split-K decode path (decode-only batches), False the unified one, None
    chooses. ``block_n`` / ``prefill_block_m`` override tile sizes (tests use small ones).
    """
    num_tokens, num_heads, head_dim = query.shape
    num_seqs = seq_lens.numel()
    num_kv_heads = cache.k.shape[2]
    group = _check_layout(query, cache)
    out = torch.empty_like(query)
    if num_tokens == 0:
        return out
    decode_only = max_query_len == 1
    use_split = (decode_only and max_seq_len > SPLIT_SIZE) if split_kv is None else split_kv
    if use_split and (not decode_only or num_tokens != num_seqs):
        raise ValueError("the split-K path serves decode-only batches (one query token per sequence)")
    rows = DECODE_BLOCK_M if decode_only else prefill_block_m
    block_m = max(rows, triton.next_power_of_2(group))
    quantized = cache.k_scale is not None
    k_scale = cache.k_scale if quantized else cache.k            # dummies: never read for float pages
    v_scale = cache.v_scale if quantized else cache.v
    kv_mode = KV_MODES[cache.kv_dtype]
    # P @ V operands: integer codes are exact in fp16, whose 3 more mantissa bits than bf16 keep P * v_scale
    # accurate; float pages use the query dtype
    pv_dtype = tl.float16 if quantized and query.dtype != torch.float32 else TL_DTYPES[query.dtype]
    if use_split:
        max_splits = triton.cdiv(max_seq_len, SPLIT_SIZE)
        part_out = torch.empty(num_tokens, num_heads, max_splits, head_dim, dtype=torch.float32, device=query.device)
        part_lse = torch.empty(num_tokens, num_heads, max_splits, dtype=torch.float32, device=query.device)
        grid = (num_seqs, num_kv_heads, max_splits)
    else:
        part_out = part_lse = out                                # dummies
        grid = (num_tokens // (block_m // group) + num_seqs, num_kv_heads)
    # tile / warp choice: the sm_90 compile (cuobjdump) spills no registers for head_dim 64 and 128 in every
    # mode with BLOCK_N 32 and 8 warps for the big tiles; chosen statically, not timed on a GPU
    num_warps = 4 if block_m <= DECODE_BLOCK_M and head_dim <= 64 else 8
    _paged_attention_kernel[grid](
        query, out, cache.k, cache.v, k_scale, v_scale, block_tables, seq_lens, query_start_loc,
        part_out, part_lse, sm_scale, num_seqs,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        cache.k.stride(0), cache.k.stride(1), cache.k.stride(2),
        k_scale.stride(0), k_scale.stride(1), k_scale.stride(2),
        v_scale.stride(0), v_scale.stride(1), v_scale.stride(2), block_tables.stride(0),
        part_out.stride(0), part_out.stride(1), part_out.stride(2) if use_split else 0,
        part_lse.stride(0), part_lse.stride(1),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=cache.k.shape[1], BLOCK_M=block_m, BLOCK_N=block_n,
        KV_MODE=kv_mode, LOG2_D=int(math.log2(head_dim)), HALF=max(MIN_DOT, head_dim // 2),
        K_GROUPS=reference.scale_groups(k_scale, cache.kv_dtype), SPLIT=SPLIT_SIZE if use_split else 0,
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        PV_DTYPE=pv_dtype, INTERPRET=query.device.type == "cpu", num_warps=num_warps)
    if use_split:
        _merge_splits(part_out, part_lse, out, seq_lens)
    return out


def _check_layout(query: torch.Tensor, cache) -> int:
    """Refuse shapes the kernel does not serve; returns the GQA group (query heads per kv head)."""
    num_heads, head_dim, num_kv_heads = query.shape[1], query.shape[2], cache.k.shape[2]
    check_head_dim(head_dim)
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    assert query.stride(-1) == 1 and cache.k.stride() == cache.v.stride() and cache.k.stride(-1) == 1
    return num_heads // num_kv_heads


def _merge_splits(part_out: torch.Tensor, part_lse: torch.Tensor, out: torch.Tensor, seq_lens: torch.Tensor) -> None:
    """Combine the split-K partial outputs ``[T, Hq, splits, D]`` by their log-sum-exps into ``out [T, Hq, D]``."""
    num_tokens, num_heads, _, head_dim = part_out.shape
    _merge_kernel[(num_tokens, num_heads)](
        part_out, part_lse, out, seq_lens, part_out.stride(0), part_out.stride(1), part_out.stride(2),
        part_lse.stride(0), part_lse.stride(1), out.stride(0), out.stride(1),
        SPLIT=SPLIT_SIZE, HEAD_DIM=head_dim, MERGE_TILE=MERGE_TILE)
