"""Attention kernels over the paged KV cache, and the backend switch.

The contract between the runner and the kernels (DESIGN.md, "KV cache layout"):

* Per layer, K and V each ``[num_blocks, block_size, num_kv_heads, head_dim]`` (bf16 / fp32 / int8);
  int4 packs two values per byte, ``[num_blocks, block_size, num_kv_heads, head_dim // 2]`` uint8.
* Scales beside them, ``[num_blocks, block_size, num_kv_heads, num_groups]`` fp32 (quantized dtypes only).
* A slot is ``block * block_size + offset``; slot -1 means "do not write".
* A batch is a flat list of query tokens ``[num_tokens, num_heads, head_dim]``; sequence ``b`` owns the
  query rows ``query_start_loc[b]:query_start_loc[b+1]``, which are the *last* tokens of its
  ``seq_lens[b]`` tokens of context (so decode has 1 query row, a prefill chunk many). Its blocks are
  ``block_tables[b, :ceil(seq_lens[b] / block_size)]``; entries after those are padding that kernels never read.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from alise.kernels import reference

KV_DTYPES = ("bf16", "fp32", "int8", "int4")
INT4_GROUP_SIZE = 32  # channels sharing one int4 scale


@dataclass
class LayerKVCache:
    """One layer's K and V pages plus their scales (``None`` for unquantized pages)."""

    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None
    v_scale: torch.Tensor | None
    kv_dtype: str

    @property
    def block_size(self) -> int:
        return self.k.shape[1]


def bytes_per_token(kv_dtype: str, num_kv_heads: int, head_dim: int) -> int:
    """Bytes of K+V (scales included) one token takes in one layer."""
    if kv_dtype == "fp32":
        return 2 * num_kv_heads * head_dim * 4
    if kv_dtype == "bf16":
        return 2 * num_kv_heads * head_dim * 2
    if kv_dtype == "int8":
        return 2 * num_kv_heads * (head_dim + 4)
    if kv_dtype == "int4":
        return 2 * num_kv_heads * (head_dim // 2 + 4 * (head_dim // INT4_GROUP_SIZE))
    raise ValueError(f"kv_dtype must be one of {KV_DTYPES}, got {kv_dtype!r}")


def allocate_layer_cache(*, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                         kv_dtype: str, device: torch.device | str = "cpu") -> LayerKVCache:
    """Zeroed pages (and scales) for one layer in the layout above."""
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    if kv_dtype in ("bf16", "fp32"):
        dtype = torch.bfloat16 if kv_dtype == "bf16" else torch.float32
        return LayerKVCache(torch.zeros(shape, dtype=dtype, device=device),
                            torch.zeros(shape, dtype=dtype, device=device), None, None, kv_dtype)
    if kv_dtype == "int8":
        groups, data_shape, data_dtype = 1, shape, torch.int8
    elif kv_dtype == "int4":
        groups, data_shape, data_dtype = head_dim // INT4_GROUP_SIZE, shape[:-1] + (head_dim // 2,), torch.uint8
    else:
        raise ValueError(f"kv_dtype must be one of {KV_DTYPES}, got {kv_dtype!r}")
    scale_shape = shape[:-1] + (groups,)
    return LayerKVCache(torch.zeros(data_shape, dtype=data_dtype, device=device),
                        torch.zeros(data_shape, dtype=data_dtype, device=device),
                        torch.zeros(scale_shape, dtype=torch.float32, device=device),
                        torch.zeros(scale_shape, dtype=torch.float32, device=device), kv_dtype)


def write_kv(*, key: torch.Tensor, value: torch.Tensor, cache: LayerKVCache, slot_mapping: torch.Tensor,
             backend: str = "torch") -> None:
    """Quantize (if needed) ``key``/``value`` ``[T, Hkv, D]`` and store token t at ``slot_mapping[t]``."""
    reference.write_kv(key=key, value=value, cache=cache, slot_mapping=slot_mapping)


def paged_attention(*, query: torch.Tensor, cache: LayerKVCache, block_tables: torch.Tensor,
                    seq_lens: torch.Tensor, query_start_loc: torch.Tensor, max_query_len: int,
                    max_seq_len: int, sm_scale: float, backend: str = "torch") -> torch.Tensor:
    """Causal attention of ``query`` ``[T, Hq, D]`` over each sequence's pages; returns ``[T, Hq, D]``."""
    return reference.paged_attention(query=query, cache=cache, block_tables=block_tables, seq_lens=seq_lens,
                                     query_start_loc=query_start_loc, max_query_len=max_query_len,
                                     max_seq_len=max_seq_len, sm_scale=sm_scale)
