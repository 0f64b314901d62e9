"""Kernel benchmark: KV bytes per dtype, quantization accuracy, and (on CUDA) decode attention speed.

    python -m alise.bench.kernels                  # all sections that this machine can run
    python -m alise.bench.kernels --budget-gib 4   # capacity for another KV budget

Sections:

1. Bytes of K+V per token per layer (scales included) for the default model (3 kv heads, head_dim 64, 30
   layers), the ratio to bf16, and how many concurrent sequences of ``--seq-len`` tokens fit in the budget.
2. Accuracy on synthetic K/V with outlier channels (like real K): relative MSE of the quantize -> dequantize
   round trip and the relative error of decode attention output against fp32, through the torch reference.
3. CPU: time of the torch reference decode attention (the engine's CPU backend) per dtype.
4. CUDA only: decode attention time and achieved bandwidth (KV bytes read / time) for a batch of 32 at 1k, 4k
   and 16k context per dtype, against torch SDPA on a dense bf16 cache, timed with ``triton.testing.do_bench``.
"""
from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from alise import kernels
from alise.kernels import reference

NUM_KV_HEADS, NUM_HEADS, HEAD_DIM, NUM_LAYERS = 3, 9, 64, 30   # SmolLM2-135M
BLOCK_SIZE = 16
DTYPES = ("bf16", "int8", "int4")


