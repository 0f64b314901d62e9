"""int4 key calibration: a per-layer key centre and channel balance that leave attention exact and shrink what
the int4 quantizer must represent (``quant.py``'s docstring has the measurements).

``calibrate_keys`` measures both once, at load, on ``key_calibration_text``; each layer's ``KeyCalibration``
then travels with its ``LayerKVCache``, and the kernel entry points (``kernels.write_kv`` / ``paged_attention``)
apply it: the model's attention never sees it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from alise.kernels import AttentionMetadata, allocate_layer_cache, get_backend

if TYPE_CHECKING:
    from alise.model import Llama

KEY_CALIBRATION_TOKENS = 512
KEY_BALANCE_EXPONENT = 0.1


def key_calibration_text() -> str:
    """Fixed real English text for ``calibrate_keys``: CPython's pydoc topics (sorted by name) from character
    300000 on, far from the start that the perplexity measurements score."""
    import pydoc_data.topics
    text = "\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    return text[300000:308000]


@dataclass
class KeyCalibration:
    """One layer's two ``(Hkv, D)`` fp32 tensors (or None); attention is unchanged by either.

    * ``center`` is subtracted from every key before it is stored. Softmax ignores a shift shared by all keys
      of a query (q.(k - c) = q.k - q.c, the same for every key), and the quantizer no longer spends its range
      on the keys' large per-channel offsets.
    * ``balance`` divides each key channel and multiplies the queries' same channel (q.k = (q*b).(k/b)): it
      shrinks key channels whose quantization error the queries would amplify.
    """

    center: torch.Tensor | None
    balance: torch.Tensor | None

    def keys(self, k: torch.Tensor) -> torch.Tensor:
        """Keys ``(T, Hkv, D)`` as they are stored: ``(k - center) / balance``, in float32."""
        # in fp32 (the calibration tensors are fp32): the int4 writer quantizes from fp32 anyway, and a bf16
        # k - center would round relative to the large offsets being removed
        if self.center is not None:
            k = k.float() - self.center
        if self.balance is not None:
            k = k / self.balance
        return k

    def queries(self, q: torch.Tensor) -> torch.Tensor:
        """Queries ``(T, Hq, D)`` times their kv head's ``balance``, in their own dtype."""
        if self.balance is None:
            return q
        T, _, head_dim = q.shape
        num_kv_heads = self.balance.shape[0]    # each query head uses its kv head's channel weights
        return (q.float().view(T, num_kv_heads, -1, head_dim) * self.balance[:, None]).view(q.shape).to(q.dtype)


@torch.inference_mode()
def calibrate_keys(model: Llama, token_ids: list[int]) -> list[KeyCalibration]:
    """Every layer's ``KeyCalibration`` from the model's queries and keys on ``token_ids``, for int4 pools. Both
    parts leave attention exact; they change what the quantizer sees.

    * ``center``: the mean key after RoPE. It removes the keys' per-channel offsets (large in the low-frequency
      RoPE channels, which barely rotate), so the quantizer's range is spent on what differs between keys.
    * ``balance``: per channel ``(E[k^2] / E[q^2]) ** KEY_BALANCE_EXPONENT`` of the centred keys and the queries
      of the kv head, normalized to unit RMS. A quantization error in key channel c moves the scores by
      ``q_c * error_c``, so channels where queries are small can be stored coarser; the exponent was chosen by
      measurement (``quant.py``: 0.05 / 0.1 / 0.15 / 0.2 / 0.5 gave +3.3 / +2.3 / +2.4 / +3.0 / worse).

    Token 0 (the attention sink, an outlier) is left out of both statistics.
    """
    num_tokens = len(token_ids)
    if num_tokens < 2:
        raise ValueError("calibrate_keys needs at least 2 calibration tokens")
    device, num_kv_heads = model.embed_tokens.weight.device, model.config.num_key_value_heads
    # the pass runs on fp32 pages of its own, without calibration: the model's plain keys and queries
    caches = [allocate_layer_cache(num_blocks=1, block_size=num_tokens, num_kv_heads=num_kv_heads,
                                   head_dim=model.config.head_dim, kv_dtype="fp32", device=device)
              for _ in model.layers]
    meta = AttentionMetadata(
        slot_mapping=torch.arange(num_tokens, device=device),
        block_tables=torch.tensor([[0]], dtype=torch.int32, device=device),
        seq_lens=torch.tensor([num_tokens], dtype=torch.int32, device=device),
        query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32, device=device),
        max_query_len=num_tokens, max_seq_len=num_tokens, backend=get_backend("torch"))
    attns = [layer.self_attn for layer in model.layers]
    inputs = {}   # attention module -> its (normed x, cos, sin) of the calibration pass
    hooks = [attn.register_forward_pre_hook(lambda module, args: inputs.__setitem__(module, args[:3]))
             for attn in attns]
    try:
        model(torch.tensor(token_ids, dtype=torch.int64, device=device), torch.arange(num_tokens, device=device),
              caches, meta)
    finally:
        for hook in hooks:
            hook.remove()
    calibrations = []
    for attn in attns:
        q, k, _ = attn.project(*inputs[attn])
        q, k = q[1:].float(), k[1:].float()                                    # (n, Hq, D), (n, Hkv, D)
        center = k.mean(0)                                                     # (Hkv, D)
        key_energy = (k - center).pow(2).mean(0)                               # (Hkv, D)
        query_energy = q.unflatten(1, (num_kv_heads, -1)).pow(2).mean((0, 2))  # (Hkv, D)
        balance = (key_energy / query_energy.clamp_min(1e-12)).clamp_min(1e-12) ** KEY_BALANCE_EXPONENT
        balance = balance / balance.pow(2).mean(-1, keepdim=True).sqrt()
        calibrations.append(KeyCalibration(center, balance))    # fp32 (see KeyCalibration.keys)
    return calibrations
