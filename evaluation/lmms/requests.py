"""lmms-eval `generate_until` requests → this project's generation, without importing lmms-eval (so it is testable
on its own with stand-in requests).

A request's `args` is lmms-eval's tuple (context, gen_kwargs, doc_to_visual, doc_id, task, split); the visuals are
`doc_to_visual(task_dict[task][split][doc_id])`: PIL images, video file paths, image file paths, qwen-vl-utils
item dicts ({"video": path, ...} / {"image": ...}) or arrays (uint8[H, W, 3] image, uint8[T, H, W, 3] video).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 128  # lmms-eval's own models' default when a task sets none
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")  # other paths are videos (.gif too)
KNOWN_GEN_KWARGS = {"until", "max_new_tokens", "temperature", "do_sample", "top_p", "top_k", "num_beams",
                    "repetition_penalty", "image_aspect_ratio"}


@dataclasses.dataclass(frozen=True)
class GenOptions:
    """One generate_many call's options: requests with equal options share batches."""

    max_new_tokens: int
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None

    def kwargs(self) -> dict:
        """generate's sampling options (traced scalars: any values share one program). repetition_penalty None:
        the checkpoint's generation_config.json, as transformers' generate does."""
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p,
                "repetition_penalty": self.repetition_penalty}


def parse_gen_kwargs(gen_kwargs: Mapping[str, Any] | None,
                     default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> tuple[GenOptions, list[str]]:
    """A task's generation_kwargs → (GenOptions, stop strings). temperature missing, 0 or do_sample False: greedy
    (lmms-eval's convention, not the checkpoint's generation_config.json)."""
    kw = dict(gen_kwargs or {})
    until = kw.get("until") or []
    if isinstance(until, str):
        until = [until]
    elif not isinstance(until, (list, tuple)):
        raise ValueError(f"gen_kwargs['until'] must be a string or a list of strings, got {type(until).__name__}")
    unknown = sorted(set(kw) - KNOWN_GEN_KWARGS)
    if unknown:
        log.debug("qwen2vl_jax: ignoring generation_kwargs %s", unknown)
    if int(kw.get("num_beams") or 1) > 1:
        log.warning("qwen2vl_jax: num_beams=%s is not supported; decoding without beam search", kw["num_beams"])
    temperature = float(kw.get("temperature") or 0.0)
    if kw.get("do_sample") is False or temperature < 0:
        temperature = 0.0
    max_new_tokens = kw.get("max_new_tokens")
    max_new_tokens = int(default_max_new_tokens if max_new_tokens is None else max_new_tokens)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
    top_k = kw.get("top_k")
    top_p = kw.get("top_p")
    penalty = kw.get("repetition_penalty")
    options = GenOptions(max_new_tokens=max_new_tokens, temperature=temperature,
                         top_k=None if top_k in (None, 0) else int(top_k),
                         top_p=None if top_p is None else float(top_p),
                         repetition_penalty=None if penalty in (None, 1, 1.0) else float(penalty))
    return options, [str(s) for s in until if s]


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """`text` up to the earliest occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in until if s) if i >= 0), default=len(text))
    return text[:cut]


def _flatten(visuals) -> list:
    if visuals is None:
        return []
    if isinstance(visuals, (list, tuple)):
        return [v for item in visuals for v in _flatten(item)]
    return [visuals]


def classify_visual(visual) -> str:
    """'image' or 'video' for one doc_to_visual item; ValueError for what the model cannot take (audio, ...)."""
    from PIL import Image

    if isinstance(visual, Image.Image):
        return "image"
    if isinstance(visual, (str, os.PathLike)):
        return "image" if os.fspath(visual).lower().endswith(IMAGE_SUFFIXES) else "video"
    if isinstance(visual, Mapping):
        if "video" in visual:
            return "video"
        if "image" in visual:
            return "image"
        if "array" in visual or "sampling_rate" in visual:
            raise ValueError("audio inputs are not supported by qwen2vl_jax")
        raise ValueError(f"a visual dict needs an 'image' or 'video' key, got keys {sorted(visual)}")
    if isinstance(visual, np.ndarray):
        if visual.ndim == 3:
            return "image"
        if visual.ndim == 4:
            return "video"
        raise ValueError(f"an array visual is uint8[H, W, 3] (image) or [T, H, W, 3] (video), got {visual.shape}")
    raise ValueError(f"unsupported visual of type {type(visual).__name__}")


def build_messages(context: str, visuals: Sequence[Any], system_prompt: str | None = None
                   ) -> tuple[list[dict], list, list]:
    """(messages, images, videos): one user turn with the visuals first (in doc_to_visual order), then the
    context with any llava-style "<image>" markers removed."""
    images, videos, content = [], [], []
    for visual in visuals:
        kind = classify_visual(visual)
        if kind == "image" and isinstance(visual, Mapping):
            visual = visual["image"]
        (images if kind == "image" else videos).append(visual)
        content.append({"type": kind})
    text = context.replace("<image>", "").strip() if visuals else context
    messages = [{"role": "user", "content": content + [{"type": "text", "text": text}]}]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages, images, videos


class Generator:
    """Processor + opened model (evaluation.serving.Model) serving lmms-eval generate_until requests."""

    def __init__(self, processor, model, *, batch_size: int = 8, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 system_prompt: str | None = None, seed: int = 0):
        self.processor, self.model = processor, model
        self.batch_size, self.max_new_tokens = int(batch_size), int(max_new_tokens)
        self.system_prompt, self.seed = system_prompt, int(seed)
        self.errors: list[tuple[int, str]] = []  # (request position, error) of requests answered with ""
        self.last_stats: dict = {}

    def prepare(self, args: tuple, task_dict: Mapping) -> tuple[dict, GenOptions, list[str]]:
        """One request's args → (processor batch of one, options, stop strings); raises for bad media/prompts."""
        context, gen_kwargs, doc_to_visual, doc_id, task, split = args[:6]
        visuals = []
        if doc_to_visual is not None:
            visuals = _flatten(doc_to_visual(task_dict[task][split][doc_id]))
        options, until = parse_gen_kwargs(gen_kwargs, self.max_new_tokens)
        messages, images, videos = build_messages(context, visuals, self.system_prompt)
        batch = self.processor([messages], images=images or None, videos=videos or None)
        return batch, options, until

    def generate_until(self, requests: Sequence[Any], task_dict: Mapping,
                       progress: Callable[[int], None] | None = None) -> list[str]:
        """One answer per request (objects with lmms-eval's `args`), in request order. Requests with equal
        options run together through generate_many, `batch_size` at a time, similar sizes side by side. A request
        that cannot run (bad media, too long) is answered "" and logged in `self.errors`."""
        from qwen2vl_jax.generation import generate_many, request_size

        start = time.perf_counter()
        answers: list[str | None] = [None] * len(requests)
        groups: dict[GenOptions, list[int]] = {}
        prepared: dict[int, tuple[dict, list[str]]] = {}
        for i, request in enumerate(requests):
            try:
                batch, options, until = self.prepare(request.args, task_dict)
            except (ValueError, OSError, TypeError, KeyError) as error:
                self._fail(i, answers, error, progress)
                continue
            prepared[i] = (batch, until)
            groups.setdefault(options, []).append(i)
        eos = self.processor.tokenizer.eos_token_ids
        generated = 0
        for options, members in groups.items():
            members.sort(key=lambda i: request_size(prepared[i][0]))
            # chunks of a few batches: progress moves, and a chunk's similar sizes still share buckets
            step = self.batch_size * 4
            for at in range(0, len(members), step):
                chunk = members[at:at + step]
                with self.model.context():
                    results = generate_many(self.model.config, self.model.params,
                                            [prepared[i][0] for i in chunk], batch_size=self.batch_size,
                                            max_new_tokens=options.max_new_tokens, seed=self.seed,
                                            eos_token_ids=eos, **options.kwargs())
                for i, result in zip(chunk, results):
                    if isinstance(result, Exception):
                        self._fail(i, answers, result, progress)
                        continue
                    text = self.processor.decode(np.asarray(result))
                    answers[i] = cut_at_stop(text, prepared[i][1]).strip()
                    generated += 1
                    if progress:
                        progress(1)
        seconds = time.perf_counter() - start
        self.last_stats = {"requests": len(requests), "generated": generated, "failed": len(requests) - generated,
                           "seconds": seconds, "samples_per_s": len(requests) / seconds if seconds else None}
        log.info("qwen2vl_jax: %d requests in %.2f s (%.2f samples/s), %d failed", len(requests), seconds,
                 self.last_stats["samples_per_s"] or 0.0, len(requests) - generated)
        return answers  # type: ignore[return-value]

    def _fail(self, i: int, answers: list, error: BaseException, progress) -> None:
        message = f"{type(error).__name__}: {error}"
        log.warning("qwen2vl_jax: request %d cannot run (%s); answering ''", i, message)
        self.errors.append((i, message))
        answers[i] = ""
        if progress:
            progress(1)