def table(rows: list[list], header: list[str]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def byte_table(budget_gib: float, seq_len: int) -> str:
    bf16 = kernels.bytes_per_token("bf16", NUM_KV_HEADS, HEAD_DIM)
    rows = []
    for dt in ("fp32", "bf16", "int8", "int4"):
        per_layer = kernels.bytes_per_token(dt, NUM_KV_HEADS, HEAD_DIM)
        per_token = per_layer * NUM_LAYERS
        seqs = int(budget_gib * 2 ** 30 // (per_token * seq_len))
        rows.append([dt, per_layer, per_token, f"{per_layer / bf16:.3f}x", seqs])
    return table(rows, ["kv dtype", "B/token/layer", f"B/token ({NUM_LAYERS} layers)", "vs bf16",
                        f"{seq_len}-token seqs in {budget_gib:g} GiB"])


def synthetic_kv(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """K with a few large-magnitude channels (as in real models), V plain Gaussian: ``[n, Hkv, D]`` fp32."""
    k = torch.randn(n, NUM_KV_HEADS, HEAD_DIM, generator=gen)
    k[..., torch.randperm(HEAD_DIM, generator=gen)[:4]] *= 8
    k[..., :8] += 2.0
    v = torch.randn(n, NUM_KV_HEADS, HEAD_DIM, generator=gen)
    return k, v


def accuracy_table(seq_len: int = 1024, batch: int = 4) -> str:
    gen = torch.Generator().manual_seed(0)
    lens = [(1, seq_len)] * batch
    k, v = synthetic_kv(batch * seq_len, gen)
    query = torch.randn(batch, NUM_HEADS, HEAD_DIM, generator=gen) * 2
    meta = dict(block_tables=torch.arange(batch * seq_len // BLOCK_SIZE, dtype=torch.int32).view(batch, -1),
                seq_lens=torch.tensor([s for _, s in lens]), query_start_loc=torch.arange(batch + 1),
                max_query_len=1, max_seq_len=seq_len, sm_scale=HEAD_DIM ** -0.5)
    slots = torch.arange(batch * seq_len)
    outs, rows = {}, []
    for dt in ("fp32", "bf16", "int8", "int4"):
        cache = kernels.allocate_layer_cache(num_blocks=batch * seq_len // BLOCK_SIZE, block_size=BLOCK_SIZE,
                                             num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM, kv_dtype=dt)
        kernels.write_kv(key=k, value=v, cache=cache, slot_mapping=slots)
        outs[dt] = kernels.paged_attention(query=query, cache=cache, **meta)
        k_deq = reference.dequantize(cache.k, cache.k_scale, dt).float().flatten(0, 1)
        v_deq = reference.dequantize(cache.v, cache.v_scale, dt).float().flatten(0, 1)
        if dt == "int4":
            k_deq, v_deq = reference.rotate(k_deq), reference.rotate(v_deq)
        mse_k = ((k_deq - k) ** 2).mean() / (k ** 2).mean()
        mse_v = ((v_deq - v) ** 2).mean() / (v ** 2).mean()
        err = (outs[dt] - outs["fp32"]).norm() / outs["fp32"].norm()
        rows.append([dt, f"{mse_k:.2e}", f"{mse_v:.2e}", f"{err:.2e}"])
    return table(rows, ["kv dtype", "K rel. MSE", "V rel. MSE", "attn out rel. err (vs fp32)"])


def cpu_timing_table(batch: int = 8, seq_len: int = 1024, repeats: int = 20) -> str:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for dt in ("fp32", "bf16", "int8", "int4"):
        nb = batch * seq_len // BLOCK_SIZE
        cache = kernels.allocate_layer_cache(num_blocks=nb, block_size=BLOCK_SIZE, num_kv_heads=NUM_KV_HEADS,
                                             head_dim=HEAD_DIM, kv_dtype=dt)
        k, v = synthetic_kv(nb * BLOCK_SIZE, gen)
        kernels.write_kv(key=k, value=v, cache=cache, slot_mapping=torch.arange(nb * BLOCK_SIZE))
        q = torch.randn(batch, NUM_HEADS, HEAD_DIM, generator=gen).to(torch.float32 if dt == "fp32" else torch.bfloat16)
        meta = dict(block_tables=torch.arange(nb, dtype=torch.int32).view(batch, -1),
                    seq_lens=torch.full((batch,), seq_len), query_start_loc=torch.arange(batch + 1),
                    max_query_len=1, max_seq_len=seq_len, sm_scale=HEAD_DIM ** -0.5)
        for _ in range(3):                                      # warm up (first touches of fresh memory)
            kernels.paged_attention(query=q, cache=cache, **meta)
        t0 = time.perf_counter()
        for _ in range(repeats):
            kernels.paged_attention(query=q, cache=cache, **meta)
        rows.append([dt, f"{(time.perf_counter() - t0) / repeats * 1e3:.2f}"])
    return table(rows, ["kv dtype", f"ms / layer (batch {batch}, {seq_len} ctx, torch reference)"])


def gpu_table(batch: int, contexts: list[int], device: str = "cuda") -> str:
    from triton.testing import do_bench
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for ctx in contexts:
        nb = batch * ctx // BLOCK_SIZE
        q = torch.randn(batch, NUM_HEADS, HEAD_DIM, device=device, generator=gen).to(torch.bfloat16)
        meta = dict(block_tables=torch.randperm(nb, device=device, generator=gen).int().view(batch, -1),
                    seq_lens=torch.full((batch,), ctx, dtype=torch.int32, device=device),
                    query_start_loc=torch.arange(batch + 1, dtype=torch.int32, device=device),
                    max_query_len=1, max_seq_len=ctx, sm_scale=HEAD_DIM ** -0.5)
        for dt in DTYPES:
            cache = kernels.allocate_layer_cache(num_blocks=nb, block_size=BLOCK_SIZE, num_kv_heads=NUM_KV_HEADS,
                                                 head_dim=HEAD_DIM, kv_dtype=dt, device=device)
            k = torch.randn(nb * BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, device=device, generator=gen).to(torch.bfloat16)
            kernels.write_kv(key=k, value=k, cache=cache, slot_mapping=torch.arange(nb * BLOCK_SIZE, device=device),
                             backend="triton")
            kv_bytes = batch * ctx * kernels.bytes_per_token(dt, NUM_KV_HEADS, HEAD_DIM)
            for split in (None, False):
                ms = do_bench(lambda: kernels.paged_attention(query=q, cache=cache, **meta, backend="triton",
                                                              split_kv=split))
                path = "auto" if split is None else "unsplit"
                rows.append([ctx, f"triton {dt} ({path})", f"{ms * 1e3:.1f}", f"{kv_bytes / ms / 1e6:.0f}"])
            del cache, k
        kd = torch.randn(batch, NUM_KV_HEADS, ctx, HEAD_DIM, device=device, generator=gen).to(torch.bfloat16)
        qd = q.view(batch, NUM_HEADS, 1, HEAD_DIM)
        ms = do_bench(lambda: F.scaled_dot_product_attention(qd, kd, kd, enable_gqa=True))
        kv_bytes = 2 * kd.numel() * kd.element_size()
        rows.append([ctx, "torch SDPA, dense bf16", f"{ms * 1e3:.1f}", f"{kv_bytes / ms / 1e6:.0f}"])
        del kd
    return table(rows, ["context", "kernel", "us", "GB/s (KV bytes / time)"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m alise.bench.kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-gib", type=float, default=1.0, help="KV budget for the capacity column (GiB)")
    parser.add_argument("--seq-len", type=int, default=1024, help="sequence length for the capacity column")
    parser.add_argument("--batch", type=int, default=32, help="decode batch for the GPU timing")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384], help="GPU timing contexts")
    parser.add_argument("--skip-accuracy", action="store_true", help="skip the accuracy and CPU timing sections")
    args = parser.parse_args(argv)

    print(f"KV cache bytes, default model ({NUM_KV_HEADS} kv heads x head_dim {HEAD_DIM}, {NUM_LAYERS} layers)\n")
    print(byte_table(args.budget_gib, args.seq_len))
    if not args.skip_accuracy:
        print("\nQuantization accuracy on synthetic K (outlier channels) / V, decode over 1024 keys\n")
        print(accuracy_table())
        print("\nCPU decode attention, torch reference backend\n")
        print(cpu_timing_table())
    if torch.cuda.is_available():
        print(f"\nDecode attention on {torch.cuda.get_device_name()}: batch {args.batch}, {NUM_HEADS} q heads / "
              f"{NUM_KV_HEADS} kv heads, head_dim {HEAD_DIM}, block {BLOCK_SIZE}\n")
        print(gpu_table(args.batch, args.contexts))
    else:
        print("\nDecode attention speed / bandwidth: needs CUDA (no GPU here); run this module on a GPU machine.")


if __name__ == "__main__":
    main()
