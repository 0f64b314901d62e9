"""Attention kernels over the paged KV cache, and the backend switch.

The contract between the runner and the kernels (docs/design.md, "KV cache layout"):

* Per layer, K and V each ``[num_blocks, block_size, num_kv_heads, head_dim]`` (bf16 / fp32 / int8);
  int4 packs two values per byte, ``[num_blocks, block_size, num_kv_heads, head_dim // 2]`` uint8
  (low nibble = even channel, high nibble = odd channel).
* Scales beside them, fp16 ``[num_blocks, block_size, num_kv_heads, entries]`` with ``entries`` from
  ``scale_entries``: one scale per (token, kv head) for int8; for int4, whose pages hold Hadamard-rotated K/V, a
  (scale, offset) pair per group of channels: ``head_dim // 32`` groups for keys, one for values (see
  ``reference.py`` for the formats and ``quant.py`` for why). K's and V's scale tensors can differ in shape.
* A slot is ``block * block_size + offset``; slot -1 means "do not write".
* A batch is a flat list of query tokens ``[num_tokens, num_heads, head_dim]``; sequence ``b`` owns the
  query rows ``query_start_loc[b]:query_start_loc[b+1]``, which are the *last* tokens of its
  ``seq_lens[b]`` tokens of context (so decode has 1 query row, a prefill chunk many). Its blocks are
  ``block_tables[b, :ceil(seq_lens[b] / block_size)]``; entries after those are padding: valid block ids
  (the torch decode path reads whole table rows and masks the keys past ``seq_lens[b]``).

Backends: ``"torch"`` runs ``reference.py`` (the CPU backend); ``"triton"`` runs ``quant.py`` / ``attention.py``
(on CUDA, or on the CPU under Triton's interpreter; they need a power-of-two head_dim >= 16). The engine
resolves ``"auto"`` before calling. Triton is imported lazily, so ``import alise`` never imports it.
"""
from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass

import torch

from alise.kernels import reference

KV_DTYPES = ("bf16", "fp32", "int8", "int4")
BACKENDS = ("torch", "triton")
SCALE_DTYPE = reference.SCALE_DTYPE


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


def _check_kv_dtype(kv_dtype: str) -> None:
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype must be one of {KV_DTYPES}, got {kv_dtype!r}")


def scale_entries(kv_dtype: str, head_dim: int) -> tuple[int, int]:
    """fp16 scale entries per (token, kv head) of K and of V: int8 one scale; int4 a (scale, offset) pair per
    group of channels (``reference.int4_key_groups`` for keys, one group for values); 0 for float pages."""
    _check_kv_dtype(kv_dtype)
    if kv_dtype == "int8":
        return 1, 1
    if kv_dtype == "int4":
        return 2 * reference.int4_key_groups(head_dim), 2
    return 0, 0


def bytes_per_token(kv_dtype: str, num_kv_heads: int, head_dim: int) -> int:
    """Bytes of K+V (scales included) one token takes in one layer."""
    _check_kv_dtype(kv_dtype)
    data_bytes = {"fp32": 4 * head_dim, "bf16": 2 * head_dim, "int8": head_dim, "int4": head_dim // 2}[kv_dtype]
    scale_bytes = sum(scale_entries(kv_dtype, head_dim)) * SCALE_DTYPE.itemsize
    return num_kv_heads * (2 * data_bytes + scale_bytes)


def allocate_layer_cache(*, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                         kv_dtype: str, device: torch.device | str = "cpu") -> LayerKVCache:
    """Zeroed pages (and scales) for one layer in the layout above."""
    _check_kv_dtype(kv_dtype)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    if kv_dtype in ("bf16", "fp32"):
        dtype = torch.bfloat16 if kv_dtype == "bf16" else torch.float32
        return LayerKVCache(torch.zeros(shape, dtype=dtype, device=device),
                            torch.zeros(shape, dtype=dtype, device=device), None, None, kv_dtype)
    if kv_dtype == "int4" and (head_dim & (head_dim - 1) or head_dim < 2):
        raise ValueError(f"int4 KV needs a power-of-two head_dim (Hadamard rotation), got {head_dim}")
    data_shape, data_dtype = (shape, torch.int8) if kv_dtype == "int8" else (shape[:-1] + (head_dim // 2,), torch.uint8)
    k_entries, v_entries = scale_entries(kv_dtype, head_dim)
    return LayerKVCache(torch.zeros(data_shape, dtype=data_dtype, device=device),
                        torch.zeros(data_shape, dtype=data_dtype, device=device),
                        torch.zeros(shape[:-1] + (k_entries,), dtype=SCALE_DTYPE, device=device),
                        torch.zeros(shape[:-1] + (v_entries,), dtype=SCALE_DTYPE, device=device), kv_dtype)


def enable_triton_interpreter() -> None:
    """Make Triton kernels run on the CPU (``TRITON_INTERPRET=1``). Must happen before triton is imported."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return
    if "triton" in sys.modules:
        raise RuntimeError("backend='triton' on the CPU needs Triton's interpreter, but triton was already "
                           "imported without TRITON_INTERPRET=1: set TRITON_INTERPRET=1 in the environment, or "
                           "call alise.kernels.enable_triton_interpreter() before anything imports triton")
    os.environ["TRITON_INTERPRET"] = "1"


def _triton(module: str, device: torch.device):
    """Import ``alise.kernels.<module>`` (and so triton) on first use."""
    if device.type == "cpu":
        enable_triton_interpreter()
    return importlib.import_module(f"alise.kernels.{module}")


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} (resolve 'auto' first), got {backend!r}")


def write_kv(*, key: torch.Tensor, value: torch.Tensor, cache: LayerKVCache, slot_mapping: torch.Tensor,
             backend: str = "torch", scratch: dict | None = None) -> None:
    """Quantize (if needed) ``key``/``value`` ``[T, Hkv, D]`` and store token t at ``slot_mapping[t]``.

    ``scratch``: an empty dict per step, shared by every layer's calls, where the torch backend keeps what it
    derives from the step's metadata (so it is derived once, not once per layer).
    """
    _check_backend(backend)
    if backend == "triton":
        _triton("quant", key.device).write_kv(key=key, value=value, cache=cache, slot_mapping=slot_mapping)
    else:
        reference.write_kv(key=key, value=value, cache=cache, slot_mapping=slot_mapping, scratch=scratch)


def paged_attention(*, query: torch.Tensor, cache: LayerKVCache, block_tables: torch.Tensor,
                    seq_lens: torch.Tensor, query_start_loc: torch.Tensor, max_query_len: int,
                    max_seq_len: int, sm_scale: float, backend: str = "torch", scratch: dict | None = None,
                    split_kv: bool | None = None, **triton_options) -> torch.Tensor:
    """Causal attention of ``query`` ``[T, Hq, D]`` over each sequence's pages; returns ``[T, Hq, D]``.

    Triton only: ``split_kv`` forces the split-K decode path on (True) or off (False); None picks it for
    decode-only batches with long contexts. ``triton_options`` (``block_n``, ``prefill_block_m``) override tile
    sizes; see ``attention.py``. ``scratch``: as for ``write_kv``.
    """
    _check_backend(backend)
    kwargs = dict(query=query, cache=cache, block_tables=block_tables, seq_lens=seq_lens,
                  query_start_loc=query_start_loc, max_query_len=max_query_len, max_seq_len=max_seq_len,
                  sm_scale=sm_scale)
    if backend == "triton":
        return _triton("attention", query.device).paged_attention(**kwargs, split_kv=split_kv,
                                                                     **triton_options)
    return reference.paged_attention(**kwargs, scratch=scratch)
