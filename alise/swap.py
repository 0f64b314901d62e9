"""Host copies of a preempted request's KV pages (ALISE's swap), and their way back into the pool."""
from __future__ import annotations

import torch

from alise import kernels


class KVSwap:
    """Copies blocks of every layer's pool to host memory and back, exact or compressed (``swap_kv_dtype``)."""

    def __init__(self, caches: list[kernels.LayerKVCache], *, kv_dtype: str, swap_kv_dtype: str, num_kv_heads: int,
                 head_dim: int, device: torch.device):
        self.caches, self.device, self.head_dim = caches, device, head_dim
        # swapped-out KV: copied in the pool's own format (exact; "auto", or its legacy name "bf16"), or, for
        # unquantized pools, compressed on the way out when swap_kv_dtype is "int8" / "int4" (lossy: outputs
        # then depend on the load); quantized pages are always copied as they are
        exact = kv_dtype in ("int8", "int4") or swap_kv_dtype in ("auto", "bf16")
        self.kv_dtype = kv_dtype if exact else swap_kv_dtype       # the host copies' format
        self.compress = self.kv_dtype != kv_dtype
        self.bytes_per_token = len(caches) * kernels.bytes_per_token(self.kv_dtype, num_kv_heads, head_dim)

    def copy_out(self, blocks: list[int]) -> list[tuple]:
        """Host copy of ``blocks``' pages in every layer, compressed to ``kv_dtype`` if the pool is not in it."""
        index = torch.tensor(blocks, device=self.device)
        saved = []
        for c in self.caches:
            if self.compress:   # (n, bs, Hkv, D) -> quantized data + scales, in the pool formats (int4 key groups)
                key_groups = kernels.reference.int4_key_groups(self.head_dim) if self.kv_dtype == "int4" else 1
                saved.append(tuple(t.to("cpu") for page, groups in ((c.k[index], key_groups), (c.v[index], 1))
                                   for t in kernels.reference.quantize(page.float(), self.kv_dtype,
                                                                      groups=groups)))
            else:
                saved.append(tuple(t[index].to("cpu") for t in (c.k, c.v, c.k_scale, c.v_scale) if t is not None))
        return saved

    def copy_in(self, host: list[tuple], blocks: list[int]) -> None:
        """Write ``copy_out``'s pages back into ``blocks`` (decompressed into the pool's format if need be)."""
        index = torch.tensor(blocks, device=self.device)
        for cache, saved in zip(self.caches, host):
            if self.compress:
                k_data, k_scale, v_data, v_scale = (t.to(self.device) for t in saved)
                cache.k[index] = self._decompress(k_data, k_scale).to(cache.k.dtype)
                cache.v[index] = self._decompress(v_data, v_scale).to(cache.v.dtype)
            else:
                live = [t for t in (cache.k, cache.v, cache.k_scale, cache.v_scale) if t is not None]
                for dst, src in zip(live, saved):
                    dst[index] = src.to(self.device)

    def _decompress(self, data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if self.kv_dtype == "int4":   # int4 codes live in the Hadamard-rotated basis (kernels/reference.py)
            return kernels.reference.dequantize_int4(data, scale, unrotate=True)
        return kernels.reference.dequantize(data, scale, self.kv_dtype)
