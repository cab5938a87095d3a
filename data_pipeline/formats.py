"""The conversation formats fine-tuning data already comes in, read into Qwen chat messages (per record, by its keys).

    Qwen            {"messages": [{"role", "content": str | [{"type": "image"|"video"|"text", ...}]}],
                     "images"?: [...], "videos"?: [...]}
    LLaMA-Factory,  {"messages": [{"role": "user", "content": "<image>Who is this?"}, ...],
    ms-swift         "images": ["a.jpg" | {"path": "a.jpg"}], "videos"?: [...], "system"?: str}
    ShareGPT        {"conversations": [{"from": "human", "value": "<image>..."}, {"from": "gpt", "value": "..."}],
                     "images"?: [...], "videos"?: [...], "system"?: str}
    LLaVA           {"id": ..., "image"?: "x.jpg" | [...],
                     "conversations": [{"from": "human", "value": "<image>\\n..."}, ...]}

Rules (``to_qwen``):
- "messages" and "conversations" together are refused. "conversations" items are ``{"from", "value"}`` with roles
  human/user → user, gpt/assistant → assistant, system → system; tool turns (observation, function_call, tool...)
  are refused, since the chat template trained here has no tool turns.
- A STRING content is split at its ``<image>`` / ``<video>`` tags into content items in order: ``"<image>Who is
  <video> this?"`` → image, text "Who is ", video, text " this?". A tag eats one newline on each side it touches
  (LLaVA writes ``"<image>\\nWhat…"``; Qwen's own data puts no newline after a vision block), and empty text pieces
  are dropped. A string without tags stays the same string. LIST contents are Qwen items and are kept as they are:
  their text is never searched for tags (the media there are explicit items already).
- Tag items take their files from the top-level lists ("images"/"videos", LLaVA's "image") in order, after any
  earlier ``{"type": "image"}`` item without its own reference; a list entry may be ``{"path": ...}`` (ms-swift).
  A tag count that disagrees with its list is a RecordError naming the key and both counts.
- A non-empty top-level "system" string becomes the first message, as written (a record holding a system message
  as well is refused; "" means none). Roles other than system/user/assistant are refused.
"""
from __future__ import annotations

import re


class RecordError(ValueError):
    """A conversation that cannot be normalized (reported as an error record)."""


_TAG = re.compile(r"(<image>|<video>)")
_TAG_KIND = {"<image>": "image", "<video>": "video"}
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
TOOL_ROLES = ("observation", "function_call", "function", "tool", "tool_call", "tool_response", "ipython")


def split_tags(text: str) -> str | list:
    """``text`` with its <image>/<video> tags as Qwen content items (see the module docstring); unchanged if it has
    none."""
    pieces = _TAG.split(text)  # text, tag, text, tag, ..., text
    if len(pieces) == 1:
        return text
    items = []
    for k, piece in enumerate(pieces):
        if k % 2:
            items.append({"type": _TAG_KIND[piece]})
            continue
        if k > 0 and piece.startswith("\n"):
            piece = piece[1:]
        if k < len(pieces) - 1 and piece.endswith("\n"):
            piece = piece[:-1]
        if piece:
            items.append({"type": "text", "text": piece})
    return items


def _role_error(role, where: str, expected: str) -> RecordError:
    if role in TOOL_ROLES:
        return RecordError(f"{where} has the tool-calling role {role!r}, which is not supported (the chat template "
                           "trained here has no tool turns); drop such records or fold the turn into a user message")
    return RecordError(f"{where} has unknown role {role!r}; expected {expected}")


def _from_messages(messages) -> tuple[list, set]:
    """→ (Qwen messages, indices of the messages whose string content held tags)."""
    if messages is None:
        raise RecordError("'messages' must be a non-empty list of {role, content} dicts (or give ShareGPT/LLaVA "
                          "'conversations': [{from, value}, ...]); this line has neither")
    if not isinstance(messages, list) or not messages:
        raise RecordError("'messages' must be a non-empty list of {role, content} dicts")
    out, tagged = [], set()
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RecordError(f"'messages' item {i} ({m!r:.80}) lacks 'role' or 'content'")
        if m["role"] not in ROLES:
            raise _role_error(m["role"], f"'messages' item {i}", "system, user or assistant")
        content = m["content"]
        if isinstance(content, str):
            items = split_tags(content)
            if items is not content:
                m = {**m, "content": items}
                tagged.add(i)
        elif not isinstance(content, list):
            raise RecordError(f"'messages' item {i}: 'content' must be a string or a list of items, "
                              f"got {type(content).__name__}")
        out.append(m)
    return out, tagged


