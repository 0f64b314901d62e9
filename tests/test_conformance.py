"""Conformance with transformers: alise reads a checkpoint folder as transformers does, or refuses it by name.

Tiny random models are built with transformers' own classes and written with ``save_pretrained``; alise and
transformers then load the same folder and must agree on prompt logprobs (200 tokens, prefilled in 64-token
chunks) and on 32 greedy tokens. Each supported config feature has a case, each unsupported value a refusal test
whose error names the key. The tokenizer and chat template are checked against ``AutoTokenizer``.
transformers is a test-only dependency (the ``dev`` extra); tested with transformers 5.24.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer as RawTokenizer, processors  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from alise import LLM, SamplingParams  # noqa: E402
from alise.model import Llama, LlamaConfig  # noqa: E402
from alise.tokenizer import Tokenizer  # noqa: E402
from conftest import CHATML  # noqa: E402

transformers.utils.logging.disable_progress_bar()

BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)
CLASSES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
}
PROMPT = torch.randint(3, BASE["vocab_size"], (200,), generator=torch.Generator().manual_seed(1)).tolist()


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights that make random models differ: O(1) activations, q.k scores with a std of ~4 (sharp attention;
    transformers' 0.02-std init makes every attention uniform and every model alike), logits spread ~4 wide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith(("q_norm.weight", "k_norm.weight")):   # Qwen3 normalizes q and k: sharpen here
                p.copy_(2 * (1 + 0.1 * noise))
            elif name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.5 * noise)
            elif "embed_tokens" in name:
                p.copy_(noise)
            else:
                scale = 2 if "q_proj" in name or "k_proj" in name else 4 if "lm_head" in name else 1
                p.copy_(scale * noise / p.shape[1] ** 0.5)


def to_4x_layout(folder: Path) -> None:
    """Rewrite a transformers 5.x config.json the way 4.x wrote it: top-level rope_theta and rope_scaling (and
    no layer_types, which Qwen2 files gained late in 4.x)."""
    config = json.loads((folder / "config.json").read_text())
    config.pop("layer_types", None)
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    kind = rope.pop("rope_type")
    # llama3 configs say "rope_type"; older linear / yarn ones "type"
    config["rope_scaling"] = None if kind == "default" else {"rope_type" if kind == "llama3" else "type": kind, **rope}
    config["torch_dtype"] = config.pop("dtype")
    config["transformers_version"] = "4.46.0"
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def write_model(folder: Path, tokenizer_dir: Path, arch: str = "llama", *, dtype: torch.dtype = torch.float32,
                shard: bool = False, layout: str = "5.x", edit: dict | None = None, **config) -> Path:
    """A random model saved by transformers; ``edit`` then overwrites keys of its config.json."""
    config_cls, model_cls = CLASSES[arch]
    model = model_cls(config_cls(**BASE | config))
    randomize(model)
    model.to(dtype).save_pretrained(folder, max_shard_size="100KB" if shard else "1GB")
    if shard:
        assert len(list(folder.glob("*.safetensors"))) > 1
    if layout == "4.x":
        to_4x_layout(folder)
    if edit:
        (folder / "config.json").write_text(json.dumps(json.loads((folder / "config.json").read_text()) | edit))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, folder / name)
    return folder


def reference(folder: Path):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()


def alise(folder: Path) -> LLM:
    return LLM(str(folder), dtype="float32", kv_dtype="auto", policy="fcfs", max_num_batched_tokens=64,
               kv_cache_blocks=64)


def assert_same_prompt_logprobs(llm: LLM, ref, ids: list[int]) -> None:
    got = llm.generate([ids], SamplingParams(max_tokens=1, prompt_logprobs=True))[0].prompt_logprobs
    with torch.no_grad():
        logp = ref(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    want = logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    diff = (torch.tensor(got[1:]) - want).abs().max().item()
    assert diff <= 1e-4, f"max |dlogprob| {diff:.3g} over {len(ids)} tokens"


def greedy_reference(ref, prompt: list[int], max_tokens: int) -> list[int]:
    with torch.no_grad():   # eos_token_id=None: never stop early, as ignore_eos
        out = ref.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_tokens, eos_token_id=None,
                           pad_token_id=0)
    return out[0, len(prompt):].tolist()


def assert_same_greedy(llm: LLM, ref, prompt: list[int]) -> None:
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))[0]
    assert len(out.token_ids) == 32 and out.token_ids == greedy_reference(ref, prompt, 32)


@pytest.fixture(scope="module")
def tokenizer_dir(tiny_model_dir) -> Path:
    """conftest's tiny model folder; only its tokenizer.json and tokenizer_config.json are used here."""
    return tiny_model_dir


