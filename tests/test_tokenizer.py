"""alise.tokenizer: encoding, decoding, chat templates and streaming detokenization."""
from __future__ import annotations

import json
import shutil

import pydoc_data.topics
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alise.tokenizer import CHATML_TEMPLATE, IncrementalDecoder, Tokenizer

MULTIBYTE = "Crème brûlée à São Paulo 🙂👍🏽 — naïve 日本語 😀! ß°…"


def stream(tok: Tokenizer, ids: list[int], **kw) -> list[str]:
    dec = IncrementalDecoder(tok, **kw)
    return [dec.push(i) for i in ids] + [dec.flush()]


def topics_text(n_chars: int = 20000) -> str:
    return "".join(pydoc_data.topics.topics.values())[:n_chars]


# ---------------------------------------------------------------------------------------------------------
# The default model's tokenizer (converted from the GGUF; real_model_dir is a session fixture in conftest.py)

@pytest.fixture(scope="session")
def smol(real_model_dir) -> Tokenizer:
    return Tokenizer.from_folder(real_model_dir)


@pytest.mark.slow
def test_special_ids_and_sizes(smol):
    assert smol.bos_token_id == 1 and smol.eos_token_id == 2
    assert smol.vocab_size == 49152
    assert smol.encode("<|im_start|>") == [1]
    assert smol.encode("<|im_end|>") == [2]
    assert smol.encode("<|im_start|>user\nHi<|im_end|>")[0] == 1
    assert smol.encode("<|im_start|>user\nHi<|im_end|>")[-1] == 2
    # special tokens vanish from decoded text unless asked for
    assert smol.decode([1, 2]) == ""
    assert smol.decode([1], skip_special_tokens=False) == "<|im_start|>"


@pytest.mark.slow
def test_no_bos_added(smol):
    # the GGUF says add_bos_token = false: the chat template supplies <|im_start|> itself
    assert smol.add_bos_token is False
    assert smol.encode("Hello")[0] != smol.bos_token_id
    assert smol.encode("") == []


@pytest.mark.slow
def test_digits_are_split_individually(smol):
    ids = smol.encode("12345")
    assert len(ids) == 5
    assert [smol.decode([i]) for i in ids] == list("12345")
    # a space before a number stays its own token, then one token per digit
    assert [smol.decode([i]) for i in smol.encode("in 2024")] == ["in", " ", "2", "0", "2", "4"]


@pytest.mark.slow
def test_matches_llama_cpp_token_ids(smol):
    """The converted tokenizer gives llama.cpp's ids (recorded below) for tricky inputs."""
    for text, ids in LLAMA_CPP_IDS.items():
        assert smol.encode(text) == ids, text


@pytest.mark.slow
def test_round_trip_real_text(smol):
    text = topics_text()
    ids = smol.encode(text)
    assert 2000 < len(ids) < len(text) / 2          # real compression, not one token per byte
    assert smol.decode(ids) == text
    assert smol.decode(smol.encode(MULTIBYTE)) == MULTIBYTE


@pytest.mark.slow
def test_chat_template_chatml(smol):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"}]
    expected = ("<|im_start|>system\nYou are terse.<|im_end|>\n"
                "<|im_start|>user\nHi there<|im_end|>\n"
                "<|im_start|>assistant\n")
    assert smol.apply_chat_template(messages) == expected
    no_prompt = expected[:-len("<|im_start|>assistant\n")]
    assert smol.apply_chat_template(messages, add_generation_prompt=False) == no_prompt


@pytest.mark.slow
def test_chat_template_default_system_prompt(smol):
    # SmolLM2's template adds its own system turn when the conversation has none
    expected = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
                "<|im_start|>assistant\n")
    prompt = smol.apply_chat_template([{"role": "user", "content": "What is 2+2?"}])
    assert prompt == expected
    ids = smol.encode(prompt)
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2


@pytest.mark.slow
def test_incremental_decoder_real_tokenizer(smol):
    for text in (topics_text(3000), MULTIBYTE, "emoji 🙂 at the end 👍🏽"):
        ids = smol.encode(text)
        pieces = stream(smol, ids)
        assert "".join(pieces) == smol.decode(ids) == text
        assert not any(p.endswith("\ufffd") for p in pieces)
    # an emoji is several byte tokens: the first ones complete nothing, the last one yields the character
    ids = smol.encode("🙂")
    assert len(ids) > 1
    assert stream(smol, ids)[:len(ids)] == [""] * (len(ids) - 1) + ["🙂"]