def _from_conversations(turns) -> list:
    if not isinstance(turns, list) or not turns:
        raise RecordError(f"'conversations' must be a non-empty list of {{from, value}} dicts, got "
                          f"{type(turns).__name__ if not isinstance(turns, list) else 'an empty list'}")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RecordError(f"'conversations' item {i} must be a {{from, value}} dict, got {type(turn).__name__}")
        for key in ("from", "value"):
            if key not in turn:
                raise RecordError(f"'conversations' item {i} has no {key!r}")
        role = SHAREGPT_ROLES.get(turn["from"]) if isinstance(turn["from"], str) else None
        if role is None:
            raise _role_error(turn["from"], f"'conversations' item {i} 'from'", "human, gpt or system")
        if not isinstance(turn["value"], str):
            raise RecordError(f"'conversations' item {i}: 'value' must be a string, got {type(turn['value']).__name__}")
        out.append({"role": role, "content": split_tags(turn["value"])})
    return out


def _media_list(value, key: str) -> list | None:
    """A top-level media list with ``{"path": ...}`` entries read as their path; a LLaVA "image" string as [it]."""
    if value is None:
        return None
    if key == "image" and isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise RecordError(f"top-level {key!r} must be a list, got {type(value).__name__}")
    out = []
    for k, entry in enumerate(value):
        if isinstance(entry, dict):
            if not isinstance(entry.get("path"), str):
                raise RecordError(f"entry {k} of {key!r} is a dict without a 'path' string ({entry!r:.80}); "
                                  "give a file path or URL")
            entry = entry["path"]
        out.append(entry)
    return out


def _count(messages: list, kind: str, tagged: set) -> tuple[int, int, int]:
    """(tag items, list items without their own reference, list items with one) of ``kind`` in the messages."""
    tags = bare = own = 0
    for i, m in enumerate(messages):
        if isinstance(m["content"], list):
            for item in m["content"]:
                if isinstance(item, dict) and item.get("type") == kind:
                    if i in tagged:
                        tags += 1
                    elif item.get(kind) is None:
                        bare += 1
                    else:
                        own += 1
    return tags, bare, own


def _entries(n: int) -> str:
    return f"{n} entry" if n == 1 else f"{n} entries"


def to_qwen(obj: dict) -> tuple[dict, set]:
    """One JSONL object of any format above → ({"messages", "images", "videos"} in Qwen form, the top-level keys
    consumed); raises RecordError naming the key at fault."""
    if "messages" in obj and "conversations" in obj:
        raise RecordError("both 'messages' and 'conversations' are given; keep one of them")
    if "audios" in obj and obj["audios"]:
        raise RecordError("'audios' are not supported by Qwen2-VL; drop them")
    consumed = {"messages", "conversations", "images", "videos", "audios"}
    if "conversations" in obj:
        messages = _from_conversations(obj["conversations"])
        tagged = {i for i, m in enumerate(messages) if isinstance(m["content"], list)}
        if "image" in obj and "images" in obj:
            raise RecordError("both 'image' (LLaVA) and 'images' are given; keep one of them")
        image_key = "image" if "image" in obj else "images"
        consumed.add("image")
    else:
        messages, tagged = _from_messages(obj.get("messages"))
        image_key = "images"
    system = obj.get("system")
    if system is not None:
        if not isinstance(system, str):
            raise RecordError(f"top-level 'system' must be a string, got {type(system).__name__}")
        consumed.add("system")
        if system:
            if messages[0]["role"] == "system":
                raise RecordError("a top-level 'system' and a system message are both given; keep one of them")
            messages = [{"role": "system", "content": system}] + messages  # kept as written: no tags there
            tagged = {i + 1 for i in tagged}
    media = {"images": _media_list(obj.get(image_key), image_key), "videos": _media_list(obj.get("videos"), "videos")}
    for kind, key in (("image", image_key), ("video", "videos")):
        tags, bare, own = _count(messages, kind, tagged)
        given = len(media[kind + "s"] or [])
        # a record of tags only (or with no media items at all) is checked here; Qwen items are left to _media_refs
        if (tags or not (bare or own)) and tags + bare != given:
            also = f" and {bare} {{'type': '{kind}'}} item(s) without their own {kind!r}" if bare else ""
            why = (f": {given - tags - bare} of them have no matching <{kind}> tag" if given > tags + bare else
                   f": {tags + bare - given} <{kind}> tag(s) have no file")
            raise RecordError(f"{tags} <{kind}> tag{'' if tags == 1 else 's'}{also} but {_entries(given)} in "
                              f"{key!r}{why}")
    return {"messages": messages, **media}, consumed