# ---------------------------------------------------------------------------------------------------------
# supported features: the same numbers as transformers

ROPE = {
    "default": {"rope_type": "default", "rope_theta": 1e5},            # SmolLM2's theta, not the 1e4 default
    "linear": {"rope_type": "linear", "rope_theta": 5e4, "factor": 4.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 64},
}
# name -> (architecture, config, write_model options)
CASES = {
    "llama": ("llama", {}, {}),                     # GQA, untied head, fp32, one file
    "llama-bf16": ("llama", {}, {"dtype": torch.bfloat16}),
    "llama-sharded": ("llama", {}, {"shard": True}),
    "llama-bf16-sharded": ("llama", {}, {"dtype": torch.bfloat16, "shard": True}),
    **{f"rope-{kind}-{layout}": ("llama", {"rope_parameters": rope}, {"layout": layout})
       for kind, rope in ROPE.items() for layout in ("5.x", "4.x")},
    "head-dim": ("llama", {"head_dim": 32}, {}),    # not hidden_size // heads
    "mha": ("llama", {"num_key_value_heads": 4}, {}),
    "tied": ("llama", {"tie_word_embeddings": True}, {}),
    "biases": ("llama", {"attention_bias": True, "mlp_bias": True}, {}),
    **{f"act-{act}": ("llama", {"hidden_act": act}, {}) for act in ("gelu", "gelu_new", "gelu_pytorch_tanh",
                                                                   "gelu_fast")},
    "mistral": ("mistral", {"sliding_window": None, "rope_parameters": ROPE["default"]}, {}),
    "mistral-default-window": ("mistral", {}, {}),  # 4096, beyond max_position_embeddings: nothing to cap
    "qwen2": ("qwen2", {"rope_parameters": ROPE["default"]}, {"dtype": torch.bfloat16}),   # q/k/v biases
    # as Qwen2.5's files: a window for the layers from max_window_layers on, but use_sliding_window false
    # (transformers would save that window as null)
    "qwen2-window-unused": ("qwen2", {"max_window_layers": 0}, {"layout": "4.x", "edit": {"sliding_window": 32}}),
    "qwen2-window-no-layers": ("qwen2", {"use_sliding_window": True, "sliding_window": 32, "max_window_layers": 2},
                               {"layout": "4.x"}),                        # only layers >= 2 would slide
    "qwen3": ("qwen3", {"head_dim": 32, "attention_bias": True, "rope_parameters": ROPE["default"]}, {}),
}


@pytest.mark.parametrize("name", CASES)
def test_matches_transformers(name, tmp_path, tokenizer_dir):
    arch, config, options = CASES[name]
    folder = write_model(tmp_path / name, tokenizer_dir, arch, **options, **config)
    ref, llm = reference(folder), alise(folder)
    if "rope_parameters" in config:   # transformers read the layout we wrote (else the case proves nothing)
        assert ref.config.rope_parameters["rope_theta"] == config["rope_parameters"]["rope_theta"]
        assert ref.config.rope_parameters["rope_type"] == config["rope_parameters"]["rope_type"]
    assert llm.engine.max_model_len == BASE["max_position_embeddings"]
    assert_same_prompt_logprobs(llm, ref, PROMPT)
    assert_same_greedy(llm, ref, PROMPT[:20])