@pytest.mark.slow
def test_incremental_decoder_keeps_special_tokens_when_asked(smol):
    ids = smol.encode("<|im_start|>user\nHé<|im_end|>")
    assert "".join(stream(smol, ids, skip_special_tokens=False)) == "<|im_start|>user\nHé<|im_end|>"
    assert "".join(stream(smol, ids)) == "user\nHé"


# ---------------------------------------------------------------------------------------------------------
# Any HF-style folder: the tiny trained byte-level BPE of the test model (tiny_model_dir in conftest.py)

@pytest.fixture(scope="session")
def tiny(tiny_model_dir) -> Tokenizer:
    return Tokenizer.from_folder(tiny_model_dir)


def test_tiny_folder_basics(tiny):
    assert tiny.eos_token_id == tiny.token_to_id("<|im_end|>")
    assert tiny.bos_token_id == tiny.token_to_id("<|im_start|>")
    assert tiny.vocab_size == 320
    assert tiny.decode(tiny.encode(MULTIBYTE)) == MULTIBYTE


def test_tiny_incremental_decoder_multibyte(tiny):
    ids = tiny.encode(MULTIBYTE)
    pieces = stream(tiny, ids)
    assert "".join(pieces) == MULTIBYTE
    assert "" in pieces                              # some tokens end mid-character and are held back
    assert not any("\ufffd" in p for p in pieces)


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=40))
def test_incremental_decoder_property_text(tiny, text):
    ids = tiny.encode(text)
    pieces = stream(tiny, ids)
    assert "".join(pieces[:-1]) == tiny.decode(ids) == text
    assert pieces[-1] == ""


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=319), max_size=30))
def test_incremental_decoder_property_any_ids(tiny, ids):
    """Arbitrary ids may spell invalid UTF-8; the pieces plus flush() still add up to the full decode."""
    assert "".join(stream(tiny, ids)) == tiny.decode(ids)


def test_add_bos_token_from_config(tmp_path, tiny_model_dir):
    shutil.copy(tiny_model_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|endoftext|>", "add_bos_token": True}))
    tok = Tokenizer.from_folder(tmp_path)
    bos = tok.token_to_id("<|im_start|>")
    assert tok.bos_token_id == bos and tok.eos_token_id == tok.token_to_id("<|endoftext|>")
    assert tok.encode("hi")[0] == bos and tok.encode("hi")[1:] == Tokenizer.from_folder(tmp_path).inner.encode(
        "hi", add_special_tokens=False).ids
    assert tok.encode("") == [bos]


def test_chatml_fallback_without_template(tmp_path, tiny_model_dir):
    shutil.copy(tiny_model_dir / "tokenizer.json", tmp_path / "tokenizer.json")   # no tokenizer_config.json
    tok = Tokenizer.from_folder(tmp_path)
    assert tok.chat_template is None and tok.bos_token_id is None
    assert tok.eos_token_id == tok.token_to_id("<|im_end|>")                      # the ChatML end-of-turn
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "2+2?"}]
    assert tok.apply_chat_template(messages) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert tok.apply_chat_template(messages[:1], add_generation_prompt=False) == "<|im_start|>user\nHi<|im_end|>\n"
    assert "<|im_start|>" in CHATML_TEMPLATE


def test_template_is_sandboxed_and_validated(tmp_path, tiny):
    import jinja2

    def with_template(template: str) -> Tokenizer:
        return Tokenizer(tiny.inner, {"chat_template": template})

    messages = [{"role": "user", "content": "x"}]
    with pytest.raises(jinja2.exceptions.SecurityError):      # immutable sandbox: inputs cannot be mutated
        with_template("{{ messages.append(1) }}").apply_chat_template(messages)
    with pytest.raises(jinja2.exceptions.TemplateError, match="only user turns"):
        with_template("{% if messages[0]['role'] != 'system' %}{{ raise_exception('only user turns') }}{% endif %}"
                      ).apply_chat_template(messages)
    # no BOS declared -> ""; EOS falls back to ChatML's <|im_end|>
    assert with_template("{{ bos_token }}|{{ eos_token }}|{{ messages | tojson }}").apply_chat_template(messages) \
        == '|<|im_end|>|[{"role": "user", "content": "x"}]'
    with pytest.raises(ValueError):
        tiny.apply_chat_template("not a list")
    with pytest.raises(ValueError, match="no tokenizer.json"):
        Tokenizer.from_folder(tmp_path / "nowhere")



