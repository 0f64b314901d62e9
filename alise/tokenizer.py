"""Tokenizer: a ``tokenizers.Tokenizer`` plus the folder's chat template and special tokens.

Works for any HF-style folder that holds ``tokenizer.json``; ``tokenizer_config.json`` (optional) supplies
the chat template, the special tokens and ``add_bos_token``. Encoding and chat templates follow transformers
5's ``AutoTokenizer`` (tests/test_conformance.py compares them). Streaming output goes through
``IncrementalDecoder``, which turns token ids into text pieces without ever emitting half a character.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable

import tokenizers

__all__ = ["Tokenizer", "IncrementalDecoder", "CHATML_TEMPLATE"]

# ChatML, used when a folder has no chat template of its own.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class Tokenizer:
    """Text <-> token ids for one model folder."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, config: dict | None = None,
                 model_config: dict | None = None) -> None:
        """Wrap ``tokenizer``; ``config`` is tokenizer_config.json, ``model_config`` config.json (both optional)."""
        self.inner = tokenizer
        self.config = dict(config or {})
        self._model_config = dict(model_config or {})
        # BOS/EOS come from tokenizer.json's post-processor, as in transformers (Llama 2/3 and Mistral prepend BOS
        # there). Only a tokenizer.json without one takes add_bos_token from tokenizer_config.json: alise's GGUF
        # conversions state BOS that way (transformers 5 drops the key whenever there is a tokenizer.json).
        self.add_bos_token = tokenizer.post_processor is None and bool(self.config.get("add_bos_token", False))
        self.chat_template = _pick_template(self.config.get("chat_template"))
        self.bos_token_id = self._special_id("bos_token", "bos_token_id", ())
        # Without a declared EOS, fall back to the usual end-of-turn / end-of-text tokens if the vocab has one.
        self.eos_token_id = self._special_id("eos_token", "eos_token_id", ("<|im_end|>", "<|endoftext|>", "</s>"))
        if self.add_bos_token and self.bos_token_id is None:
            raise ValueError("tokenizer_config.json sets add_bos_token but names no BOS token")

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "Tokenizer":
        """Load ``tokenizer.json`` (required) and ``tokenizer_config.json`` / ``config.json`` (optional)."""
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ValueError(f"no tokenizer.json in {str(folder)!r}")
        config = _read_json(folder / "tokenizer_config.json")
        # Newer HF folders keep the template in its own file, which wins over tokenizer_config's (transformers 5)
        template_file = folder / "chat_template.jinja"
        if template_file.is_file():
            config["chat_template"] = template_file.read_text(encoding="utf-8")
        return cls(tokenizers.Tokenizer.from_file(str(path)), config, _read_json(folder / "config.json"))

    # ------------------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can produce, added tokens included."""
        return self.inner.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.inner.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; special tokens written in the text (``<|im_start|>``) become their ids.

        ``add_special_tokens`` adds BOS/EOS as transformers does (tokenizer.json's post-processor; or BOS when
        a tokenizer.json without one comes with ``add_bos_token``). Text that a chat template rendered holds
        its own BOS: encode it with ``add_special_tokens=False``, as transformers' ``apply_chat_template`` does.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids = self.inner.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos_token:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.inner.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """Render ``messages`` ([{"role": ..., "content": ...}, ...]) with the folder's chat template.

        Uses jinja2's immutable sandbox with transformers' options, filters and globals, and the same
        variables: the special tokens tokenizer_config.json names, ``tools`` and ``documents`` (None), extra
        keyword arguments over those. Falls back to ChatML when the folder has no template.
        """
        _check_messages(messages)
        named = {name: _token_content(self.config.get(name)) for name in _SPECIAL_TOKENS}
        variables = {name: text for name, text in named.items() if text is not None}
        # a BOS/EOS that tokenizer_config.json leaves unnamed renders as the token alise uses (transformers: "")
        variables |= {"bos_token": self._token_text(self.bos_token_id),
                      "eos_token": self._token_text(self.eos_token_id)}
        variables |= {"tools": None, "documents": None} | kwargs
        return self._compiled_template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                              **variables)

    # ------------------------------------------------------------------------------------------------------

    @cached_property
    def _compiled_template(self) -> Any:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise jinja2.exceptions.TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: \
            json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)   # Llama 3.1's date line
        return env.from_string(self.chat_template or CHATML_TEMPLATE)

    def _special_id(self, token_key: str, id_key: str, fallbacks: tuple[str, ...]) -> int | None:
        """Id of a special token: tokenizer_config's token string, else config.json's id, else a fallback."""
        token = _token_content(self.config.get(token_key))
        if token is not None:
            idx = self.inner.token_to_id(token)
            if idx is None:
                raise ValueError(f"tokenizer_config.json names {token_key} {token!r}, which is not in the vocabulary")
            return idx
        idx = self._model_config.get(id_key)
        if isinstance(idx, list):           # some configs list several EOS ids; the first is the main one
            idx = idx[0] if idx else None
        if isinstance(idx, int):
            return idx
        for name in fallbacks:
            if (idx := self.inner.token_to_id(name)) is not None:
                return idx
        return None

    def _token_text(self, idx: int | None) -> str:
        return "" if idx is None else (self.inner.id_to_token(idx) or "")


# transformers' SPECIAL_TOKENS_ATTRIBUTES: the tokens a chat template sees by name
_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_content(token: Any) -> str | None:
    """A special token's text from tokenizer_config.json, which sometimes stores {"content": "<s>", ...}."""
    token = token.get("content") if isinstance(token, dict) else token
    return token if isinstance(token, str) else None


