"""The model's chat template, rendered as transformers does (sandboxed jinja2), or the plain default."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moeray.actors.frontend import Backend


class ChatTemplate:
    """The model's chat template, rendered as transformers does (sandboxed jinja2), or the plain default.

    The template comes from `chat_template.jinja` in the model folder or the `chat_template` key of its
    `tokenizer_config.json`. Without one, the default renders one "<role>: <content>" line per message and
    ends with "assistant: ", which suits base models trained on plain text.
    """

    def __init__(self, source: str | None = None, special_tokens: dict[str, str] | None = None) -> None:
        self.source = source
        self.special_tokens = special_tokens or {}
        self._template = _compile(source) if source else None

    @classmethod
    def from_model_dir(cls, path: str | Path | None) -> ChatTemplate:
        if path is None:
            return cls()
        folder = Path(path)
        config: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            config = json.loads((folder / "tokenizer_config.json").read_text())
        source = config.get("chat_template")
        if isinstance(source, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default") or next(iter(named.values()), None)
        jinja_file = folder / "chat_template.jinja"
        if jinja_file.exists():
            source = jinja_file.read_text()
        special = {}
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            value = config.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                special[key] = value
        return cls(source if isinstance(source, str) and source.strip() else None, special)

    def render(self, messages: Sequence[dict[str, Any]]) -> str:
        """messages (role, content as a string, any extra keys) -> the prompt text, ending where the reply starts."""
        if self._template is None:
            return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
        return self._template.render(messages=list(messages), add_generation_prompt=True, **self.special_tokens)


def _compile(source: str):
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise ValueError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def model_dir(backend: Backend) -> str | None:
    """Where a backend's model lives, when it says (DeploymentBackend knows its deployment's config)."""
    path = getattr(backend, "model_path", None)
    if path is None:
        path = getattr(getattr(getattr(backend, "dep", None), "config", None), "model", None)
    return str(path) if path else None
