"""The CPU's native int8 / int4 KV kernels (``cpu_kv.c``): decode attention on the codes and the quantizing writer.

In torch ops (``reference.py``) a decode step on quantized pages runs ~20 passes over each layer's context
(``_attention_on_codes``) and ~12-25 small ops to quantize its new K/V; the C kernels do one pass each, which is
what lets int8 / int4 pages cost no more time than bf16 ones on a CPU (README, "Quantized pages on the CPU").
They are built once per machine with the system's C compiler (``cc``, or ``$CC``) into
``~/.cache/alise/native/`` (``$ALISE_CACHE`` overrides the root) under a name that hashes the source, the flags
and the CPU, and loaded with ctypes. Where no compiler works, or ``ALISE_NATIVE=0`` is set, ``decode_attention``
returns None and ``write_kv`` False, and the torch backend runs the torch ops instead (one warning says why).

``torch.compile`` graphs never call them (ctypes is opaque to dynamo): compiled decode steps keep the torch ops,
which inductor fuses.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from alise.kernels import reference

SOURCE = Path(__file__).with_name("cpu_kv.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math",
         "-shared", "-fPIC", "-std=c11")
ENV_SWITCH = "ALISE_NATIVE"          # "0" turns the native kernel off (the torch ops run instead)
MAX_HEAD_DIM, MAX_GROUP, MAX_KEY_GROUPS = 256, 16, 8     # cpu_kv.c's fixed buffers


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def _cache_dir() -> Path:
    return Path(os.environ.get("ALISE_CACHE", Path.home() / ".cache" / "alise")) / "native"


@functools.lru_cache(maxsize=1)
def load() -> ctypes.CDLL | None:
    """The compiled kernel library, building it first if needed; None (with one warning) where it cannot be."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        warnings.warn("alise: no C compiler found (cc / gcc / $CC): quantized decode attention runs on torch ops, "
                      "slower than bf16 pages", RuntimeWarning, stacklevel=3)
        return None
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join((compiler,) + FLAGS).encode() + _cpu_flags().encode()).hexdigest()[:16]
    library = _cache_dir() / f"cpu_kv-{key}.so"
    try:
        if not library.exists():
            library.parent.mkdir(parents=True, exist_ok=True)
            # build beside the target and rename: another process loading it never sees a half-written file
            with tempfile.TemporaryDirectory(dir=library.parent) as build:
                built = Path(build) / library.name
                subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built), "-lm"], check=True,
                               capture_output=True, text=True, timeout=120)
                os.replace(built, library)
        lib = ctypes.CDLL(str(library))
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", None) or str(error)
        warnings.warn(f"alise: could not build the native decode kernel ({detail.strip()[:300]}): quantized decode "
                      f"attention runs on torch ops, slower than bf16 pages", RuntimeWarning, stacklevel=3)
        return None
    pointer, i32, f32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.decode_attention_int8.argtypes = [pointer] * 9 + [i32] * 7 + [f32]
    lib.decode_attention_int4.argtypes = [pointer] * 9 + [i32] * 8 + [f32]
    lib.write_kv_quantized.argtypes = [pointer, pointer, i32] + [pointer] * 5 + [i32, ctypes.c_int64] + [i32] * 4
    lib.decode_attention_int8.restype = lib.decode_attention_int4.restype = lib.write_kv_quantized.restype = i32
    return lib


def available() -> bool:
    return load() is not None


def decode_attention(*, query: torch.Tensor, cache, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                     sm_scale: float) -> torch.Tensor | None:
    """``reference.decode_attention`` on int8 / int4 pages, in C: ``query`` ``[B, Hq, D]`` -> ``[B, Hq, D]``.

    None where the kernel does not apply (the caller then runs the torch ops): no compiler, a CUDA tensor, a
    ``torch.compile`` trace, or a head shape past the kernel's fixed buffers. Keys at and past ``seq_lens[b]`` are
    never read; int4 queries are rotated in here and the output rotated back (``reference.py``).
    """
    batch, num_heads, head_dim = query.shape
    num_kv_heads = cache.k.shape[2]
    group = num_heads // num_kv_heads
    if (query.device.type != "cpu" or torch.compiler.is_compiling() or head_dim > MAX_HEAD_DIM
            or group > MAX_GROUP or reference.scale_groups(cache.k_scale, cache.kv_dtype) > MAX_KEY_GROUPS):
        return None
    lib = load()
    if lib is None:
        return None
    q = query.view(batch, num_kv_heads, group, head_dim)
    q = (reference.rotate(q) if cache.kv_dtype == "int4" else q.float()).contiguous()    # (B, Hkv, G, D) float32
    tables = block_tables.to(torch.int32).contiguous()
    lens = seq_lens.to(torch.int32).contiguous()
    out = torch.empty_like(q)
    scores = torch.empty(batch, num_kv_heads, group, tables.shape[1] * cache.block_size)  # the kernel's workspace
    args = [t.data_ptr() for t in (q, cache.k, cache.v, cache.k_scale, cache.v_scale, tables, lens, out, scores)]
    args += [batch, num_kv_heads, group, head_dim, cache.block_size, tables.shape[1], cache.k.shape[0]]
    if cache.kv_dtype == "int8":
        status = lib.decode_attention_int8(*args, sm_scale)
    else:
        status = lib.decode_attention_int4(*args, reference.scale_groups(cache.k_scale, "int4"), sm_scale)
    _check(status, "decode attention")
    out = reference.rotate(out) if cache.kv_dtype == "int4" else out
    return out.view(batch, num_heads, head_dim).to(query.dtype)


def write_kv(*, key: torch.Tensor, value: torch.Tensor, cache, slot_mapping: torch.Tensor) -> bool:
    """``reference.write_kv`` into int8 / int4 pages, in C: quantize token t's K/V ``[T, Hkv, D]`` (float32 or
    bf16) and store them at slot ``slot_mapping[t]`` (-1: skip). False where the kernel does not apply (the caller
    then runs the torch ops): no compiler, another device or dtype, a ``torch.compile`` trace, a head past the
    kernel's buffers."""
    head_dim = key.shape[-1]
    if (key.device.type != "cpu" or torch.compiler.is_compiling() or head_dim > MAX_HEAD_DIM
            or key.dtype not in (torch.float32, torch.bfloat16)
            or reference.scale_groups(cache.k_scale, cache.kv_dtype) > MAX_KEY_GROUPS):
        return False
    lib = load()
    if lib is None:
        return False
    key, value = key.contiguous(), value.to(key.dtype).contiguous()
    slots = slot_mapping.to(torch.int64).contiguous()
    status = lib.write_kv_quantized(
        key.data_ptr(), value.data_ptr(), key.dtype == torch.bfloat16,
        *(t.data_ptr() for t in (cache.k, cache.v, cache.k_scale, cache.v_scale, slots)),
        key.shape[0], cache.k.shape[0] * cache.block_size, key.shape[1], head_dim, cache.kv_dtype == "int4",
        reference.scale_groups(cache.k_scale, cache.kv_dtype))
    _check(status, "the KV write")
    return True


def _check(status: int, what: str) -> None:
    if status == -1:         # the checks before the call keep the kernels' fixed buffers in bounds: a bug
        raise RuntimeError(f"cpu_kv.c refused the head shape of {what}")
    if status == -2:
        raise ValueError(f"{what}: a block table, sequence length or slot points outside the KV pool")