def _check_messages(messages: Any) -> None:
    """A non-empty list of dicts, each with a str ``"role"`` and a str ``"content"`` (other keys pass through)."""
    if not isinstance(messages, list) or not messages:
        got = "an empty list" if isinstance(messages, list) else type(messages).__name__
        raise ValueError(f"messages must be a non-empty list of dicts with 'role' and 'content', got {got}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(message).__name__}")
        for key in ("role", "content"):
            if key not in message:
                raise ValueError(f"messages[{i}]: missing {key!r}")
            if not isinstance(message[key], str):
                raise ValueError(f"messages[{i}]: {key!r} must be a string, got {message[key]!r:.80}")


def _pick_template(template: Any) -> str | None:
    """HF allows a list of named templates; the one named "default" is the chat template."""
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        return named.get("default")
    return template if isinstance(template, str) else None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class IncrementalDecoder:
    """Turns a stream of token ids into text deltas whose concatenation is the full decode.

    Each ``push`` decodes a short window of recent tokens: the text of the tokens already emitted
    (``prefix``) and of those plus the pending ones. Only when the longer text grows past the prefix and
    does not end in U+FFFD (the replacement character a decoder emits for an incomplete UTF-8 sequence,
    as when an emoji is split over several byte tokens) is the new part returned and the window moved on.
    Decoding with the preceding tokens as context keeps decoders that treat a leading space specially
    (SentencePiece) correct. This is the scheme of HF text-generation-inference and vLLM.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix_offset = 0   # start of the context window
        self._read_offset = 0     # tokens before this have been emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes ("" while a character is still incomplete)."""
        self.ids.append(int(token_id))
        prefix = self._decode(self.ids[self._prefix_offset:self._read_offset])
        text = self._decode(self.ids[self._prefix_offset:])
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
            return text[len(prefix):]
        return ""

    def flush(self) -> str:
        """Return whatever is still held back (e.g. a truncated character, as U+FFFD) at the end of a stream."""
        prefix = self._decode(self.ids[self._prefix_offset:self._read_offset])
        text = self._decode(self.ids[self._prefix_offset:])
        self._prefix_offset = self._read_offset = len(self.ids)
        return text[len(prefix):]