@pytest.mark.parametrize("messages, message", [
    ([], "non-empty list"),
    ("not a list", "messages must be"),
    (({"role": "user", "content": "x"},), "messages must be"),                  # a tuple is not a list
    (None, "messages must be"),
    ([{"role": "user", "content": "x"}, "hi"], r"messages\[1\] must be a dict"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}, {"role": "user", "content": None}],
     r"messages\[2\]: 'content' must be a string, got None"),
    ([{"role": "user"}], r"messages\[0\]: missing 'content'"),
    ([{"content": "x"}], r"messages\[0\]: missing 'role'"),
    ([{"role": "user", "content": "x"}, {"role": None, "content": "y"}], r"messages\[1\]: 'role' must be a string"),
    ([{"role": "user", "content": 3}], r"messages\[0\]: 'content' must be a string, got 3"),
    ([{"role": "user", "content": [{"type": "text", "text": "x"}]}], r"messages\[0\]: 'content' must be a string"),
])
def test_chat_messages_are_validated_naming_the_index(tiny, messages, message):
    with pytest.raises(ValueError, match=message):
        tiny.apply_chat_template(messages)


def test_valid_chat_messages_with_extra_keys_render(tiny):
    messages = [{"role": "system", "content": "", "name": "s"}, {"role": "user", "content": "Hi"}]
    assert tiny.apply_chat_template(messages).endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")

# Recorded from llama.cpp (llama-cpp-python 0.3.16, vocab_only=True, tokenize(add_bos=False, special=True)) on the
# same GGUF. Beyond these, 320 random slices of topics.py (up to 200k chars) and 20,000 fuzzed strings of digits,
# Unicode numbers, whitespace, contractions, emoji and special tokens matched llama.cpp exactly when checked.
LLAMA_CPP_IDS: dict[str, list[int]] = {
    '12345': [33, 34, 35, 36, 37],
    'in 2024': [254, 216, 34, 32, 34, 36],
    'Hello world': [19556, 905],
    '<|im_start|>user\nHi<|im_end|>\n': [1, 4093, 198, 26843, 2, 198],
    "don't I'll we've": [12420, 982, 339, 3060, 392, 3543],
    '  leading   spaces\n\n\ttabs  ': [216, 2899, 256, 5600, 1116, 197, 100, 7366, 256],
    MULTIBYTE:
        [25711, 11180, 1558, 1156, 41307, 92, 20174, 25782, 40481, 36619, 47526, 10813, 235, 231, 10813, 233, 138,
         1841, 15486, 46494, 17097, 241, 115, 40993, 179, 120, 248, 40303, 218, 17, 5549, 249, 4742, 2829],
    'x=1.5e-3; y = \uff13\uff14\uff15 \xbd \xb2 \u216b \u0663':
        [104, 45, 33, 30, 37, 85, 29, 35, 43, 329, 446, 216, 8083, 237, 8083, 238, 8083, 239, 216, 16738, 216, 19133,
         216, 173, 223, 121, 216, 164, 113],
    'a\r\nb\r\n\r\n': [81, 201, 198, 82, 18682],
    '   ': [333],
    '\n': [198],
    "HELLO'S 'quoted' I'M": [56, 4210, 6426, 23, 67, 637, 385, 5036, 23, 339, 23, 61],
    '<|endoftext|><repo_name>foo<file_sep>': [0, 3, 15236, 5],
    'def f(x):\n    return x**2  # comment\n':
        [1604, 275, 24, 104, 727, 472, 1003, 1792, 828, 34, 216, 907, 5189, 198],
    '\U0001f4a9\U0001f4a9\U0001f4a9\U0001f4a9\U0001f4a9':
        [10813, 236, 119, 10813, 236, 119, 10813, 236, 119, 10813, 236, 119, 10813, 236, 119],
    '\xa0nbsp\u2009thin': [15442, 94, 32093, 321, 227, 39200],
    '<|im_start|': [44, 108, 306, 79, 3738, 108],
    'a<|im_end|>b': [81, 2, 82],
}
