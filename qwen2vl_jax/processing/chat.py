"""Chat templates (the checkpoint's own Jinja template, rendered as transformers does) and the expansion of
vision placeholders.

    template = ChatTemplate.from_pretrained(folder)   # chat_template.jinja > .json > tokenizer_config.json > built-in
    text = template.render(messages, add_generation_prompt=True, add_vision_id=False)
    text, spans = template.render_with_assistant_spans(messages)   # + [(start, end)] chars of assistant turns

The built-in template is the released Qwen2-VL instruct one:

    <|im_start|>system\nYou are a helpful assistant.<|im_end|>\n        (when the first message is not a system one)
    <|im_start|>{role}\n{content}<|im_end|>\n                             (per message)
    <|im_start|>assistant\n                                              (add_generation_prompt)

An image item becomes `<|vision_start|><|image_pad|><|vision_end|>`, a video item
`<|vision_start|><|video_pad|><|vision_end|>`; then each pad is expanded to grid.prod() / merge_size²
copies, images and videos each consumed in order of appearance (across a whole batch).

Rendering matches transformers 5.24 (`render_jinja_template`; the environment is in chat_jinja.py) with the variables
messages, add_generation_prompt, tools, documents, the tokenizer's special tokens (bos_token, eos_token, ...)
and any extra keyword (e.g. add_vision_id).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from qwen2vl_jax.processing.chat_jinja import check_messages, compile_template, plain
from qwen2vl_jax.processing.tokenizer import IMAGE_TOKEN, VIDEO_TOKEN

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_PLACEHOLDER = "<|vision_start|><|video_pad|><|vision_end|>"

Message = Mapping[str, Any]  # {"role": str, "content": str | [{"type": "image"|"video"|"text", ...}]}

# chat_template.json of the released Qwen2-VL instruct checkpoints.
QWEN2VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
BUILTIN_ORIGIN = "the built-in Qwen2-VL chat template"
# What the released Qwen2-VL tokenizer_config.json sets; a folder's tokenizer_config.json overrides these.
DEFAULT_SPECIAL_TOKENS = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def is_image_item(item: Mapping[str, Any]) -> bool:
    return item.get("type") == "image" or "image" in item or "image_url" in item


def is_video_item(item: Mapping[str, Any]) -> bool:
    return item.get("type") == "video" or "video" in item


# ---------------------------------------------------------------- the template


class ChatTemplate:
    """A Jinja chat template plus where it came from (named in errors) and the special tokens it may use.

    Holds only strings, so it pickles into data-loader workers; the compiled template is cached per process."""

    def __init__(self, source: str = QWEN2VL_CHAT_TEMPLATE, origin: str = BUILTIN_ORIGIN,
                 special_tokens: Mapping[str, str] | None = None):
        import jinja2

        if not isinstance(source, str) or not source:
            raise ValueError(f"{origin}: the chat template must be a non-empty string, got {type(source).__name__}")
        self.source = source
        self.origin = origin
        self.special_tokens = dict(DEFAULT_SPECIAL_TOKENS if special_tokens is None else special_tokens)
        try:
            compile_template(source)
        except jinja2.TemplateError as e:  # TemplateSyntaxError and friends
            where = f" (template line {e.lineno})" if getattr(e, "lineno", None) else ""
            raise ValueError(f"{origin}: the chat template is not valid Jinja{where}: {e}; fix the template (or "
                             "remove its file: the next source in the folder is then used)") from e

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> ChatTemplate:
        """A checkpoint folder's template: chat_template.jinja, else chat_template.json ({"chat_template": str}),
        else tokenizer_config.json's "chat_template" (a string, or [{"name", "template"}] → "default"), else the
        built-in Qwen2-VL one. Special tokens come from tokenizer_config.json when the folder has one."""
        from etils import epath  # local or gs://

        path = epath.Path(path)
        config_path = path / "tokenizer_config.json"
        config = _read_json(config_path) if config_path.is_file() else {}
        special = _special_tokens(config)
        jinja_path, json_path = path / "chat_template.jinja", path / "chat_template.json"
        if jinja_path.is_file():
            return cls(jinja_path.read_text(), os.fspath(jinja_path), special)
        if json_path.is_file():
            data = _read_json(json_path)
            if "chat_template" not in data:
                raise ValueError(f"{os.fspath(json_path)}: has no 'chat_template' key (keys: {sorted(data)})")
            return cls(_default_template(data["chat_template"], json_path), os.fspath(json_path), special)
        if config.get("chat_template") is not None:
            return cls(_default_template(config["chat_template"], config_path), os.fspath(config_path), special)
        return cls(special_tokens=special)

    def __repr__(self) -> str:
        return f"ChatTemplate(origin={self.origin!r}, {len(self.source)} chars)"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ChatTemplate) and (self.source, self.special_tokens) == (
            other.source, other.special_tokens)

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True, *,
               tools: Sequence[Mapping[str, Any]] | None = None, documents: Sequence[Mapping[str, Any]] | None = None,
               **kwargs: Any) -> str:
        """One conversation → the prompt string (one `<|image_pad|>` / `<|video_pad|>` per item, unexpanded).

        kwargs are template variables (e.g. add_vision_id=True); they override the special tokens."""
        return self._render(check_messages(messages), add_generation_prompt, tools, documents, kwargs)

    def _render(self, messages: list[dict], add_generation_prompt: bool, tools, documents, kwargs) -> str:
        import jinja2

        variables = {**self.special_tokens, **plain(kwargs)}
        try:
            return compile_template(self.source).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                tools=plain(tools), documents=plain(documents), **variables)
        except jinja2.TemplateError as e:  # raise_exception(...) in the template, undefined attributes, ...
            raise ValueError(f"{self.origin}: rendering the chat template failed: {e}") from e

    def render_with_assistant_spans(
        self, messages: Sequence[Message], **kwargs: Any
    ) -> tuple[str, list[tuple[int, int]]]:
        """→ (render(messages, add_generation_prompt=False), [(start, end)] character spans of the assistant turns).

        Works for any template whose renders grow by appending: assistant message i spans from the end of
        render(messages[:i], add_generation_prompt=True) to the end of render(messages[:i+1]) with trailing
        whitespace removed (Qwen2-VL: its content and `<|im_end|>`, not the "\\n" after it). ValueError when a
        render is not a prefix of the whole one (such a template cannot place training labels)."""
        plain = check_messages(messages)
        full = self._render(plain, False, None, None, kwargs)
        spans = []
        for i, message in enumerate(plain):
            if message["role"] != "assistant":
                continue
            if i == 0:
                raise ValueError("message 0 is an assistant message: training labels need the prompt that comes "
                                 "before an assistant turn; start the conversation with a system or user message")
            prompt = self._render(plain[:i], True, None, None, kwargs)
            turn = self._render(plain[: i + 1], False, None, None, kwargs).rstrip()
            for name, text in ((f"the first {i} message(s) with add_generation_prompt=True", prompt),
                               (f"the first {i + 1} message(s)", turn)):
                if not full.startswith(text):
                    raise ValueError(f"{self.origin}: this chat template cannot be used for training labels: its "
                                     f"render of {name} is not a prefix of the whole conversation's render, so "
                                     f"assistant message {i} has no well-defined span")
            if len(turn) < len(prompt):
                raise ValueError(f"{self.origin}: this chat template cannot be used for training labels: assistant "
                                 f"message {i} renders to nothing after its generation prompt")
            spans.append((len(prompt), len(turn)))
        return full, spans


def _read_json(path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{os.fspath(path)}: not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{os.fspath(path)}: expected a JSON object, got {type(data).__name__}")
    return data


def _default_template(value: Any, path) -> str:
    """A "chat_template" value: a string, or transformers' [{"name", "template"}, ...] form → the "default" one."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(t, Mapping) and "name" in t and "template" in t for t in value):
        named = {t["name"]: t["template"] for t in value}
        if "default" in named:
            return named["default"]
        raise ValueError(f"{os.fspath(path)}: the chat templates {sorted(named)} include none named 'default'")
    raise ValueError(f"{os.fspath(path)}: 'chat_template' must be a string or a list of {{'name', 'template'}} "
                     f"dicts, got {type(value).__name__}")


