"""Torch reference of every kernel: the readable definition, the CPU backend and the test oracle.

Quantization formats (the Triton kernels in ``quant.py`` / ``attention.py`` implement exactly these):

* **int8**: symmetric, one fp16 scale per (token, kv head): ``scale = absmax / 127``, ``q = round(x / scale)``,
  ``x ~= q * scale``.
* **int4**: the head vector is first rotated by the orthonormal Hadamard matrix ``H / sqrt(D)`` (Sylvester order;
  ``H`` is symmetric with entries +-1), then quantized asymmetrically, one fp16 (scale, offset) pair per (token,
  kv head and group of channels): ``offset <= min``, ``scale = (max - offset) / 15``, ``u = round((x - offset) /
  scale)`` in 0..15, ``x ~= u * scale + offset``. Keys use groups of ``INT4_KEY_GROUP`` rotated channels (two
  pairs for head_dim 64), values one group per head vector; the pairs are stored in group order, ``(scale_0,
  offset_0, scale_1, offset_1, ...)``. Two codes per byte: low nibble = even channel, high nibble = odd channel.
  The cache therefore holds *rotated* K and V. Attention is invariant when the query is rotated the same way
  (``(qR) . (kR) = q . k`` for orthonormal ``R``), and the output comes back with one more multiply by ``R``
  (``R`` is its own inverse). See ``quant.py`` for the measurements behind this choice. (The engine also
  stores int4 keys minus a per-layer mean key and balances key and query channels, ``kernels/calibration.py``:
  exact for attention, smaller error.)

Rounding is ``floor(y + 0.5)`` (to nearest) everywhere, never truncation, and the same in the kernels, so the
Triton writer reproduces these codes. Scales are floored at fp16's smallest normal number (``SCALE_MIN``), so an
all-zero row gives codes 0 and dequantizes to exact zeros, never NaN; they are capped at fp16's max, so values
beyond ~8e6 (int8) or ~6e4 (int4, after rotation) would saturate (real K/V stay far below).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SCALE_DTYPE = torch.float16
SCALE_MIN = 2.0 ** -14          # fp16's smallest normal: a floor that keeps x / scale finite
SCALE_MAX = 65504.0             # fp16's largest finite value
INT8_MAX = 127                  # symmetric int8 codes in [-127, 127]
INT4_MAX = 15                   # unsigned int4 codes in [0, 15]
CODE_CENTER = 8                 # int4 decode works on centred codes u - 8 (``_int4_codes``)
INT4_KEY_GROUP = 32             # rotated key channels per int4 (scale, offset) pair; values use one pair per head
SDPA_LENGTH_STEP = 64           # prefill SDPA runs at query and key lengths padded to multiples of this
OFFSET_MARGIN = 2.0 ** -10      # the int4 offset is lowered by this relative margin before rounding to fp16,
                                # so the stored offset is <= the row minimum and every code stays >= 0


def round_half_up(y: torch.Tensor) -> torch.Tensor:
    """Round to nearest (ties up), written the way the Triton kernels write it."""
    return torch.floor(y + 0.5)


# ----------------------------------------------------------------------------------------------------------------
# Hadamard rotation (int4)
# ----------------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=16)
def _hadamard(n: int, device: str) -> torch.Tensor:
    """Sylvester Hadamard matrix with entries +-1, ``H[i, j] = (-1) ** popcount(i & j)`` (symmetric)."""
    if n & (n - 1):
        raise ValueError(f"int4 KV needs a power-of-two head_dim, got {n}")
    i = torch.arange(n)
    bits = torch.bitwise_and(i[:, None], i[None, :])
    parity = torch.zeros_like(bits)
    for b in range(max(1, n.bit_length())):
        parity ^= (bits >> b) & 1
    return (1 - 2 * parity).to(torch.float32).to(device)


def rotate(x: torch.Tensor) -> torch.Tensor:
    """``x @ H / sqrt(D)`` over the last dim, in fp32. Orthonormal and its own inverse."""
    d = x.shape[-1]
    return (x.float() @ _hadamard(d, str(x.device))) * (1.0 / math.sqrt(d))


# ----------------------------------------------------------------------------------------------------------------
# quantize / dequantize
# ----------------------------------------------------------------------------------------------------------------

def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [..., D]`` -> codes int8 ``[..., D]`` and fp16 scales ``[..., 1]``."""
    x = x.float()
    scale = (x.abs().amax(-1, keepdim=True) / INT8_MAX).clamp(SCALE_MIN, SCALE_MAX).to(SCALE_DTYPE)
    q = round_half_up(x / scale.float()).clamp(-INT8_MAX, INT8_MAX)
    return q.to(torch.int8), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float().mul_(scale)