@pytest.mark.parametrize("arch, config, options", [
    ("mistral", {"sliding_window": 32}, {}),
    # layer 1 slides: as layer_types says (max_window_layers 28 would spare it), or from max_window_layers
    ("qwen2", {"use_sliding_window": True, "sliding_window": 32,
               "layer_types": ["full_attention", "sliding_attention"]}, {}),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 32, "max_window_layers": 1}, {"layout": "4.x"}),
])
def test_sliding_window_caps_the_context(arch, config, options, tmp_path, tokenizer_dir):
    """alise has no windowed attention: it serves at most `sliding_window` tokens, where the window changes
    nothing, says so when loading, and matches transformers there."""
    folder = write_model(tmp_path / arch, tokenizer_dir, arch, **options, **config)
    with pytest.warns(UserWarning, match=r"sliding_window=32.*caps the context \(max_model_len\) at 32"):
        llm = alise(folder)
    assert llm.engine.model.config.max_position_embeddings == 32 and llm.engine.max_model_len == 32
    ref = reference(folder)
    assert_same_prompt_logprobs(llm, ref, PROMPT[:31])
    out = llm.generate([PROMPT[:10]], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 22
    assert out.token_ids == greedy_reference(ref, PROMPT[:10], 22)
    too_long = llm.generate([PROMPT[:40]], SamplingParams(max_tokens=1))[0]
    assert too_long.finish_reason == "abort" and "max_model_len is 32" in too_long.error


# ---------------------------------------------------------------------------------------------------------
# unsupported values: refused, naming the key


def saved_config(folder: Path, arch: str = "llama", **config) -> dict:
    config_cls, model_cls = CLASSES[arch]
    config_cls(**BASE | config, architectures=[model_cls.__name__]).save_pretrained(folder)
    return json.loads((folder / "config.json").read_text())


REFUSALS = {
    # name: (architecture, edit of the saved config.json, what the error names)
    "rope-dynamic": ("llama", {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}},
                     "rope_type='dynamic'"),
    "rope-dynamic-4.x": ("llama", {"rope_parameters": None, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
                         "rope_type='dynamic'"),
    "rope-longrope": ("llama", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4,
                                                    "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}},
                      "rope_type='longrope'"),
    "rope-partial": ("llama", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                                   "partial_rotary_factor": 0.5}}, "partial_rotary_factor=0.5"),
    "rope-missing-parameter": ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0,
                                                             "low_freq_factor": 1.0}}, "high_freq_factor"),
    "rope-per-layer-type": ("qwen2", {"rope_parameters": {"full_attention": {"rope_type": "default"}}},
                            "full_attention"),
    "hidden-act": ("llama", {"hidden_act": "relu2"}, "hidden_act='relu2'"),
    "rope-interleaved": ("llama", {"rope_interleaved": True}, "rope_interleaved=True"),
    "mrope": ("qwen2", {"use_mrope": True}, "use_mrope=True"),
    "unknown-key": ("llama", {"quantization_config": {"quant_method": "gptq"}}, "'quantization_config'"),
    "mistral-layer-types": ("mistral", {"layer_types": ["sliding_attention"] * 2}, "'layer_types'"),
    "mistral-attention-bias": ("mistral", {"attention_bias": True}, "'attention_bias'"),
    "qwen2-layer-types": ("qwen2", {"layer_types": ["full_attention", "chunked_attention"]}, "layer_types="),
    "sliding-window": ("mistral", {"sliding_window": 0}, "sliding_window=0"),
    "architecture": ("llama", {"architectures": ["GemmaForCausalLM"]}, "'GemmaForCausalLM'"),
}


@pytest.mark.parametrize("name", REFUSALS)
def test_refuses_unsupported_config_by_name(name, tmp_path):
    arch, edit, names = REFUSALS[name]
    config = saved_config(tmp_path, arch) | edit
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as err:
        LlamaConfig.from_json(tmp_path / "config.json")
    assert names in str(err.value)


def test_every_saved_config_loads(tmp_path):
    """What transformers writes for each architecture (its defaults included) is all understood, and so are
    keys that no transformers class reads, with their neutral values."""
    for arch in CLASSES:
        (tmp_path / arch).mkdir()
        config = saved_config(tmp_path / arch, arch) | {"rope_interleaved": False, "use_mrope": False}
        (tmp_path / arch / "config.json").write_text(json.dumps(config))
        LlamaConfig.from_json(tmp_path / arch / "config.json")


