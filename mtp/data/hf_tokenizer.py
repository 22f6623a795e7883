"""Hugging Face ``tokenizers`` tokenizer of an imported model (``DIR/tokenizer.json``).

Same interface as :class:`mtp.data.tokenizer.Tokenizer` (``encode`` adds no special tokens,
``decode`` skips them), plus the chat template. Special-token ids and the chat template live in the
sidecar ``DIR/tokenizer_config.json`` (the Hugging Face name and layout: ``bos_token``,
``eos_token``, ``pad_token``, ``chat_template``, plus ``*_token_id`` written by ``mtp convert``).
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Sequence

import numpy as np
from tokenizers import Tokenizer as _HFTokenizer

from mtp.extras import MissingExtra

CONFIG_NAME = "tokenizer_config.json"
_SPECIALS = ("bos", "eos", "pad", "unk")


def _token_text(value) -> str | None:
    """A special token as HF's tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer:
    """A ``tokenizer.json`` plus its ``tokenizer_config.json`` sidecar (special ids, chat template)."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        self._tok = _HFTokenizer.from_file(str(self.path))
        config_path = self.path.with_name(CONFIG_NAME)
        self.config: dict = json.loads(config_path.read_text()) if config_path.exists() else {}
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)
        ids = {name: self._special_id(name) for name in _SPECIALS}
        self.bos_id: int = -1 if ids["bos"] is None else ids["bos"]
        self.eos_id: int = -1 if ids["eos"] is None else ids["eos"]
        self.unk_id: int = -1 if ids["unk"] is None else ids["unk"]
        pad = ids["pad"] if ids["pad"] is not None else ids["eos"]
        self.pad_id: int = 0 if pad is None else pad
        self.chat_template: str | None = self.config.get("chat_template") or None

    def _special_id(self, name: str) -> int | None:
        value = self.config.get(f"{name}_token_id")
        if isinstance(value, int):
            return value
        text = _token_text(self.config.get(f"{name}_token"))
        return self._tok.token_to_id(text) if text else None

    def token_text(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id)) if token_id >= 0 else None

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without bos/eos."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of ``ids``; special tokens (bos/eos/pad, chat markers) decode to nothing."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text of ``messages`` (``[{"role", "content"}, ...]``) by the model's own
        Jinja chat template (rendered with jinja2, the ``chat`` extra); ChatML (SmolLM2's format)
        when there is no template."""
        if self.chat_template:
            try:
                from jinja2.sandbox import ImmutableSandboxedEnvironment
            except ImportError:  # a silent ChatML fallback would give a model of another format wrong prompts
                raise MissingExtra("This tokenizer's chat template", "jinja2", "chat") from None

            def raise_exception(message):
                raise ValueError(f"chat template: {message}")

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            template = env.from_string(self.chat_template)
            return template.render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.token_text(self.bos_id) or "", eos_token=self.token_text(self.eos_id) or "")
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size}, path={str(self.path)!r})"


def write_tokenizer(directory: str | os.PathLike, tokenizer: _HFTokenizer, config: dict) -> None:
    """Write ``tokenizer.json`` and its sidecar ``tokenizer_config.json`` into ``directory``.
    ``config``: ``{bos,eos,pad,unk}_token_id`` (int or None), ``chat_template`` and any extra keys;
    the token strings are filled in from the ids."""
    d = pathlib.Path(directory)
    tokenizer.save(str(d / "tokenizer.json"))
    out = dict(config)
    for name in _SPECIALS:
        token_id = out.get(f"{name}_token_id")
        if isinstance(token_id, int) and token_id >= 0:
            out.setdefault(f"{name}_token", tokenizer.id_to_token(token_id))
    (d / CONFIG_NAME).write_text(json.dumps(out, indent=2, ensure_ascii=False))
