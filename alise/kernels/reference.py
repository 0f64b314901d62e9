"""Torch reference of every kernel: the readable definition, the CPU backend and the test oracle."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def write_kv(*, key: torch.Tensor, value: torch.Tensor, cache, slot_mapping: torch.Tensor) -> None:
    """Store token t's K/V ``[T, Hkv, D]`` at slot ``slot_mapping[t]`` (skip -1)."""
    if cache.kv_dtype not in ("bf16", "fp32"):
        raise NotImplementedError(f"kv_dtype {cache.kv_dtype!r} is not implemented yet")
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    num_blocks, block_size = cache.k.shape[:2]
    cache.k.view(num_blocks * block_size, *cache.k.shape[2:])[slots] = key[keep].to(cache.k.dtype)
    cache.v.view(num_blocks * block_size, *cache.v.shape[2:])[slots] = value[keep].to(cache.v.dtype)


def gather_kv(cache, block_tables: torch.Tensor, max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's K and V in order, dequantized: ``[B, max_seq_len, Hkv, D]`` (padding past its length)."""
    block_size = cache.k.shape[1]
    num_blocks_needed = -(-max_seq_len // block_size)
    table = block_tables[:, :num_blocks_needed].long()          # (B, nb)
    k = cache.k[table].flatten(1, 2)[:, :max_seq_len]            # (B, nb * bs -> L, Hkv, D)
    v = cache.v[table].flatten(1, 2)[:, :max_seq_len]
    return k, v


def paged_attention(*, query: torch.Tensor, cache, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                    query_start_loc: torch.Tensor, max_query_len: int, max_seq_len: int,
                    sm_scale: float) -> torch.Tensor:
    """Causal attention of ragged query rows over paged KV, vectorized by padding every sequence."""
    num_tokens, num_heads, head_dim = query.shape
    batch = seq_lens.numel()
    k, v = gather_kv(cache, block_tables, max_seq_len)          # (B, L, Hkv, D)
    q_lens = query_start_loc[1:] - query_start_loc[:-1]          # (B,)
    # place each query row at (sequence, row within its chunk) of a padded (B, Mq) grid
    seq_of_token = torch.repeat_interleave(torch.arange(batch, device=query.device), q_lens, output_size=num_tokens)
    row_of_token = torch.arange(num_tokens, device=query.device) - query_start_loc[seq_of_token]
    q = query.new_zeros(batch, max_query_len, num_heads, head_dim)
    q[seq_of_token, row_of_token] = query                       # (B, Mq, Hq, D)
    # query row i of sequence b sits at position seq_len - q_len + i and sees keys 0..that position
    q_pos = (seq_lens - q_lens)[:, None] + torch.arange(max_query_len, device=query.device)[None]  # (B, Mq)
    k_pos = torch.arange(max_seq_len, device=query.device)
    mask = k_pos[None, None, :] <= q_pos[:, :, None]             # (B, Mq, L)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2).to(q.dtype), v.transpose(1, 2).to(q.dtype),
        attn_mask=mask[:, None], scale=sm_scale, enable_gqa=True)  # (B, Hq, Mq, D)
    return out.transpose(1, 2)[seq_of_token, row_of_token]       # (T, Hq, D)