@pytest.mark.parametrize("key", ["attention_bias", "mlp_bias"])
def test_loader_checks_bias_tensors_against_the_config(key, tmp_path, tokenizer_dir):
    """Biases are a config option: the loader expects their tensors exactly when the config asks for them."""
    with_bias = write_model(tmp_path / "with", tokenizer_dir, **{key: True})
    config = json.loads((with_bias / "config.json").read_text())
    (with_bias / "config.json").write_text(json.dumps(config | {key: False}))
    with pytest.raises(ValueError, match=r"unexpected tensor '.*_proj\.bias'"):
        Llama.from_pretrained(with_bias)
    without = write_model(tmp_path / "without", tokenizer_dir)
    config = json.loads((without / "config.json").read_text())
    (without / "config.json").write_text(json.dumps(config | {key: True}))
    with pytest.raises(ValueError, match=r"missing tensor '.*_proj\.bias'"):
        Llama.from_pretrained(without)


# ---------------------------------------------------------------------------------------------------------
# tokenizer and chat template: the same ids and text as AutoTokenizer

TEXTS = ["hello <|im_start|> world", "  two  spaces\nand é ü 日本 🎉", "<|im_end|><|endoftext|>x", ""]
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"}, {"role": "user", "content": "again"}]
TEMPLATE = (  # the special tokens by name, tojson's options, namespace, loop controls, tools
    "{{ bos_token }}[{{ eos_token }}|{{ pad_token }}|{{ unk_token }}]{% set ns = namespace(n=0) %}"
    "{% if tools is not none %}{{ raise_exception('no tools') }}{% endif %}"
    "{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}{% set ns.n = ns.n + 1 %}"
    "{{ m | tojson(indent=1, sort_keys=True) }}{% if not loop.last %}\n{% endif %}{% endfor %}"
    "<{{ ns.n }}>{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def tokenizer_folder(folder: Path, tokenizer_dir: Path, config: dict, template_file: str | None = None,
                     bos_post_processor: bool = False) -> Path:
    folder.mkdir()
    raw = RawTokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    if bos_post_processor:   # as Llama 2/3's tokenizer.json: BOS prepended by the post-processor
        raw.post_processor = processors.TemplateProcessing(single="<|im_start|> $A", pair="<|im_start|> $A $B",
                                                           special_tokens=[("<|im_start|>", 1)])
    raw.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if template_file is not None:
        (folder / "chat_template.jinja").write_text(template_file)
    return folder


TOKENIZER_CASES = {
    "conftest": ({}, None, False),
    "bos-post-processor": ({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                            "chat_template": "{{ bos_token }}" + CHATML}, None, True),   # as Llama 3
    "named-tokens-template": ({"chat_template": TEMPLATE, "bos_token": "<|im_start|>", "pad_token": "<|endoftext|>",
                               "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "special": True}},
                              None, False),
    "template-file-wins": ({"chat_template": "ignored", "eos_token": "<|im_end|>"}, TEMPLATE, False),
}


@pytest.mark.parametrize("name", TOKENIZER_CASES)
def test_tokenizer_matches_autotokenizer(name, tmp_path, tokenizer_dir):
    config, template_file, bos_post_processor = TOKENIZER_CASES[name]
    if name == "conftest":
        folder = tokenizer_dir
    else:
        folder = tokenizer_folder(tmp_path / name, tokenizer_dir, config, template_file, bos_post_processor)
    ours, theirs = Tokenizer.from_folder(folder), AutoTokenizer.from_pretrained(folder)
    assert (ours.bos_token_id, ours.eos_token_id) == (theirs.bos_token_id, theirs.eos_token_id)
    for text in TEXTS:
        assert ours.encode(text) == theirs(text)["input_ids"], text
        assert ours.encode(text, add_special_tokens=False) == theirs(text, add_special_tokens=False)["input_ids"]
    if bos_post_processor:
        assert ours.encode("hi")[0] == ours.bos_token_id
    for add_generation_prompt in (True, False):
        for messages in (MESSAGES, MESSAGES[1:2]):
            text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
            assert text == theirs.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
            # the template writes its own BOS: encoded without special tokens, as apply_chat_template does
            assert ours.encode(text, add_special_tokens=False) == theirs.apply_chat_template(
                messages, tokenize=True, return_dict=False, add_generation_prompt=add_generation_prompt)