def pack_int4(u: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 ``[..., D]`` -> bytes ``[..., D // 2]``: low nibble = even channel, high nibble = odd."""
    u = u.to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """Bytes ``[..., D // 2]`` -> codes 0..15 ``[..., D]`` (inverse of ``pack_int4``)."""
    return torch.stack([p & 0xF, p >> 4], dim=-1).flatten(-2)


def int4_key_groups(head_dim: int) -> int:
    """How many (scale, offset) pairs an int4 key of ``head_dim`` channels carries."""
    return max(1, head_dim // INT4_KEY_GROUP)


def scale_groups(scale: torch.Tensor | None, kv_dtype: str) -> int:
    """(scale, offset) pairs per vector held by an int4 scale tensor (keys: ``int4_key_groups``); 1 otherwise."""
    return scale.shape[-1] // 2 if kv_dtype == "int4" else 1


def quantize_int4(x: torch.Tensor, *, groups: int = 1, rotated: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [..., D]`` -> packed uint8 ``[..., D // 2]`` and fp16 ``[..., 2 * groups]`` = (scale, offset) per
    group of ``D // groups`` consecutive channels. ``x`` is rotated first unless ``rotated`` says it already is.
    """
    x = x.float() if rotated else rotate(x)
    x = x.unflatten(-1, (groups, -1))                            # (..., G, D / G)
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    offset = (lo - lo.abs() * OFFSET_MARGIN).clamp(-SCALE_MAX, SCALE_MAX).to(SCALE_DTYPE).float()
    scale = ((hi - offset) / INT4_MAX).clamp(SCALE_MIN, SCALE_MAX).to(SCALE_DTYPE).float()
    u = round_half_up((x - offset) / scale).clamp(0, INT4_MAX)
    return pack_int4(u.flatten(-2)), torch.cat([scale, offset], -1).flatten(-2).to(SCALE_DTYPE)


def dequantize_int4(p: torch.Tensor, params: torch.Tensor, *, unrotate: bool = False) -> torch.Tensor:
    """Packed int4 + (scale, offset) pairs -> fp32 values, still in the rotated basis unless ``unrotate``."""
    groups = params.shape[-1] // 2
    x = torch.empty(p.shape[:-1] + (2 * p.shape[-1],), dtype=torch.float32, device=p.device)
    x[..., 0::2] = p & 0xF                                       # written in place: fewer big temporaries,
    x[..., 1::2] = p >> 4                                        # which matters on the CPU backend
    grouped = x.unflatten(-1, (groups, -1))                      # (..., G, D / G), a view of x
    pairs = params.unflatten(-1, (groups, 2))
    grouped.mul_(pairs[..., :1]).add_(pairs[..., 1:])
    return rotate(x) if unrotate else x


def quantize(x: torch.Tensor, kv_dtype: str, *, groups: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x [..., D]`` -> (stored data, scales or None) for any kv dtype (``groups``: int4's pairs per vector)."""
    if kv_dtype == "bf16":
        return x.to(torch.bfloat16), None
    if kv_dtype == "fp32":
        return x.to(torch.float32), None
    if kv_dtype == "int8":
        return quantize_int8(x)
    if kv_dtype == "int4":
        return quantize_int4(x, groups=groups)
    raise ValueError(f"unknown kv_dtype {kv_dtype!r}")


def dequantize(data: torch.Tensor, scale: torch.Tensor | None, kv_dtype: str) -> torch.Tensor:
    """Stored data -> values in fp32 (bf16/fp32 pages keep their dtype). int4 stays in the rotated basis."""
    if kv_dtype in ("bf16", "fp32"):
        return data
    if kv_dtype == "int8":
        return dequantize_int8(data, scale)
    if kv_dtype == "int4":
        return dequantize_int4(data, scale)
    raise ValueError(f"unknown kv_dtype {kv_dtype!r}")


# ----------------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------------

def per_step(scratch: dict | None, key: str, build):
    """``build()``, memoized in ``scratch`` when given: tensors derived from a step's metadata are the same in
    every layer, so the runner passes one dict per step and the work happens once instead of once per layer."""
    if scratch is None:
        return build()
    if key not in scratch:
        scratch[key] = build()
    return scratch[key]


def sub_scratch(scratch: dict | None, name: str) -> dict | None:
    """A step's scratch for one part of a split batch (its own masks and plans), kept inside the step's own."""
    return None if scratch is None else scratch.setdefault(f"part/{name}", {})


def write_kv(*, key: torch.Tensor, value: torch.Tensor, cache, slot_mapping: torch.Tensor,
             scratch: dict | None = None, all_slots_valid: bool = False) -> None:
    """Quantize and store token t's K/V ``[T, Hkv, D]`` at slot ``slot_mapping[t]`` (skip -1).

    ``scratch["write_kv"]`` holds ``(rows kept or None, their slots)``; a caller that knows every slot is real
    passes ``all_slots_valid``, which skips the -1 check (the compiled decode step does).
    """
    def written():                                              # rows to store and where, -1 filtered out
        keep = slot_mapping >= 0
        return (None, slot_mapping.long()) if bool(keep.all()) else (keep, slot_mapping[keep].long())
    keep, slots = (None, slot_mapping.long()) if all_slots_valid else per_step(scratch, "write_kv", written)
    num_slots = cache.k.shape[0] * cache.k.shape[1]
    if keep is not None:
        key, value = key[keep], value[keep]
    num_kv_heads = key.shape[1]
    if cache.kv_dtype == "int4":    # one rotation for both; keys and values group their channels differently
        rotated = rotate(torch.cat([key, value], dim=1)).split(num_kv_heads, dim=1)   # K, V: (T, Hkv, D)
        stored = [quantize_int4(x, groups=scale_groups(scale, "int4"), rotated=True)
                  for x, scale in zip(rotated, (cache.k_scale, cache.v_scale))]
    else:           # one quantizer call for both (a decode step's few rows cost in op count, not in bytes)
        data, scales = quantize(torch.cat([key.to(value.dtype), value], dim=1), cache.kv_dtype)  # (T, 2 Hkv, ...)
        stored = zip(data.split(num_kv_heads, dim=1),
                     (None, None) if scales is None else scales.split(num_kv_heads, dim=1))
    for (codes, params), pages, scale in zip(stored, (cache.k, cache.v), (cache.k_scale, cache.v_scale)):
        pages.view(num_slots, *pages.shape[2:])[slots] = codes
        if scale is not None:
            scale.view(num_slots, *scale.shape[2:])[slots] = params


def gather_kv(cache, block_tables: torch.Tensor, max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's K and V in order, dequantized: ``[B, max_seq_len, Hkv, D]`` (padding past its length).

    int4 K/V come back in the rotated basis (see the module docstring).
    """
    gather = functools.partial(gather_pages, block_tables=block_tables, max_len=max_seq_len)
    if cache.k_scale is None:
        return gather(cache.k), gather(cache.v)
    return (dequantize(gather(cache.k), gather(cache.k_scale), cache.kv_dtype),
            dequantize(gather(cache.v), gather(cache.v_scale), cache.kv_dtype))


@dataclass
class PaddingPlan:
    """How a step's ragged query rows sit on the padded ``(B, max_query_len)`` grid, and what each row sees."""

    seq_of_token: torch.Tensor   # (T,) grid coordinates of each query row
    row_of_token: torch.Tensor
    mask: torch.Tensor           # (B, 1, G * Mq, L) bool: key visible


def padding_plan(*, seq_lens: torch.Tensor, query_start_loc: torch.Tensor, num_tokens: int, group: int,
                 max_query_len: int, max_seq_len: int) -> PaddingPlan:
    batch = seq_lens.numel()
    device = seq_lens.device
    q_lens = query_start_loc[1:] - query_start_loc[:-1]          # (B,)
    # place each query row at (sequence, row within its chunk) of a padded (B, Mq) grid
    seq_of_token = torch.repeat_interleave(torch.arange(batch, device=device), q_lens, output_size=num_tokens)
    row_of_token = torch.arange(num_tokens, device=device) - query_start_loc[seq_of_token]
    # query row i of sequence b sits at position seq_len - q_len + i and sees keys 0..that position
    q_pos = (seq_lens - q_lens)[:, None] + torch.arange(max_query_len, device=device)[None]  # (B, Mq)
    k_pos = torch.arange(max_seq_len, device=device)
    mask = k_pos[None, None, :] <= q_pos[:, :, None]             # (B, Mq, L)
    mask = mask[:, None].expand(batch, group, max_query_len, max_seq_len).reshape(batch, 1, -1, max_seq_len)
    return PaddingPlan(seq_of_token, row_of_token, mask)


def paged_attention(*, query: torch.Tensor, cache, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                    query_start_loc: torch.Tensor, max_query_len: int, max_seq_len: int,
                    sm_scale: float, scratch: dict | None = None) -> torch.Tensor:
    """Causal attention of ragged query rows over paged KV, vectorized by padding every sequence.

    Gathers and dequantizes the pages, then runs one SDPA over a padded ``(B, max_query_len)`` query grid, with
    the query heads of each kv head stacked as extra query rows (GQA without copying K/V per query head).
    Decode batches (one row per sequence) take ``decode_attention``.
    ``scratch``: see ``per_step`` (the padding plan, or decode's mask, is built once per step).
    """
    if max_query_len == 1:
        return decode_attention(query=query, cache=cache, block_tables=block_tables, seq_lens=seq_lens,
                                sm_scale=sm_scale, scratch=scratch)
    num_tokens, num_heads, head_dim = query.shape
    batch = seq_lens.numel()
    num_kv_heads = cache.k.shape[2]
    group = num_heads // num_kv_heads
    rotated = cache.kv_dtype == "int4"
    # the padded grid's lengths go up to a multiple of SDPA_LENGTH_STEP: the CPU flash-attention kernel compiles a
    # micro-kernel per distinct tile shape and keeps it for the life of the process, so exact lengths made memory
    # grow with every new prompt length (README, "Memory under load"); the extra rows and keys are masked
    max_query_len, max_seq_len = (-(-n // SDPA_LENGTH_STEP) * SDPA_LENGTH_STEP for n in (max_query_len, max_seq_len))
    width = -(-max_seq_len // cache.k.shape[1])                  # table columns the padded keys read
    extra = width - block_tables.shape[1]
    if extra > 0:                                                # read block 0 there: any valid page, masked
        tables = block_tables                                    # padded once per step, not once per layer
        block_tables = per_step(scratch, "padded_tables", lambda: F.pad(tables, (0, extra)))
    plan = per_step(scratch, f"padding_plan/{group}", lambda: padding_plan(
        seq_lens=seq_lens, query_start_loc=query_start_loc, num_tokens=num_tokens, group=group,
        max_query_len=max_query_len, max_seq_len=max_seq_len))
    k, v = gather_kv(cache, block_tables, max_seq_len)          # (B, L, Hkv, D)
    query = rotate(query).to(query.dtype) if rotated else query
    q = query.new_zeros(batch, max_query_len, num_heads, head_dim)
    q[plan.seq_of_token, plan.row_of_token] = query              # (B, Mq, Hq, D)
    q = q.view(batch, max_query_len, num_kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)   # (B, Hkv, G, Mq, D)
    out = F.scaled_dot_product_attention(
        q.reshape(batch, num_kv_heads, group * max_query_len, head_dim),
        k.transpose(1, 2).to(q.dtype), v.transpose(1, 2).to(q.dtype),
        attn_mask=plan.mask, scale=sm_scale)                     # (B, Hkv, G * Mq, D)
    out = out.view(batch, num_kv_heads, group, max_query_len, head_dim).permute(0, 3, 1, 2, 4)
    out = out.reshape(batch, max_query_len, num_heads, head_dim)  # (B, Mq, Hq, D)
    out = out[plan.seq_of_token, plan.row_of_token]              # (T, Hq, D)
    return rotate(out).to(query.dtype) if rotated else out


def decode_attention(*, query: torch.Tensor, cache, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                     sm_scale: float, scratch: dict | None = None) -> torch.Tensor:
    """``paged_attention`` for one query row per sequence (decode): ``query`` ``[B, Hq, D]``.

    Reads every block of each row of ``block_tables`` and hides the keys at and past ``seq_lens[b]``, so the
    shapes depend only on the table's width and nothing branches on tensor values: ``torch.compile`` traces it
    whole (``ModelRunner``'s compiled decode step), and padding columns of the table are harmless.

    Float pages go through one SDPA. Quantized pages are never dequantized: attention runs on the codes, with
    the scales applied to the scores and the probabilities, as the Triton kernel does (``_attention_on_codes``).
    """
    batch, num_heads, head_dim = query.shape
    num_kv_heads = cache.k.shape[2]
    max_len = block_tables.shape[1] * cache.k.shape[1]
    visible = per_step(scratch, "decode_mask", lambda: torch.arange(max_len, device=query.device)[None]
                        < seq_lens[:, None])                     # (B, L)
    q = query.view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)   # the query heads of each kv head
    if cache.k_scale is None:
        k, v = (gather_pages(x, block_tables, max_len).transpose(1, 2) for x in (cache.k, cache.v))  # (B, Hkv, L, D)
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=visible[:, None, None, :],
                                             scale=sm_scale)   # (B, Hkv, G, D)
    else:
        out = _attention_on_codes(q, cache, block_tables, visible, sm_scale, scratch)
    return out.reshape(batch, num_heads, head_dim).to(query.dtype)


def gather_pages(x: torch.Tensor, block_tables: torch.Tensor, max_len: int) -> torch.Tensor:
    """Each sequence's entries of a paged tensor ``(NB, bs, Hkv, E)`` in order: ``(B, max_len, Hkv, E)``."""
    batch, block_size = block_tables.shape[0], x.shape[1]
    width = -(-max_len // block_size)                            # the table columns that hold max_len entries
    pages = x.index_select(0, block_tables[:, :width].reshape(-1))  # (B * width, bs, Hkv, E)
    return pages.view(batch, width * block_size, *x.shape[2:])[:, :max_len]


def _codes(x: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """int8 codes ``(B, L, Hkv, D)`` -> the same values in ``dtype``, one row of every kv head per token
    ``(B, L, Hkv * D)``, into ``out`` when given (a buffer every layer of a step reuses)."""
    out = torch.empty(x.shape, dtype=dtype, device=x.device) if out is None else out.view(x.shape)
    return out.copy_(x).flatten(2)


def _int4_codes(packed: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """Packed int4 ``(B, L, Hkv, D/2)`` -> *centred* codes ``u - 8`` in -8..7, ``(B, L, Hkv * D)`` of ``dtype``,
    each head's channels in *nibble order*: its low nibbles (even channels) first, then its high ones (odd
    channels). Unpacking into that order takes two strided copies; interleaving back into channel order would be
    a third pass. Centred, the dot products carry no large common term for the offsets to cancel afterwards,
    which in bf16 would lose most of their 8 significant bits.
    """
    batch, length, heads, half = packed.shape
    out = torch.empty(batch, length, heads, 2, half, dtype=dtype, device=packed.device) if out is None else \
        out.view(batch, length, heads, 2, half)
    # u - 8 as a byte wraps to u + 248, which is u - 8 read as a signed byte
    out[..., 0, :] = (packed & 0xF).sub_(CODE_CENTER).view(torch.int8)
    out[..., 1, :] = (packed >> 4).sub_(CODE_CENTER).view(torch.int8)
    return out.flatten(2)


def nibble_order(x: torch.Tensor) -> torch.Tensor:
    """Reorder channels ``(..., D)`` into ``_int4_codes``'s order: evens, then odds."""
    return x.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)


def channel_order(x: torch.Tensor) -> torch.Tensor:
    """Inverse of ``nibble_order``."""
    return x.unflatten(-1, (2, -1)).transpose(-1, -2).flatten(-2)


def _block_diagonal(q: torch.Tensor) -> torch.Tensor:
    """``(B, Hkv, R, D)`` rows per kv head -> ``(B, Hkv * R, Hkv * D)``: row (h, r) holds ``q[:, h, r]`` in
    kv head h's columns and zeros elsewhere, so one matmul against whole token rows ``(L, Hkv * D)`` gives
    every head's dot products with no transposed copy of the context (Hkv times the flops, on tiny rows)."""
    batch, heads, rows, head_dim = q.shape
    eye = _eye(heads, q.dtype, str(q.device))
    return (q[:, :, :, None, :] * eye[:, None, :, None]).reshape(batch, heads * rows, heads * head_dim)


@functools.lru_cache(maxsize=16)
def _eye(n: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    return torch.eye(n, dtype=dtype, device=device)


@functools.lru_cache(maxsize=16)
def _group_mask(groups: int, head_dim: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """``(groups, D)`` 0/1 in nibble order: row n marks the channels of int4 key group n."""
    return nibble_order(torch.eye(groups, dtype=dtype, device=device).repeat_interleave(head_dim // groups, dim=1))


def _attention_on_codes(q: torch.Tensor, cache, block_tables: torch.Tensor, visible: torch.Tensor,
                        sm_scale: float, scratch: dict | None = None) -> torch.Tensor:
    """Decode attention of ``q`` ``(B, Hkv, G, D)`` over int8 / int4 pages; returns float32 ``(B, Hkv, G, D)``.

    Pages are never dequantized element by element. The codes are converted to the query's dtype (exact: int8
    and int4 codes are small integers, bf16 holds them) and the scales act on the small ``(query, key)``
    tensors instead: with key n's scale ``s_n`` (int4: and offset ``o_n``) per group of channels,
    ``q . k_n = sum_groups s_n,g (q_g . u_n,g) + o_n,g sum(q_g)``, and with value n's scale ``t_n`` (offset
    ``w_n``), ``sum_n p_n v_n = (p * t) @ u + sum_n p_n w_n``. The dot products are one matmul per step of
    each side against whole token rows (``_block_diagonal``), so the context is read in the layout the pages
    gather into, with no transposed copy. A bf16 model's dot products come out of the matmul in bf16 (8
    significant bits) before the scales, softmax and sums, which run in float32. int4 pages hold
    Hadamard-rotated vectors: ``q`` is rotated in and the output rotated back.
    """
    batch, heads, group, head_dim = q.shape
    max_len = visible.shape[1]
    dtype = q.dtype         # the codes are exact in bf16 too; matmuls in the model's dtype read half the bytes
    k_params, v_params = (gather_pages(x, block_tables, max_len).float().permute(0, 2, 3, 1)
                          for x in (cache.k_scale, cache.v_scale))                 # (B, Hkv, entries, L)
    k_codes, v_codes = (gather_pages(x, block_tables, max_len) for x in (cache.k, cache.v))
    shape = (batch, max_len, heads * head_dim)
    # eager: one buffer per step, reused by every layer; a compiled graph plans its own memory (and a key built
    # from the shapes would make it guard on them)
    buffer = None if torch.compiler.is_compiling() else per_step(
        scratch, f"codes/{shape}/{dtype}", lambda: torch.empty(shape, dtype=dtype, device=q.device))
    if cache.kv_dtype == "int8":
        scores = _block_diagonal(q) @ _codes(k_codes, dtype, buffer).transpose(1, 2)  # (B, Hkv * G, L)
        scores = scores.view(batch, heads, group, max_len).float() * k_params      # (B, Hkv, G, L)
    else:
        groups = k_params.shape[2] // 2
        q = nibble_order(rotate(q).to(dtype))                                      # (B, Hkv, G, D)
        # every group's partial dot products in the same matmul: query row (g, n) keeps group n's channels
        q_by_group = q[..., None, :] * _group_mask(groups, head_dim, dtype, str(q.device))  # (B, Hkv, G, groups, D)
        partial = _block_diagonal(q_by_group.flatten(2, 3)) @ _int4_codes(k_codes, dtype, buffer).transpose(1, 2)
        partial = partial.float().view(batch, heads, group, groups, max_len)       # (B, Hkv, G, groups, L)
        scale, offset = k_params[:, :, 0::2], k_params[:, :, 1::2]                 # (B, Hkv, groups, L)
        offset = offset + CODE_CENTER * scale                                      # for centred codes
        scores = (partial * scale[:, :, None]).sum(3) + q_by_group.float().sum(-1) @ offset  # (B, Hkv, G, L)
    hidden = per_step(scratch, "decode_hidden", lambda: ~visible[:, None, None, :])     # (B, 1, 1, L)
    scores = scores.mul_(sm_scale).masked_fill_(hidden, float("-inf"))
    probs = torch.softmax(scores, dim=-1)                                          # (B, Hkv, G, L) float32
    weights = (probs * v_params[:, :, :1]).to(dtype).view(batch, heads * group, max_len)
    values = _codes(v_codes, dtype, buffer) if cache.kv_dtype == "int8" else _int4_codes(v_codes, dtype, buffer)
    out = (weights @ values).view(batch, heads, group, heads, head_dim)            # every head's rows x columns
    out = out.diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2).float()                 # (B, Hkv, G, D): own heads
    if cache.kv_dtype == "int8":
        return out
    offset = v_params[:, :, 1:] + CODE_CENTER * v_params[:, :, :1]                 # for centred codes
    out = out + (probs * offset).sum(-1, keepdim=True)                             # nibble order; + the offsets
    return rotate(channel_order(out))
