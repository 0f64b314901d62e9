"""End to end: the engine with the Triton kernels (interpreted on CPU) agrees with the torch reference."""
from __future__ import annotations

import pytest
import torch

from alise import LLM, SamplingParams, kernels

if not torch.cuda.is_available():
    kernels.enable_triton_interpreter()


def prompt_logprobs(model_dir, backend: str, kv_dtype: str, prompt: list[int], max_tokens: int = 4):
    llm = LLM(str(model_dir), dtype="float32", kv_dtype=kv_dtype, backend=backend, policy="fcfs",
              kv_cache_blocks=16, block_size=16)
    out = llm.generate([prompt], SamplingParams(max_tokens=max_tokens, temperature=0, prompt_logprobs=True))[0]
    return torch.tensor(out.prompt_logprobs[1:]), out.token_ids


@pytest.mark.parametrize("kv_dtype", ["auto", "int8", "int4"])
def test_tiny_model_triton_matches_torch(tiny_model_dir, kv_dtype):
    prompt = [7, 3, 99, 42, 5, 17, 250, 8, 64, 33, 2, 90, 11, 180, 6, 77, 12, 13, 140]
    ref, ref_tokens = prompt_logprobs(tiny_model_dir, "torch", kv_dtype, prompt)
    got, got_tokens = prompt_logprobs(tiny_model_dir, "triton", kv_dtype, prompt)
    torch.testing.assert_close(got, ref, atol=2e-3, rtol=1e-3)
    assert got_tokens == ref_tokens


@pytest.mark.slow
def test_real_model_triton_matches_torch(real_model_dir):
    from alise.tokenizer import Tokenizer
    prompt = Tokenizer.from_folder(real_model_dir).encode("The capital of France is Paris, and")
    # one sampled token only: the interpreter runs 30 layers slowly (the tiny model covers decode steps)
    ref, ref_tokens = prompt_logprobs(real_model_dir, "torch", "auto", prompt, max_tokens=1)
    got, got_tokens = prompt_logprobs(real_model_dir, "triton", "auto", prompt, max_tokens=1)
    torch.testing.assert_close(got, ref, atol=2e-3, rtol=1e-3)
    assert got_tokens == ref_tokens
