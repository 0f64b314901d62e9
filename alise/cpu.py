"""The CPU's speed paths, kept out of ``model.py`` (gpt-fast style: they swap the model's modules).

* ``pack_model``: eager engines run every bf16 projection on oneDNN's pre-packed weight (``PackedLinear``).
* ``CompiledDecode``: ``compile=True`` engines run decode steps through one ``torch.compile`` graph, whose
  projections switch to float32 GEMMs for large bf16 batches (``fp32_gemm``, ``Fp32GemmLinear``).

Both compute what the plain model computes (same bf16 linear, other kernels); ``tests/test_model.py`` and
``tests/test_compile.py`` check it.
"""
from __future__ import annotations

import contextlib
import sys
import warnings
from typing import TYPE_CHECKING, Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from alise import kernels

if TYPE_CHECKING:
    from alise.model import Llama

# torch.compile specializes a dimension of size 1, so compiled decode steps pad the batch and the block tables
# to at least this many rows / columns: every decode step then runs on one compiled graph
MIN_COMPILED_DIM = 2
# compiled bf16 decode steps with at least this many rows run their projections on float32 GEMMs
# (``fp32_gemm``): compute-bound there, where the float32 GEMM beats oneDNN's bf16 one on CPUs without
# AMX; fewer rows wait on reading the weights, which float32 doubles
FP32_GEMM_MIN_ROWS = 32
# eager packed GEMMs pad their rows to powers of two up to this, then to multiples of it (``row_bucket``)
ROW_BUCKET = 64


# ----------------------------------------------------------------------------------------------------------------
# oneDNN weight packing (eager engines)
# ----------------------------------------------------------------------------------------------------------------

