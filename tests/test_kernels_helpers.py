"""Shared helpers for the kernel tests: random paged batches and an independent dense attention."""
from __future__ import annotations

import math

import torch

from alise import kernels
from alise.kernels import reference


def random_pool(*, kv_dtype: str, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                seed: int, device="cpu", scale: float = 1.0):
    """A cache whose every slot holds random K/V (written through the reference writer)."""
    gen = torch.Generator().manual_seed(seed)
    cache = kernels.allocate_layer_cache(num_blocks=num_blocks, block_size=block_size, num_kv_heads=num_kv_heads,
                                         head_dim=head_dim, kv_dtype=kv_dtype, device=device)
    n = num_blocks * block_size
    k = torch.randn(n, num_kv_heads, head_dim, generator=gen) * scale
    v = torch.randn(n, num_kv_heads, head_dim, generator=gen) * scale
    k[:, :, 3] += 4 * scale                      # an outlier channel in K, like real models have
    kernels.write_kv(key=k.to(device), value=v.to(device), cache=cache, slot_mapping=torch.arange(n, device=device))
    return cache


def random_batch(*, lens, num_blocks: int, block_size: int, num_heads: int, head_dim: int, seed: int,
                 dtype=torch.bfloat16, device="cpu", repeat_blocks: bool = False, pad_value: int = 0):
    """Query rows and metadata for sequences ``lens = [(q_len, seq_len), ...]`` with random block tables.

    Tables are random permutations of the pool (or, with ``repeat_blocks``, draws with repetition, like
    shared prefixes); entries past a sequence's blocks are ``pad_value``.
    """
    gen = torch.Generator().manual_seed(seed)
    need = [math.ceil(s / block_size) for _, s in lens]
    width = max(need) + 1
    tables = torch.full((len(lens), width), pad_value, dtype=torch.int32)
    perm = torch.randperm(num_blocks, generator=gen)
    used = 0
    for b, nb in enumerate(need):
        if repeat_blocks:
            tables[b, :nb] = torch.randint(0, num_blocks, (nb,), generator=gen, dtype=torch.int32)
        else:
            tables[b, :nb] = perm[used:used + nb].int()
            used += nb
    q_lens = torch.tensor([q for q, _ in lens], dtype=torch.int32)
    query_start_loc = torch.zeros(len(lens) + 1, dtype=torch.int32)
    query_start_loc[1:] = q_lens.cumsum(0)
    query = torch.randn(int(q_lens.sum()), num_heads, head_dim, generator=gen).to(dtype)
    meta = dict(block_tables=tables.to(device), seq_lens=torch.tensor([s for _, s in lens], dtype=torch.int32, device=device),
                query_start_loc=query_start_loc.to(device), max_query_len=int(q_lens.max()),
                max_seq_len=max(s for _, s in lens), sm_scale=1.0 / math.sqrt(head_dim))
    return query.to(device), meta


def dequantized_pages(cache) -> tuple[torch.Tensor, torch.Tensor]:
    """The pool's K and V in the original basis, fp32 ``[num_blocks, block_size, Hkv, D]``."""
    if cache.k_scale is None:
        return cache.k.float(), cache.v.float()
    k = reference.dequantize(cache.k, cache.k_scale, cache.kv_dtype).float()
    v = reference.dequantize(cache.v, cache.v_scale, cache.kv_dtype).float()
    if cache.kv_dtype == "int4":
        k, v = reference.rotate(k), reference.rotate(v)       # the rotation is its own inverse
    return k, v


def dense_attention(query, k_pages, v_pages, *, block_tables, seq_lens, query_start_loc, sm_scale, **_):
    """Independent definition: per sequence, gather its keys in order and run a plain causal softmax (fp64)."""
    out = torch.empty(query.shape, dtype=torch.float64)
    num_heads = query.shape[1]
    block_size = k_pages.shape[1]
    for b in range(seq_lens.numel()):
        seq_len = int(seq_lens[b])
        q0, q1 = int(query_start_loc[b]), int(query_start_loc[b + 1])
        if q1 == q0:
            continue
        keys, values = [], []
        for pos in range(seq_len):
            block = int(block_tables[b, pos // block_size])
            keys.append(k_pages[block, pos % block_size])
            values.append(v_pages[block, pos % block_size])
        k = torch.stack(keys).double()                          # (L, Hkv, D)
        v = torch.stack(values).double()
        group = num_heads // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)   # (L, Hq, D)
        for i, t in enumerate(range(q0, q1)):
            pos = seq_len - (q1 - q0) + i                       # this row's position: sees keys 0..pos
            q = query[t].double()                               # (Hq, D)
            scores = torch.einsum("hd,lhd->hl", q, k[:pos + 1]) * sm_scale
            weights = torch.softmax(scores, dim=-1)
            out[t] = torch.einsum("hl,lhd->hd", weights, v[:pos + 1])
    return out
