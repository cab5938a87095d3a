"""The Jinja environment transformers 5.24 renders chat templates in (`render_jinja_template`), rebuilt here.

    compile_template(source) → a jinja2 Template (cached per process), rendered with
    render_variables(messages, ...) → plain-JSON messages (non-JSON values, e.g. PIL images, become "<TypeName>";
    message keys whose value is None dropped)

An ImmutableSandboxedEnvironment with trim_blocks and lstrip_blocks, the loopcontrols extension and a
`{% generation %}` tag (rendered as its body), the `tojson` filter without HTML escaping, and the `raise_exception`,
`strftime_now`, `dict` and `namespace` globals.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import numpy as np

Message = Mapping[str, Any]  # {"role": str, "content": str | [{"type": "image"|"video"|"text", ...}]}

def _raise_exception(message: str):
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    """Jinja's own tojson HTML-escapes; chat templates want plain JSON."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _DictBuilder:
    """`dict(...)` / `dict.fromkeys(...)` in templates, without handing the sandbox the `dict` type itself."""

    def __call__(self, *args, **kwargs) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, keys, value=None) -> dict:
        return dict.fromkeys(keys, value)


@functools.lru_cache(maxsize=None)
def _environment():
    """The one sandboxed environment all templates compile in (built on first use)."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    import jinja2.sandbox
    import jinja2.utils

    class GenerationTag(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker): renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):
        """`namespace(...)` that refuses underscore attributes (no reaching CPython internals through it)."""

        def __init__(*args, **kwargs):
            self, rest = args[0], args[1:]
            attrs = dict(*rest, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates may not set the namespace attribute {name!r}")

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_DictBuilder(),
                       namespace=Namespace)
    return env


@functools.lru_cache(maxsize=64)
def compile_template(source: str):
    """Template source → compiled jinja2.Template (cached: each distinct source compiles once per process)."""
    return _environment().from_string(source)


def plain(value: Any) -> Any:
    """Rebuild `value` from plain JSON types (str/int/float/bool/None, dicts, lists, tuples); anything else (PIL
    images, arrays, ...) becomes the string "<TypeName>": templates test for media keys, never read their values,
    and the sandbox must not see objects with unsafe methods."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):  # subclasses (enums, numpy strings) carry methods of their own
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, np.generic):
        return plain(value.item())
    if isinstance(value, Mapping):
        return {plain(k): plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain(v) for v in value)
    return f"<{type(value).__name__}>"


def check_messages(messages: Sequence[Message]) -> list[dict]:
    """Validate a conversation; → its messages as plain dicts with None-valued keys dropped (as transformers)."""
    if isinstance(messages, (str, Mapping)) or not isinstance(messages, Sequence):
        raise TypeError(f"a conversation is a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    if not messages:
        raise ValueError("a conversation needs at least one message")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or (
                "content" not in message and "tool_calls" not in message):
            keys = sorted(message) if isinstance(message, Mapping) else type(message).__name__
            raise ValueError(f"message {i} must have 'role' and 'content' keys, got keys {keys}")
        out.append({k: v for k, v in message.items() if v is not None})
    return plain(out)