def can_pack_for_cpu(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16
            and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pack_for_cpu(weight: torch.Tensor) -> torch.Tensor:
    """oneDNN's blocked copy of a ``(out, in)`` bf16 weight, laid out for few-row inputs (decode)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` on a weight from ``pack_for_cpu``."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class PackedLinear(nn.Module):
    """A projection on a weight pre-packed for the CPU's GEMM kernels (``pack_model``); bias as it was.

    torch's CPU matmul re-lays-out a plain bf16 weight on every call; oneDNN's pre-packed blocked layout skips
    that: the same results, faster GEMVs (docs/design.md, "Measured choices").
    """

    def __init__(self, weight: torch.Tensor, bias: nn.Parameter | None):
        super().__init__()
        self.packed = pack_for_cpu(weight)     # the same bytes as the weight, which the module no longer holds
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]                                        # x: (T, in)
        padded = row_bucket(rows)
        if padded == rows:
            return packed_linear(x, self.packed, self.bias)
        return packed_linear(F.pad(x, (0, 0, 0, padded - rows)), self.packed, self.bias)[:rows]


def row_bucket(rows: int) -> int:
    """The row count a packed GEMM runs at: ``rows`` rounded up to a power of two up to ``ROW_BUCKET``, then to a
    multiple of it. oneDNN keeps state for every GEMM shape it runs (a primitive and its buffers); a serving
    engine's steps produce every row count, and a few dozen buckets bound that state, for at most
    ``ROW_BUCKET - 1`` padding rows (the engine alone then levels off under varied load: README, "Serve over
    HTTP")."""
    if rows <= ROW_BUCKET:
        return 1 << max(rows - 1, 0).bit_length()
    return -(-rows // ROW_BUCKET) * ROW_BUCKET


def _replace_linears(root: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> None:
    """Swap every ``nn.Linear`` under ``root`` for ``make(linear)``, in place (same parameter names)."""
    for name, child in root.named_children():
        if isinstance(child, nn.Linear):
            setattr(root, name, make(child))
        else:
            _replace_linears(child, make)


def pack_model(model: Llama) -> Llama:
    """Pre-pack every bf16 projection for the CPU (``PackedLinear``); a no-op elsewhere.

    The packed copy replaces each projection's weight (same bytes); a tied head keeps the embedding table for
    token lookups and gets a packed copy of it as its ``lm_head``. Call after moving the model to its device.
    """
    _replace_linears(model, lambda linear: PackedLinear(linear.weight, linear.bias)
                     if can_pack_for_cpu(linear.weight) else linear)
    if model.lm_head is None and can_pack_for_cpu(model.embed_tokens.weight):
        model.lm_head = PackedLinear(model.embed_tokens.weight, None)
    return model


# ----------------------------------------------------------------------------------------------------------------
# float32 GEMMs for bf16 projections (compiled engines)
# ----------------------------------------------------------------------------------------------------------------

# Set by ``fp32_gemm`` (a global, like autocast, because it changes every projection of the model at once)
_FP32_GEMM = False


@contextlib.contextmanager
def fp32_gemm(enabled: bool = True) -> Iterator[None]:
    """Within this context bf16 projections run as float32 GEMMs on exact float32 copies of their operands.

    The result is a bf16 linear all the same (bf16 inputs and weights, float32 accumulation, rounded to bf16:
    what oneDNN's bf16 GEMM computes), but on CPUs without AMX the float32 GEMMs are the faster kernels once a
    GEMM has enough rows to be compute-bound (README, "Speed on a CPU"). Meant for a ``torch.compile`` graph
    with freezing, which folds ``weight.float()`` into a constant once (eager, it would convert every weight on
    every call). The float32 weights are twice the bytes to stream from memory: with few rows that dominates,
    and bf16 is faster (``CompiledDecode`` switches at ``FP32_GEMM_MIN_ROWS``).
    """
    global _FP32_GEMM
    previous, _FP32_GEMM = _FP32_GEMM, enabled
    try:
        yield
    finally:
        _FP32_GEMM = previous


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, on float32 GEMMs inside ``fp32_gemm``."""
    if _FP32_GEMM and x.dtype == torch.bfloat16:
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)
    return F.linear(x, weight, bias)


class Fp32GemmLinear(nn.Module):
    """A projection whose GEMM follows ``fp32_gemm`` (``linear``); the same weight and bias parameters."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None):
        super().__init__()
        self.weight, self.bias = weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


# ----------------------------------------------------------------------------------------------------------------
# the compiled decode step
# ----------------------------------------------------------------------------------------------------------------

class CompiledDecode:
    """``compute_logits(model(...))`` of a decode step, and each row's argmax, as one ``torch.compile`` graph.

    Inductor fuses each layer's ~100 small eager ops (norms, RoPE, KV write, attention's gather and mask)
    into a few C++ loops; freezing makes the weights constants that it packs for oneDNN, and cpp_wrapper
    calls the kernels with no Python in between (``run`` sets both). ``dynamic=True``: one graph for every
    batch size >= 2 and table width >= 2 (``MIN_COMPILED_DIM``); a second one, compiled when a bf16 batch first
    reaches ``FP32_GEMM_MIN_ROWS`` rows, runs the projections on float32 GEMMs (``fp32_gemm``). The frozen,
    packed weights are further copies beside the eager model's (which prefill steps use): bf16 for the first
    graph, float32 for the second. Its speed-up and its memory, measured: README, "Speed on a CPU".

    Padding rows and table columns point at ``null_block``, a page of the pool that the allocator never hands
    out. If compiling fails, ``run`` warns, packs the model for eager steps and returns None.
    """

    def __init__(self, model: Llama, caches: list[kernels.LayerKVCache], *, null_block: int, block_size: int):
        for cache in caches:   # the pages never change shape: no size symbols (or guards relating them)
            for t in (cache.k, cache.v, cache.k_scale, cache.v_scale):
                if t is not None:
                    torch._dynamo.mark_static(t)
        # the layers' projections follow fp32_gemm; the head stays a bf16 GEMM inside it: measured, a float32
        # copy of the default model's head would add ~270 MB to a compiled graph, for a GEMM no faster (it
        # streams twice the bytes)
        _replace_linears(model.layers, lambda linear: Fp32GemmLinear(linear.weight, linear.bias))

        def decode_logits(input_ids: torch.Tensor, positions: torch.Tensor, meta: kernels.AttentionMetadata):
            # a closure, not a bound method: dynamo then sees the weights as the module's parameters, which
            # freezing needs in order to pack them
            logits = model.compute_logits(model(input_ids, positions, caches, meta))    # (B, V) float32
            # greedy rows' tokens in the same pass over the logits (sample() would read them again)
            return logits, logits.argmax(dim=-1)
        self.graph = torch.compile(decode_logits, dynamic=True)
        self.model, self.null_block, self.block_size = model, null_block, block_size
        # float32 GEMMs for bf16 weights (fp32_gemm) pay off without AMX, where oneDNN's bf16 GEMM is slow
        amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
        self.fp32_gemm_helps = model.embed_tokens.weight.dtype == torch.bfloat16 and not amx
        self.graphs: set[bool] = set()    # fp32_gemm settings with a compiled graph

    def uses_fp32_gemm(self, num_rows: int) -> bool:
        return num_rows >= FP32_GEMM_MIN_ROWS and self.fp32_gemm_helps

    def compiles(self, num_rows: int) -> bool:
        """Whether a step of ``num_rows`` sequences compiles its graph first."""
        return self.uses_fp32_gemm(num_rows) not in self.graphs

    def pad(self, input_ids: list[int], positions: list[int], slots: list[int], seq_lens: list[int],
            query_start: list[int], block_tables: list[list[int]]) -> None:
        """Pad a decode step's lists in place to ``MIN_COMPILED_DIM`` rows and table columns, on the null block:
        ``(B,)`` -> ``(max(B, 2),)`` rows, tables ``(B, W)`` -> ``(max(B, 2), max(W, 2))``."""
        null, width = self.null_block, max(max(map(len, block_tables)), MIN_COMPILED_DIM)
        block_tables[:] = [t + [null] * (width - len(t)) for t in block_tables]
        for _ in range(MIN_COMPILED_DIM - len(input_ids)):    # a 1-token sequence on the null block
            input_ids.append(0)
            positions.append(0)
            slots.append(null * self.block_size)
            seq_lens.append(1)
            query_start.append(query_start[-1] + 1)
            block_tables.append([null] * width)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: kernels.AttentionMetadata, *,
            num_rows: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The padded step's float32 logits ``(B, V)`` and their argmax ``(B,)`` (``num_rows`` of them real), or
        None if torch.compile fails (the caller then runs eager steps from then on)."""
        fp32 = self.uses_fp32_gemm(num_rows)
        if fp32 not in self.graphs:
            rows = f" for batches of {'>=' if fp32 else '<'} {FP32_GEMM_MIN_ROWS}" if self.fp32_gemm_helps else ""
            print(f"alise: compiling the decode step{rows} with torch.compile (once per engine; about a minute "
                  f"on 2 CPU cores)", file=sys.stderr, flush=True)
            self.graphs.add(fp32)
        # inductor reads these two when it compiles (the first call, and any recompile), not from compile()'s
        # options: patched around every call, they apply to this graph only
        # no "duck sizing" either: dims that happen to be equal at the first step (2 rows, 2 table columns) would
        # otherwise share a symbol, and a recompile would follow when they part
        # dynamo guards on fp32_gemm's setting, so each setting gets (and then reuses) a graph of its own
        try:
            with torch._inductor.config.patch(freezing=True, cpp_wrapper=True), \
                    torch.fx.experimental._config.patch(use_duck_shape=False), fp32_gemm(fp32):
                return self.graph(input_ids, positions, meta)
        except Exception as error:    # a compiler problem must not take the engine and its requests down
            warnings.warn(f"alise: torch.compile of the decode step failed, decode steps run eager from now on: "
                          f"{type(error).__name__}: {str(error)[:500]}", RuntimeWarning, stacklevel=2)
            pack_model(self.model)     # what the eager engine runs on (see PackedLinear)
            return None