def _special_tokens(config: Mapping[str, Any]) -> dict[str, str]:
    """tokenizer_config.json's bos/eos/unk/pad/... tokens (strings or {"content": ...}; null removes a default)."""
    tokens = dict(DEFAULT_SPECIAL_TOKENS)
    for key in SPECIAL_TOKEN_KEYS:
        if key not in config:
            continue
        value = config[key]
        value = value.get("content") if isinstance(value, Mapping) else value
        if value is None:
            tokens.pop(key, None)
        else:
            tokens[key] = str(value)
    return tokens


@functools.lru_cache(maxsize=None)
def builtin_template() -> ChatTemplate:
    """The released Qwen2-VL instruct template (compiled on first use)."""
    return ChatTemplate()


def apply_chat_template(messages: Sequence[Message], add_generation_prompt: bool = True, *,
                        template: ChatTemplate | str | None = None, **kwargs: Any) -> str:
    """One conversation → the prompt string, rendered by `template` (a ChatTemplate or Jinja source; None: the
    built-in Qwen2-VL template). kwargs are template variables, e.g. add_vision_id=True."""
    if template is None:
        template = builtin_template()
    elif isinstance(template, str):
        template = ChatTemplate(template, "the chat template string passed to apply_chat_template")
    return template.render(messages, add_generation_prompt, **kwargs)


def _tokens_per_item(grid_thw: np.ndarray | None, merge_size: int) -> list[int]:
    if grid_thw is None:
        return []
    grid = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    return [int(n) for n in grid.prod(axis=-1) // merge_size**2]


def _expand(texts: Sequence[str], token: str, counts: list[int], kind: str) -> list[str]:
    found = sum(t.count(token) for t in texts)
    if found != len(counts):
        raise ValueError(
            f"the text has {found} {token} placeholder(s) but {len(counts)} {kind}(s) were given; "
            f"each {kind} needs exactly one <|vision_start|>{token}<|vision_end|> in the text, in order "
            f"(the chat template writes one per {{'type': '{kind}'}} item)"
        )
    it = iter(counts)
    out = []
    for text in texts:
        pieces = text.split(token)
        expanded = [pieces[0]]
        for piece in pieces[1:]:
            expanded.append(token * next(it))
            expanded.append(piece)
        out.append("".join(expanded))
    return out


def expand_vision_placeholders(
    texts: Sequence[str],
    image_grid_thw: np.ndarray | None = None,
    video_grid_thw: np.ndarray | None = None,
    merge_size: int = 2,
    video_merge_size: int | None = None,
) -> list[str]:
    """Repeat the n-th `<|image_pad|>` (across all texts, in order) image_grid_thw[n].prod() / merge² times,
    and `<|video_pad|>` likewise with video_grid_thw. int64[n, 3] grids; ValueError on a count mismatch."""
    video_merge_size = merge_size if video_merge_size is None else video_merge_size
    texts = _expand(texts, IMAGE_TOKEN, _tokens_per_item(image_grid_thw, merge_size), "image")
    return _expand(texts, VIDEO_TOKEN, _tokens_per_item(video_grid_thw, video_merge_size), "video")
