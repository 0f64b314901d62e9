"""A Llama-family decoder in one file (nanoGPT style), attending over the paged KV cache.

Covers Llama 2/3, SmolLM, Mistral, Qwen2 and Qwen3 checkpoints: RMSNorm, rotary position embeddings with the
config's theta (and linear / llama3 / yarn scaling), grouped-query attention, gated MLP (SiLU or GELU), optional
projection biases, Qwen3's q/k norms, tied or untied output head. ``ARCHITECTURES`` lists the config.json keys
read for each architecture; a config with any other key (or a value alise does not implement) is refused.

The forward pass works on a *flat* batch: every query token of every sequence in one row of ``(T, ...)``
tensors, with ``kernels.AttentionMetadata`` telling attention which rows belong to which sequence and where
their K/V live in the paged cache. That one shape serves prefill, chunked prefill and decode alike (vLLM,
nano-vllm). The projections are plain ``nn.Linear``s; ``alise/cpu.py`` swaps in the CPU's faster ones.

References: Touvron et al. 2023 (Llama), Su et al. 2021 (RoPE), Ainslie et al. 2023 (GQA), Karpathy's nanoGPT.
"""
from __future__ import annotations

import functools
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from alise import kernels


# config.json keys that each architecture's transformers class reads, with transformers' default for a key the file
# leaves out (_REQUIRED keys must be there; head_dim / num_key_value_heads None: derived from the head count).
# ``from_json`` refuses every key that is in none of these tables: alise cannot know that an unknown key leaves
# the math alone, and a key read past loads a model that computes something else (as the sliding windows and the
# 5.x rope layout did before these tables).
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_COMMON = dict.fromkeys(_REQUIRED) | {
    "head_dim": None, "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": False,
    "rope_parameters": None,                      # transformers 5.x: {"rope_type", "rope_theta", scaling...}
    "rope_theta": 10000.0, "rope_scaling": None,  # transformers 4.x: the same at the top level
    "bos_token_id": None, "eos_token_id": None,   # stop tokens, no math; read as given
}
_QWEN2 = _COMMON | {"max_position_embeddings": 32768, "num_key_value_heads": 32, "use_sliding_window": False,
                    "sliding_window": 4096, "max_window_layers": 28, "layer_types": None}
