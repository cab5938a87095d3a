"""Which parameters train, and how fast: the stage, `optim.freeze` and `optim.lr_multipliers` as one learning-rate
scale per parameter — per layer for the stacked layers of a scanned model.

Patterns are Python regexes searched in a parameter's path as the unrolled model names it, e.g.
"visual/blocks_3/attn/qkv/kernel", "visual/merger/mlp_0/kernel", "language_model/layers_27/mlp/up_proj/kernel"
(in a scanned model "visual/blocks/attn/qkv/kernel" holds every block; block i is matched as "visual/blocks_i/…", so
a pattern can freeze the first 16 ViT blocks of either layout: `visual/blocks_([0-9]|1[0-5])/`).

    scales = update_scales(params, stage="all", freeze=r"visual/blocks_([0-9]|1[0-5])/",
                           lr_multipliers=r"visual/blocks=0.1;visual/merger=1")
    # leaf → float32[] (unstacked) or float32[layers] (stacked): 0 frozen, else its multiplier (first match wins)

A scale of 0 means frozen: no gradient flows into it, its update is exactly 0 (its bytes stay identical) and a
parameter frozen in every layer holds no optimizer state. Adam's step does not depend on the gradient's scale, so a
multiplier m gives exactly AdamW at m × the learning rate (weight decay included)."""
from __future__ import annotations

import re

import jax
import numpy as np

from qwen2vl_jax.layers import STACKS

GROUPS = ("vision", "merger", "llm")
# The paper's three stages, as the parameter groups each one trains (the rest stays bit-identical):
# 1 the ViT (+ merger) on image-text pairs with the LLM frozen, 2 everything, 3 the LLM + merger with the ViT frozen.
STAGES = {"vision": ("vision", "merger"), "all": GROUPS, "llm": ("llm", "merger")}


def group_of(path: tuple) -> str:
    """A parameter's group from its tree path: visual/merger → "merger", the rest of visual → "vision", else
    "llm"."""
    names = [getattr(k, "key", str(k)) for k in path]
    if names[0] == "visual":
        return "merger" if "merger" in names else "vision"
    return "llm"


def _is_stacked(path: tuple) -> bool:
    return len(path) > 1 and tuple(str(getattr(k, "key", k)) for k in path[:2]) in STACKS


def layer_names(path: tuple, leaf) -> list[str]:
    """The unrolled name(s) of a parameter: one, or one per layer of a stacked (scanned) leaf."""
    names = [str(getattr(k, "key", k)) for k in path]
    if _is_stacked(path):
        rest = "/".join(names[2:])
        return [f"{names[0]}/{names[1]}_{i}/{rest}" for i in range(leaf.shape[0])]
    return ["/".join(names)]


def parse_multipliers(text: str) -> list[tuple[re.Pattern, float]]:
    """"PATTERN=M;PATTERN=M" → [(compiled pattern, M)], in order; ValueError naming a malformed item."""
    out = []
    for item in filter(None, (part.strip() for part in (text or "").split(";"))):
        pattern, sep, value = item.rpartition("=")
        try:
            multiplier = float(value)
            if not sep or not pattern or multiplier < 0:
                raise ValueError
            out.append((re.compile(pattern), multiplier))
        except (ValueError, re.error):
            raise ValueError(f"optim.lr_multipliers item {item!r}: write PATTERN=MULTIPLIER (a regex over parameter "
                             "paths and a number >= 0), items separated by ';', e.g. "
                             "'visual/blocks=0.1;visual/merger=1'") from None
    return out


def update_scales(params, stage: str = "all", freeze: str = "", lr_multipliers: str = ""):
    """The params tree (arrays or ShapeDtypeStructs) → per leaf float32[] or float32[layers]: 0 where the parameter
    (layer) is frozen — outside `stage`'s groups or matched by `freeze` — else the first matching multiplier (1 when
    none matches). ValueError when nothing would train, or a pattern matches no parameter."""
    if stage not in STAGES:
        raise ValueError(f"unknown training stage {stage!r}; choose one of {', '.join(STAGES)}")
    try:
        frozen = re.compile(freeze) if freeze else None
    except re.error as e:
        raise ValueError(f"optim.freeze {freeze!r} is not a regex: {e}") from None
    multipliers = parse_multipliers(lr_multipliers)
    used = set()

    def scale(path, leaf):
        trains = group_of(path) in STAGES[stage]
        values = []
        for name in layer_names(path, leaf):
            value = 0.0
            if trains and frozen is not None and frozen.search(name):
                used.add("freeze")
            elif trains:
                match = next((k for k, (pattern, _) in enumerate(multipliers) if pattern.search(name)), None)
                if match is not None:
                    used.add(match)
                value = 1.0 if match is None else multipliers[match][1]
            values.append(value)
        return np.asarray(values if _is_stacked(path) else values[0], np.float32)

    scales = jax.tree_util.tree_map_with_path(scale, params)
    if frozen is not None and "freeze" not in used:
        raise ValueError(f"optim.freeze {freeze!r} matches no trained parameter path (e.g. "
                         f"{layer_names(*jax.tree_util.tree_flatten_with_path(params)[0][0])[0]!r})")
    for k, (pattern, _) in enumerate(multipliers):
        if k not in used:
            raise ValueError(f"optim.lr_multipliers pattern {pattern.pattern!r} matches no trained parameter path")
    if not any(np.any(s > 0) for s in jax.tree.leaves(scales)):
        raise ValueError(f"stage {stage!r} with optim.freeze {freeze!r} leaves nothing to train")
    return scales


def trains(scales):
    """Per leaf: True when any of its layers trains (a leaf frozen everywhere gets no optimizer state)."""
    return jax.tree.map(lambda s: bool(np.any(s > 0)), scales)


def is_uniform(scales) -> bool:
    """Whether every leaf is wholly frozen or wholly at multiplier 1 (nothing for the optimizer to scale)."""
    return all(np.all(s == 0) or np.all(s == 1) for s in jax.tree.leaves(scales))


def adapters_only(scales, train_also: str = ""):
    """`scales` with every leaf but the LoRA adapters (qwen2vl_jax.lora) at 0: a LoRA run trains its adapters
    only, the stage and patterns choosing among them — and, in full, the parameters (layers) whose path
    `train_also` (a regex, e.g. "language_model/embed_tokens") searches, as PEFT's modules_to_save. ValueError when
    no adapter trains or `train_also` matches no parameter the stage trains."""
    from qwen2vl_jax.lora import is_adapter

    try:
        also = re.compile(train_also) if train_also else None
    except re.error as e:
        raise ValueError(f"lora.train_also {train_also!r} is not a regex: {e}") from None
    used = []

    def keep(path, s):
        if is_adapter(path):
            return s
        if also is None:
            return np.zeros_like(s)
        hit = np.asarray([bool(also.search(name)) for name in layer_names(path, s)])
        kept = np.where(hit.reshape(np.shape(s)) if np.ndim(s) else hit[0], s, 0).astype(np.float32)
        used.append(bool(np.any(kept > 0)))
        return kept

    kept = jax.tree_util.tree_map_with_path(keep, scales)
    if also is not None and not any(used):
        raise ValueError(f"lora.train_also {train_also!r} matches no parameter path the stage trains (e.g. "
                         "'language_model/embed_tokens/embedding')")
    if not any(np.any(s > 0) for path, s in jax.tree_util.tree_leaves_with_path(kept) if is_adapter(path)):
        raise ValueError("LoRA trains no adapter: lora.targets matches no linear layer the stage trains (the stage "
                         "'vision' trains the ViT and merger, 'llm' the decoder and merger, 'all' every group)")
    return kept
