"""EngineConfig: every knob of the engine in one place, validated with errors that name the argument."""
from __future__ import annotations

import argparse
import os
import warnings
from dataclasses import InitVar, dataclass

from alise.sampling import is_finite_real

KV_DTYPE_CHOICES = ("auto", "bf16", "int8", "int4")
POLICY_CHOICES = ("fcfs", "alise", "oracle")
BACKEND_CHOICES = ("auto", "triton", "torch")
DTYPE_CHOICES = ("auto", "bfloat16", "float32")
# "bf16" is a deprecated spelling of "auto" (copy swapped KV unchanged)
SWAP_KV_DTYPE_CHOICES = ("auto", "int8", "int4", "bf16")
EMBEDDER_CHOICES = ("model", "minilm")
SEED_MAX = 2**63 - 1
# renamed options (the old names misled: it is the scheduler's *policy*, the predictor's *embedder*); the old
# keyword arguments and command-line flags still work for one release, with a warning naming the new one
RENAMED = {"scheduler": "policy", "predictor": "embedder"}


@dataclass
class EngineConfig:
    model: str = "smollm2"
    kv_dtype: str = "auto"            # "auto" = the model's dtype, unquantized
    policy: str = "alise"             # how the scheduler ranks requests: "fcfs", "alise", "oracle"
    backend: str = "auto"             # "auto": triton on CUDA, the torch reference on CPU
    dtype: str = "auto"               # "auto": the engine picks bfloat16 or float32 for the device
    device: str = "auto"              # "auto": cuda if available, else cpu
    max_num_seqs: int = 64            # cap on sequences in one step
    max_num_batched_tokens: int = 512  # token budget of one step (prefill chunks + decode tokens)
    kv_cache_blocks: int | None = None  # None: size the pool from kv_cache_memory_gb
    kv_cache_memory_gb: float | None = None  # None: 1 GiB on CPU, 90% of free memory on CUDA
    block_size: int = 16
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    swap_space_gb: float = 1.0        # host memory for swapped-out (compressed) KV of preempted requests
    # how swapped-out KV is stored: "auto" copies it in the pool's own format (exact); "int8" / "int4" compress it
    # (less host memory, but a request's output then depends on whether load preempted it)
    swap_kv_dtype: str = "auto"
    # the ALISE length predictor's prompt embedder: "model" (the served model's mean token embedding) or
    # "minilm" (all-MiniLM-L6-v2, the paper's kind of encoder). "model" is the default because it measured
    # better on the real trace (Kendall's tau 0.71 vs 0.66, held-out prompts) at a fraction of the cost
    embedder: str = "model"
    predictor_history: str | None = None  # JSON Lines {"prompt", "output_len"} to warm-start the predictor
    seed: int = 0
    # compile decode steps with torch.compile (CPU, torch backend): one fused graph instead of ~100 eager ops
    # per layer. Costs about a minute of compilation at the first decode step of each engine
    compile: bool = False
    scheduler: InitVar[str | None] = None   # deprecated: ``policy``
    predictor: InitVar[str | None] = None   # deprecated: ``embedder``

    def __post_init__(self, scheduler: str | None, predictor: str | None):
        for old, value in (("scheduler", scheduler), ("predictor", predictor)):
            if value is not None:
                new = RENAMED[old]
                warnings.warn(f"{old}= is deprecated: use {new}= (same values)", DeprecationWarning, stacklevel=3)
                setattr(self, new, value)
        _choice("kv_dtype", self.kv_dtype, KV_DTYPE_CHOICES)
        _choice("policy", self.policy, POLICY_CHOICES)
        _choice("backend", self.backend, BACKEND_CHOICES)
        _choice("dtype", self.dtype, DTYPE_CHOICES)
        _choice("device", self.device, ("auto", "cpu", "cuda"))
        _choice("swap_kv_dtype", self.swap_kv_dtype, SWAP_KV_DTYPE_CHOICES)
        if self.swap_kv_dtype == "bf16":
            warnings.warn('swap_kv_dtype="bf16" is deprecated: use "auto" (swapped KV copied unchanged)',
                          DeprecationWarning, stacklevel=3)
            self.swap_kv_dtype = "auto"
        _choice("embedder", self.embedder, EMBEDDER_CHOICES)
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            _positive_int(name, getattr(self, name))
        if self.kv_cache_blocks is not None:
            _positive_int("kv_cache_blocks", self.kv_cache_blocks)
        if self.max_model_len is not None:
            _positive_int("max_model_len", self.max_model_len)
        if self.kv_cache_memory_gb is not None and \
                (not is_finite_real(self.kv_cache_memory_gb) or not self.kv_cache_memory_gb > 0):
            raise ValueError(f"kv_cache_memory_gb must be None or a finite number > 0, got {self.kv_cache_memory_gb!r}")
        if not is_finite_real(self.swap_space_gb) or not self.swap_space_gb >= 0:
            raise ValueError(f"swap_space_gb must be a finite number >= 0, got {self.swap_space_gb!r}")
        if not isinstance(self.compile, bool):
            raise ValueError(f"compile must be a bool, got {self.compile!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed <= SEED_MAX:
            raise ValueError(f"seed must be an int in [0, 2**63 - 1], got {self.seed!r}")
        if self.predictor_history is not None:
            if not isinstance(self.predictor_history, (str, os.PathLike)):
                raise ValueError(f"predictor_history must be None or a path, got {self.predictor_history!r}")
            if not os.path.isfile(self.predictor_history):
                raise ValueError(f"predictor_history: no such file {os.fspath(self.predictor_history)!r}")


def _choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def add_renamed_flag(parser, old_flag: str, new_flag: str, **kwargs) -> None:
    """Keep ``old_flag`` working as an alias of ``new_flag`` (already added) that warns (one release)."""
    parser.add_argument(old_flag, dest=new_flag.removeprefix("--").replace("-", "_"), action=DeprecatedFlag,
                        new_flag=new_flag, default=argparse.SUPPRESS, help=f"deprecated: {new_flag}", **kwargs)


class DeprecatedFlag(argparse.Action):
    """A renamed command-line flag: ``--scheduler X`` sets ``--policy``'s value and warns (one release).

    A FutureWarning, not a DeprecationWarning: the flag's user is the person at the command line, and Python
    shows FutureWarnings by default."""

    def __init__(self, option_strings, dest, new_flag: str, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.new_flag = new_flag

    def __call__(self, parser, namespace, values, option_string=None):
        warnings.warn(f"{option_string} is deprecated: use {self.new_flag}", FutureWarning, stacklevel=2)
        setattr(namespace, self.dest, values)