ARCHITECTURES = {
    # attention_bias: q, k, v and o projections; mlp_bias: gate, up and down
    "LlamaForCausalLM": _COMMON | {"max_position_embeddings": 2048, "num_key_value_heads": None,
                                   "attention_bias": False, "mlp_bias": False},
    "MistralForCausalLM": _COMMON | {"max_position_embeddings": 4096 * 32, "num_key_value_heads": 8,
                                     "sliding_window": 4096},
    "Qwen2ForCausalLM": _QWEN2,                                   # q, k, v biases always, none elsewhere
    "Qwen3ForCausalLM": _QWEN2 | {"head_dim": 128, "attention_bias": False},   # + RMSNorm of each q and k head
}
# Keys that never change what the model computes: bookkeeping, training-only settings (dropout is off at
# inference; pretraining_tp only split 4.x's projections into slices, same sums), generation-time options.
IGNORED_KEYS = frozenset("""
    _name_or_path architectures model_type transformers_version torch_dtype dtype use_cache initializer_range
    pad_token_id attention_dropout pretraining_tp output_attentions output_hidden_states return_dict id2label
    label2id problem_type chunk_size_feed_forward is_encoder_decoder tokenizer_class is_llama_config
""".split())
# Keys transformers does not read either, which some files carry with these values (nanotron's SmolLM2 exports,
# DeepSeek's Qwen2 distills); any other value would mean a layout alise does not implement
NEUTRAL_KEYS = {"rope_interleaved": False, "use_mrope": False}
# rope_type -> (parameters it needs, parameters it may have) besides rope_theta, as transformers'
# modeling_rope_utils reads them. "dynamic" NTK is refused: its frequencies change with the batch's length.
ROPE_TYPES = {
    "default": ((), ()),
    "linear": (("factor",), ()),
    "llama3": (("factor", "low_freq_factor", "high_freq_factor"), ("original_max_position_embeddings",)),
    "yarn": (("factor",), ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
                           "original_max_position_embeddings", "truncate")),
}
# hidden_act (transformers' ACT2FN names) -> function; the three tanh forms are one formula written three ways
_GELU_TANH = functools.partial(F.gelu, approximate="tanh")
ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu,
               "gelu_new": _GELU_TANH, "gelu_pytorch_tanh": _GELU_TANH, "gelu_fast": _GELU_TANH}


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None       # rope_parameters with their rope_type; None for plain RoPE
    rms_norm_eps: float = 1e-5
    # the positions alise serves: the checkpoint's, or its sliding window when that is shorter (from_json)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False           # on the q, k and v projections
    o_proj_bias: bool = False
    mlp_bias: bool = False                 # on gate, up and down
    qk_norm: bool = False                  # Qwen3: RMSNorm over each q and k head before RoPE
    hidden_act: str = "silu"
    sliding_window: int | None = None      # as read; the context is capped at it, never windowed
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    @classmethod
    def from_json(cls, path: str | Path) -> "LlamaConfig":
        """Read config.json as transformers does; refuse (ValueError naming the key) what alise would not honour."""
        raw = json.loads(Path(path).read_text())
        arch = (raw.get("architectures") or ["?"])[0]
        if arch not in ARCHITECTURES:
            raise ValueError(f"unsupported architecture {arch!r} in {path}; alise loads {tuple(ARCHITECTURES)}")
        known = ARCHITECTURES[arch]
        for key, value in raw.items():
            if key not in known and key not in IGNORED_KEYS and key not in NEUTRAL_KEYS:
                raise ValueError(f"{path}: alise does not know config key {key!r} (= {value!r:.80}) for {arch}, "
                                 "so it cannot tell whether the key changes the model; refusing to load it")
        missing = [key for key in _REQUIRED if key not in raw]
        if missing:
            raise ValueError(f"{path} lacks {missing[0]!r}, which a Llama-family config needs")
        c = known | {key: raw[key] for key in known if key in raw}

        def refuse(problem: str) -> ValueError:
            return ValueError(f"{path}: {problem} ({arch})")

        if c["hidden_act"] not in ACTIVATIONS:
            raise refuse(f"unsupported hidden_act={c['hidden_act']!r}; alise implements {tuple(ACTIVATIONS)}")
        for key, neutral in NEUTRAL_KEYS.items():
            if raw.get(key, neutral) != neutral:
                raise refuse(f"unsupported {key}={raw[key]!r}; alise implements only {key}={neutral!r}")
        theta, scaling = _rope(c, refuse)
        window = _sliding_window(arch, c, refuse)
        max_positions = c["max_position_embeddings"]
        if window is not None and window < max_positions:
            warnings.warn(f"{path}: sliding_window={window}, and alise does not implement windowed attention: it "
                          f"caps the context (max_model_len) at {window} tokens, where the window changes nothing "
                          f"(the checkpoint's max_position_embeddings is {max_positions})", stacklevel=2)
            max_positions = window
        heads = c["num_attention_heads"]
        return cls(
            vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
            num_hidden_layers=c["num_hidden_layers"], num_attention_heads=heads,
            num_key_value_heads=c["num_key_value_heads"] or heads, head_dim=c["head_dim"] or c["hidden_size"] // heads,
            rope_theta=theta, rope_scaling=scaling, rms_norm_eps=c["rms_norm_eps"],
            max_position_embeddings=max_positions, tie_word_embeddings=c["tie_word_embeddings"],
            attention_bias=c.get("attention_bias", arch == "Qwen2ForCausalLM"),
            o_proj_bias=c.get("attention_bias", False), mlp_bias=c.get("mlp_bias", False),
            qk_norm=arch == "Qwen3ForCausalLM", hidden_act=c["hidden_act"], sliding_window=window,
            bos_token_id=c["bos_token_id"], eos_token_id=c["eos_token_id"],
        )


