"""Shared fixtures: a tiny random-weight Llama saved as an HF-style folder, for fast engine tests."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # before any test module imports triton (transformers, imported by the conformance tests, may): the
    # Triton kernel tests run in the interpreter on a CPU-only machine
    from alise import kernels
    kernels.enable_triton_interpreter()

TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 320, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 16, "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 256,
    "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
}
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_state_dict(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under HF Llama names, scaled so activations stay O(1) through the layers."""
    g = torch.Generator().manual_seed(seed)
    C, I, V = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    D = config["head_dim"]
    q, kv = config["num_attention_heads"] * D, config["num_key_value_heads"] * D
    rand = lambda *shape: torch.randn(*shape, generator=g) / shape[-1] ** 0.5  # noqa: E731
    # an untied head: a random tied one mostly predicts the input token again, which makes dull tests
    state = {"model.embed_tokens.weight": torch.randn(V, C, generator=g), "model.norm.weight": torch.ones(C),
             "lm_head.weight": rand(V, C) * 4}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        state |= {p + "input_layernorm.weight": 1 + 0.1 * torch.randn(C, generator=g),
                  p + "post_attention_layernorm.weight": 1 + 0.1 * torch.randn(C, generator=g),
                  p + "self_attn.q_proj.weight": rand(q, C), p + "self_attn.k_proj.weight": rand(kv, C),
                  p + "self_attn.v_proj.weight": rand(kv, C), p + "self_attn.o_proj.weight": rand(C, q),
                  p + "mlp.gate_proj.weight": rand(I, C), p + "mlp.up_proj.weight": rand(I, C),
                  p + "mlp.down_proj.weight": rand(C, I)}
    return state


def write_tiny_model(folder: Path, config: dict = TINY_CONFIG, state: dict | None = None) -> Path:
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(state if state is not None else tiny_state_dict(config), str(folder / "model.safetensors"))
    # a byte-level BPE with the same special tokens as the default model, trained on a little real text
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=config["vocab_size"], special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    import pydoc_data.topics
    text = list(pydoc_data.topics.topics.values())[:50]
    tok.train_from_iterator(text, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": CHATML, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": False}))
    return folder


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """One intra-op thread for the whole suite: on a shared 2-core machine, 2 OpenMP threads competing with
    other jobs make the small ops of these tests 10-100x slower (measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """The default model, fetched and converted on first use (cached under ALISE_CACHE)."""
    from alise.hub import resolve_model
    return resolve_model("smollm2")
