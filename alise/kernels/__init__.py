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

The runner hands the layers all of a step's side of this contract in one ``AttentionMetadata``; each layer's
``attend`` call passes it, with the layer's ``LayerKVCache``, to ``write_kv`` and ``paged_attention``. A cache
may carry its layer's int4 key calibration (``calibration.py``), which these two entry points apply.

Backends: ``"torch"`` runs ``reference.py`` (the CPU backend); ``"triton"`` runs ``quant.py`` / ``attention.py``
(on CUDA, or on the CPU under Triton's interpreter; they need a power-of-two head_dim >= 16). The engine
resolves ``"auto"``, the runner then the backend itself, once (``get_backend``); the metadata carries it. Triton
is imported lazily, so ``import alise`` never imports it.
"""
from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from alise.kernels import native, reference

if TYPE_CHECKING:
    from alise.kernels.calibration import KeyCalibration

KV_DTYPES = ("bf16", "fp32", "int8", "int4")
BACKENDS = ("torch", "triton")
DECODE_ARGS = ("query", "cache", "block_tables", "seq_lens", "sm_scale")    # what native.decode_attention takes
SCALE_DTYPE = reference.SCALE_DTYPE


@dataclass
class LayerKVCache:
    """One layer's K and V pages plus their scales (``None`` for unquantized pages)."""

    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None
    v_scale: torch.Tensor | None
    kv_dtype: str
    calibration: KeyCalibration | None = None    # int4 pools: applied by write_kv and paged_attention

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


class TorchBackend:
    """``reference.py``: the CPU backend and the oracle. It keeps what it derives from a step's metadata in the
    step's ``scratch``; Triton's ``split_kv`` and tile sizes mean nothing to it. On int8 / int4 pages the writer
    and decode attention run ``native.py``'s C kernels where they build (the same arithmetic in one pass, not
    dozens of tensor ops); a mixed step's decode rows attend apart from its prefill chunks (``MixedSplit``)."""

    name = "torch"

    @staticmethod
    def write_kv(*, key: torch.Tensor, value: torch.Tensor, cache: LayerKVCache, slot_mapping: torch.Tensor,
                 scratch: dict | None, all_slots_valid: bool) -> None:
        if cache.k_scale is not None and native.write_kv(key=key, value=value, cache=cache,
                                                         slot_mapping=slot_mapping):
            return                                     # int8 / int4 pages: the C quantizer where it builds
        reference.write_kv(key=key, value=value, cache=cache, slot_mapping=slot_mapping, scratch=scratch,
                           all_slots_valid=all_slots_valid)

    @classmethod
    def paged_attention(cls, args: dict, *, scratch: dict | None, split_kv: bool | None,
                        options: dict) -> torch.Tensor:
        if args["max_query_len"] == 1:
            return cls.decode(args, scratch)
        split = reference.per_step(scratch, "mixed_split", lambda: MixedSplit.of(args))
        if split is None:
            return reference.paged_attention(**args, scratch=scratch)
        # a mixed step: its decode rows attend alone, and only the prefilling sequences take the padded grid
        # (otherwise every decode row would be padded to the longest chunk: B x chunk query rows)
        query = args["query"]
        out = torch.empty_like(query)
        out[split.decode_rows] = cls.decode(dict(args, query=query[split.decode_rows], **split.decode_meta),
                                            reference.sub_scratch(scratch, "decode"))
        out[split.prefill_rows] = reference.paged_attention(
            **dict(args, query=query[split.prefill_rows], **split.prefill_meta),
            scratch=reference.sub_scratch(scratch, "prefill"))
        return out

    @staticmethod
    def decode(args: dict, scratch: dict | None) -> torch.Tensor:
        decode_args = {k: args[k] for k in DECODE_ARGS}
        if args["cache"].k_scale is not None:          # int8 / int4 pages: the C kernel where it builds
            out = native.decode_attention(**decode_args)
            if out is not None:
                return out
        return reference.decode_attention(**decode_args, scratch=scratch)


@dataclass
class MixedSplit:
    """A step that mixes decode rows (one query row) with prefill chunks, as two batches (``TorchBackend``)."""

    decode_rows: torch.Tensor      # (Td,) the decode sequences' query rows
    prefill_rows: torch.Tensor     # (Tp,) the prefilling sequences' query rows, in order
    decode_meta: dict              # block_tables, seq_lens of the decode sequences
    prefill_meta: dict             # block_tables, seq_lens, query_start_loc, max_query_len, max_seq_len

    @staticmethod
    def of(args: dict) -> MixedSplit | None:
        """The split of a step's metadata, or None unless it has both kinds of sequence."""
        starts, tables, seq_lens = args["query_start_loc"], args["block_tables"], args["seq_lens"]
        q_lens = starts.diff()                                                     # (B,)
        decode, prefill = q_lens == 1, q_lens > 1
        if not (bool(decode.any()) and bool(prefill.any())):
            return None
        row_in_prefill = prefill.repeat_interleave(q_lens, output_size=args["query"].shape[0])   # (T,)
        prefill_lens = q_lens[prefill]
        prefill_starts = torch.cat([starts.new_zeros(1), prefill_lens.cumsum(0)]).to(starts.dtype)
        return MixedSplit(
            decode_rows=starts[:-1][decode].long(), prefill_rows=row_in_prefill.nonzero().squeeze(1),
            decode_meta=dict(block_tables=tables[decode], seq_lens=seq_lens[decode]),
            prefill_meta=dict(block_tables=tables[prefill], seq_lens=seq_lens[prefill],
                              query_start_loc=prefill_starts, max_query_len=int(prefill_lens.max()),
                              max_seq_len=int(seq_lens[prefill].max())))


class TritonBackend:
    """``quant.py`` and ``attention.py``, imported (and on a CPU device run by Triton's interpreter) here."""

    name = "triton"

    def __init__(self, device: torch.device):
        self._quant, self._attention = _triton("quant", device), _triton("attention", device)

    def write_kv(self, *, scratch: dict | None, all_slots_valid: bool, **kv) -> None:   # (the reference's two)
        self._quant.write_kv(**kv)

    def paged_attention(self, args: dict, *, scratch: dict | None, split_kv: bool | None,
                        options: dict) -> torch.Tensor:
        return self._attention.paged_attention(**args, split_kv=split_kv, **options)


Backend = TorchBackend | TritonBackend


def get_backend(name: str, device: torch.device | str = "cpu") -> Backend:
    """The backend called ``name``, resolved once: an engine keeps it, and every step's metadata carries it."""
    _check_backend(name)
    return TorchBackend() if name == "torch" else TritonBackend(torch.device(device))


@dataclass
class AttentionMetadata:
    """Where each query row's sequence and K/V live; built once per step by the runner, shared by all layers."""

    slot_mapping: torch.Tensor     # (T,) int64: cache slot of each new token, -1 = do not write
    block_tables: torch.Tensor     # (B, max_blocks) int32
    seq_lens: torch.Tensor         # (B,) int32: context length after this step
    query_start_loc: torch.Tensor  # (B + 1,) int32: sequence b owns query rows [start[b], start[b+1])
    max_query_len: int
    max_seq_len: int
    backend: Backend               # get_backend's, resolved once per engine
    # no slot is -1: write_kv need not check (a check on tensor values, which would split a compiled graph)
    all_slots_valid: bool = False
    # what a backend derives from the fields above once and reuses in every layer (kernels.write_kv)
    scratch: dict = field(default_factory=dict, repr=False)


def write_kv(*, key: torch.Tensor, value: torch.Tensor, cache: LayerKVCache, slot_mapping: torch.Tensor,
             backend: str | Backend = "torch", scratch: dict | None = None, all_slots_valid: bool = False) -> None:
    """Quantize (if needed) ``key``/``value`` ``[T, Hkv, D]`` and store token t at ``slot_mapping[t]``.

    Keys go through the cache's key calibration first, if it has one. ``backend``: a name or ``get_backend``'s
    object. ``scratch``: an empty dict per step, shared by every layer's calls, where the torch backend keeps what
    it derives from the step's metadata (so it is derived once, not once per layer). ``all_slots_valid``: the
    caller knows that no slot is -1, so the torch backend skips checking.
    """
    backend = get_backend(backend, key.device) if isinstance(backend, str) else backend
    if cache.calibration is not None:
        key = cache.calibration.keys(key)
    backend.write_kv(key=key, value=value, cache=cache, slot_mapping=slot_mapping, scratch=scratch,
                     all_slots_valid=all_slots_valid)


def paged_attention(*, query: torch.Tensor, cache: LayerKVCache, block_tables: torch.Tensor,
                    seq_lens: torch.Tensor, query_start_loc: torch.Tensor, max_query_len: int,
                    max_seq_len: int, sm_scale: float, backend: str | Backend = "torch",
                    scratch: dict | None = None, split_kv: bool | None = None, **triton_options) -> torch.Tensor:
    """Causal attention of ``query`` ``[T, Hq, D]`` over each sequence's pages; returns ``[T, Hq, D]``.

    Queries go through the cache's key calibration first, if it has one. Triton only: ``split_kv`` forces the
    split-K decode path on (True) or off (False); None picks it for decode-only batches with long contexts.
    ``triton_options`` (``block_n``, ``prefill_block_m``) override tile sizes; see ``attention.py``.
    ``backend``, ``scratch``: as for ``write_kv``.
    """
    backend = get_backend(backend, query.device) if isinstance(backend, str) else backend
    if cache.calibration is not None:
        query = cache.calibration.queries(query)
    args = dict(query=query, cache=cache, block_tables=block_tables, seq_lens=seq_lens,
                query_start_loc=query_start_loc, max_query_len=max_query_len, max_seq_len=max_seq_len,
                sm_scale=sm_scale)
    return backend.paged_attention(args, scratch=scratch, split_kv=split_kv, options=triton_options)


def attend(*, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cache: LayerKVCache,
           meta: AttentionMetadata, sm_scale: float) -> torch.Tensor:
    """One layer's attention in a step: query ``[T, Hq, D]``, new keys and values ``[T, Hkv, D]`` -> ``[T, Hq, D]``."""
    # write the new K/V into their pages first, then read the whole context back through the block table
    write_kv(key=key, value=value, cache=cache, slot_mapping=meta.slot_mapping, backend=meta.backend,
             scratch=meta.scratch, all_slots_valid=meta.all_slots_valid)
    return paged_attention(query=query, cache=cache, block_tables=meta.block_tables, seq_lens=meta.seq_lens,
                           query_start_loc=meta.query_start_loc, max_query_len=meta.max_query_len,
                           max_seq_len=meta.max_seq_len, sm_scale=sm_scale, backend=meta.backend,
                           scratch=meta.scratch)