def _rope(c: dict, refuse) -> tuple[float, dict | None]:
    """(theta, scaling parameters with their rope_type, None for plain RoPE) from either config layout."""
    # transformers 5.x writes one rope_parameters dict, 4.x rope_theta and rope_scaling at the top level; as in
    # transformers, a rope_scaling wins and the top-level rope_theta fills in a dict that lacks one
    rope = dict(c["rope_scaling"] or c["rope_parameters"] or {})
    theta = rope.pop("rope_theta", c["rope_theta"])
    kind = rope.pop("rope_type", rope.pop("type", "default"))   # "type": older configs' name
    if kind not in ROPE_TYPES:
        raise refuse(f"unsupported rope_type={kind!r}; alise implements {tuple(ROPE_TYPES)}")
    needed, optional = ROPE_TYPES[kind]
    if extra := sorted(set(rope) - set(needed) - set(optional)):
        raise refuse(f"unsupported rope parameter {extra[0]}={rope[extra[0]]!r} for rope_type {kind!r}; "
                     f"alise reads {(needed + optional) or 'only rope_theta'}")
    if missing := sorted(set(needed) - set(rope)):
        raise refuse(f"rope_type {kind!r} needs the rope parameter {missing[0]!r}, which the config lacks")
    if kind == "default":
        return theta, None
    if kind in ("llama3", "yarn"):
        rope.setdefault("original_max_position_embeddings", c["max_position_embeddings"])
    if kind == "yarn" and rope["factor"] is None:
        rope["factor"] = c["max_position_embeddings"] / rope["original_max_position_embeddings"]
    return theta, {"rope_type": kind, **rope}


def _sliding_window(arch: str, c: dict, refuse) -> int | None:
    """The window of the model's sliding-window layers; None when every layer sees the whole context."""
    if arch == "MistralForCausalLM":          # every layer, when set
        window = c["sliding_window"]
    elif arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        # transformers: the window applies only with use_sliding_window, to the layers that layer_types marks,
        # by default those from max_window_layers on
        window = c["sliding_window"] if c["use_sliding_window"] else None
        n = c["num_hidden_layers"]
        types = c["layer_types"] or ["sliding_attention" if window is not None and i >= c["max_window_layers"]
                                     else "full_attention" for i in range(n)]
        if len(types) != n or not set(types) <= {"full_attention", "sliding_attention"}:
            raise refuse(f"unsupported layer_types={types!r}; alise takes {n} entries, each 'full_attention' or "
                         "'sliding_attention'")
        window = window if "sliding_attention" in types else None
    else:
        return None
    if window is not None and (not isinstance(window, int) or window < 1):
        raise refuse(f"unsupported sliding_window={window!r}; alise takes a positive int or null")
    return window


def rope_cos_sin(config: LlamaConfig, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``(max_positions, head_dim // 2)`` in float32, with the config's frequency scaling."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling or {}
    kind, scale = scaling.get("rope_type"), 1.0
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":  # stretch only the low frequencies, blend in the middle band (Llama 3.1)
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old_len / wavelen - low) / (high - low)).clamp(0, 1)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > old_len / low, inv_freq / factor,
                               torch.where(wavelen < old_len / high, inv_freq, blended))
    elif kind == "yarn":  # Peng et al. 2023: stretch the low frequencies, ramp between, scale cos/sin
        inv_freq, scale = _yarn(inv_freq, config.rope_theta, scaling)
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)  # (P, D/2)
    return (angles.cos() * scale).float(), (angles.sin() * scale).float()


def _yarn(inv_freq: torch.Tensor, theta: float, p: dict) -> tuple[torch.Tensor, float]:
    """YaRN's frequencies and cos/sin scale, as transformers' ``_compute_yarn_parameters`` computes them."""
    dim, factor, old_len = 2 * len(inv_freq), p["factor"], p["original_max_position_embeddings"]

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
    scale = p.get("attention_factor")
    if scale is None:
        m, m_all = p.get("mscale"), p.get("mscale_all_dim")
        scale = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

    def channel(rotations: float) -> float:  # the channel pair whose wave turns `rotations` times over old_len
        return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))
    low, high = channel(p.get("beta_fast") or 32), channel(p.get("beta_slow") or 1)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    high += 0.001 if high == low else 0     # as transformers: no division by zero
    # 0 below channel `low` (high frequencies: kept), 1 above `high` (low frequencies: divided by factor)
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    return inv_freq / factor * ramp + inv_freq * (1 - ramp), scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``(T, H, D)`` by position; HF layout: the pair of channel i is channel i + D/2."""
    x1, x2 = x.float().chunk(2, dim=-1)                          # (T, H, D/2) each
    cos, sin = cos[:, None], sin[:, None]                        # (T, 1, D/2)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch's fused rms_norm accumulates in float32 even for bf16 inputs (same result as upcasting first)
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        # q, k and v projections fused into one matmul (split again in from_pretrained's loader)
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=config.o_proj_bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.sm_scale = self.head_dim ** -0.5

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q ``(T, Hq, D)`` and k ``(T, Hkv, D)`` after RoPE, and v ``(T, Hkv, D)``, of the normed input x."""
        T = x.shape[0]
        qk, v = self.qkv_proj(x).split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        qk = qk.view(T, self.num_heads + self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
            qk = torch.cat([self.q_norm(q), self.k_norm(k)], dim=1)
        # q and k heads side by side get the same rotation: one call instead of two
        qk = apply_rope(qk, cos, sin)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)           # (T, Hq, D), (T, Hkv, D)
        return q, k, v.view(T, self.num_kv_heads, self.head_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: kernels.LayerKVCache, meta: kernels.AttentionMetadata) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self.project(x, cos, sin)
        out = kernels.attend(query=q, key=k, value=v, cache=cache, meta=meta, sm_scale=self.sm_scale)  # (T, Hq, D)
        return self.o_proj(out.reshape(T, self.q_size))


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)  # fused
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)          # (T, I) each
        return self.down_proj(self.act(gate) * up)


class Block(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, cache, meta):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # tied: None, the embedding table is the head (alise/cpu.py's pack_model may add a packed copy of it here)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size,
                                                                         bias=False)
        cos, sin = rope_cos_sin(config, config.max_position_embeddings)
        self.register_buffer("rope_cos", cos, persistent=False)  # (P, D/2)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                caches: list[kernels.LayerKVCache], meta: kernels.AttentionMetadata) -> torch.Tensor:
        """Hidden states ``(T, C)`` after the final norm for the flat batch ``input_ids`` ``(T,)``."""
        x = self.embed_tokens(input_ids)                          # (T, C)
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # (T, D/2)
        for layer, cache in zip(self.layers, caches):
            x = layer(x, cos, sin, cache, meta)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits ``(N, vocab)`` for the rows of ``hidden`` ``(N, C)``."""
        if self.lm_head is not None:
            return self.lm_head(hidden).float()
        return F.linear(hidden, self.embed_tokens.weight).float()

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: torch.dtype = torch.bfloat16) -> "Llama":
        """Load an HF-style folder, checking every tensor's name and shape against the config."""
        from safetensors import safe_open
        from safetensors import SafetensorError

        folder = Path(folder)
        config = LlamaConfig.from_json(folder / "config.json")
        with torch.device("meta"):
            model = cls(config)
        expected = _expected_shapes(config)
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise ValueError(f"no *.safetensors file in {folder}")
        tensors: dict[str, torch.Tensor] = {}
        for file in files:
            try:
                with safe_open(file, framework="pt") as f:
                    for name in f.keys():
                        if name.endswith("rotary_emb.inv_freq"):
                            continue  # some old checkpoints store derived rope tables; we recompute them
                        if name not in expected:
                            raise ValueError(f"unexpected tensor {name!r} in {file.name} for this config")
                        tensor = f.get_tensor(name)
                        if tuple(tensor.shape) != expected[name]:
                            raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}, "
                                             f"expected {expected[name]} from config.json")
                        tensors[name] = tensor.to(dtype)
            except (SafetensorError, OSError, RuntimeError) as err:
                raise ValueError(f"cannot read {file} (truncated or corrupted?): {err}") from err
        missing = sorted(set(expected) - set(tensors))
        if missing:
            raise ValueError(f"missing tensor {missing[0]!r} in {folder}" +
                             (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        model.load_state_dict(_fuse(config, tensors), strict=True, assign=True)
        cos, sin = rope_cos_sin(config, config.max_position_embeddings)
        model.rope_cos, model.rope_sin = cos, sin
        return model.eval()


def _expected_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """HF checkpoint names -> shapes implied by the config."""
    C, I, D = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_attention_heads * D, config.num_key_value_heads * D
    shapes = {"model.embed_tokens.weight": (config.vocab_size, C), "model.norm.weight": (C,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, C)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (C,), p + "post_attention_layernorm.weight": (C,),
                   p + "self_attn.q_proj.weight": (q, C), p + "self_attn.k_proj.weight": (kv, C),
                   p + "self_attn.v_proj.weight": (kv, C), p + "self_attn.o_proj.weight": (C, q),
                   p + "mlp.gate_proj.weight": (I, C), p + "mlp.up_proj.weight": (I, C),
                   p + "mlp.down_proj.weight": (C, I)}
        if config.attention_bias:
            shapes |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                       p + "self_attn.v_proj.bias": (kv,)}
        if config.o_proj_bias:
            shapes[p + "self_attn.o_proj.bias"] = (C,)
        if config.mlp_bias:
            shapes |= {p + "mlp.gate_proj.bias": (I,), p + "mlp.up_proj.bias": (I,), p + "mlp.down_proj.bias": (C,)}
        if config.qk_norm:
            shapes |= {p + "self_attn.q_norm.weight": (D,), p + "self_attn.k_norm.weight": (D,)}
    return shapes


def _fuse(config: LlamaConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF names -> our module names, concatenating q/k/v and gate/up into the fused projections."""
    state = {"embed_tokens.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"]}
    if not config.tie_word_embeddings:
        state["lm_head.weight"] = hf["lm_head.weight"]
    for i in range(config.num_hidden_layers):
        p, o = f"model.layers.{i}.", f"layers.{i}."
        state[o + "input_layernorm.weight"] = hf[p + "input_layernorm.weight"]
        state[o + "post_attention_layernorm.weight"] = hf[p + "post_attention_layernorm.weight"]
        state[o + "self_attn.qkv_proj.weight"] = torch.cat([hf[p + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        if config.attention_bias:
            state[o + "self_attn.qkv_proj.bias"] = torch.cat([hf[p + f"self_attn.{x}_proj.bias"] for x in "qkv"])
        state[o + "mlp.gate_up_proj.weight"] = torch.cat([hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]])
        if config.mlp_bias:
            state[o + "mlp.gate_up_proj.bias"] = torch.cat([hf[p + "mlp.gate_proj.bias"], hf[p + "mlp.up_proj.bias"]])
        for name in ("self_attn.o_proj.weight", "self_attn.o_proj.bias", "mlp.down_proj.weight", "mlp.down_proj.bias",
                     "self_attn.q_norm.weight", "self_attn.k_norm.weight"):   # same names; those the config implies
            if p + name in hf:
                state[o + name] = hf[p + name]
    return state
