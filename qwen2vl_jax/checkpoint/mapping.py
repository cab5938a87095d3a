"""PyTorch / Hugging Face state-dict names and layouts ↔ this project's params, one tensor at a time.

Each rule maps a torch name (as written in the safetensors files: `model.layers.N.…`, `visual.…`, `lm_head.…`;
the in-memory transformers 5.x names `model.language_model.…` / `model.visual.…` are accepted too) to a param path
and a layout change. Per-tensor functions let the converter stream; `params_from_torch` assembles a whole tree."""
from __future__ import annotations

import re
from typing import Callable, Iterable, Mapping

import numpy as np

from qwen2vl_jax.config import Qwen2VLConfig

Path = tuple[str, ...]
FLOAT_DTYPES = ("float32", "bfloat16", "float16")

_ALIASES = (("model.language_model.", "model."), ("model.visual.", "visual."))


def canonical_name(name: str) -> str:
    """The on-disk name for a transformers in-memory name."""
    for old, new in _ALIASES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def in_memory_name(name: str) -> str:
    """The transformers 5.x in-memory name (`model.language_model.…`, `model.visual.…`) for an on-disk name; the
    inverse of `canonical_name`."""
    for memory, disk in _ALIASES:
        if name.startswith(disk) and not name.startswith(memory):
            return memory + name[len(disk):]
    return name


def _rules(cfg: Qwen2VLConfig) -> list[tuple[str, Path, Callable[[np.ndarray], np.ndarray], Callable]]:
    """(regex, path template with {i}, torch→ours, ours→torch). Linear weights are [out, in] in torch."""
    t, v = cfg.text, cfg.vision
    heads = lambda n, hd: (lambda w: w.T.reshape(w.shape[1], n, hd), lambda k: k.reshape(k.shape[0], -1).T)
    heads_bias = lambda n, hd: (lambda b: b.reshape(n, hd), lambda b: b.reshape(-1))
    heads_out = lambda n, hd: (lambda w: w.T.reshape(n, hd, w.shape[0]), lambda k: k.reshape(-1, k.shape[-1]).T)
    linear = (lambda w: w.T, lambda k: k.T)
    same = (lambda x: x, lambda x: x)
    patch = (lambda w: w.reshape(w.shape[0], -1).T,
             lambda k: k.T.reshape(k.shape[1], v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size))
    L, B = r"model\.layers\.(\d+)\.", r"visual\.blocks\.(\d+)\."
    lm, vis = ("language_model",), ("visual",)
    table = [
        (r"model\.embed_tokens\.weight", lm + ("embed_tokens",), same),
        (r"model\.norm\.weight", lm + ("norm", "scale"), same),
        (r"lm_head\.weight", lm + ("lm_head", "kernel"), linear),
        (L + r"input_layernorm\.weight", lm + ("layers_{i}", "input_layernorm", "scale"), same),
        (L + r"post_attention_layernorm\.weight", lm + ("layers_{i}", "post_attention_layernorm", "scale"), same),
        (L + r"self_attn\.q_proj\.weight", lm + ("layers_{i}", "self_attn", "q_proj", "kernel"),
         heads(t.num_attention_heads, t.head_dim)),
        (L + r"self_attn\.q_proj\.bias", lm + ("layers_{i}", "self_attn", "q_proj", "bias"),
         heads_bias(t.num_attention_heads, t.head_dim)),
        *[(L + rf"self_attn\.{p}_proj\.weight", lm + ("layers_{i}", "self_attn", f"{p}_proj", "kernel"),
           heads(t.num_key_value_heads, t.head_dim)) for p in "kv"],
        *[(L + rf"self_attn\.{p}_proj\.bias", lm + ("layers_{i}", "self_attn", f"{p}_proj", "bias"),
           heads_bias(t.num_key_value_heads, t.head_dim)) for p in "kv"],
        (L + r"self_attn\.o_proj\.weight", lm + ("layers_{i}", "self_attn", "o_proj", "kernel"),
         heads_out(t.num_attention_heads, t.head_dim)),
        *[(L + rf"mlp\.{p}\.weight", lm + ("layers_{i}", "mlp", p, "kernel"), linear)
          for p in ("gate_proj", "up_proj", "down_proj")],
        (r"visual\.patch_embed\.proj\.weight", vis + ("patch_embed", "kernel"), patch),
        *[(B + rf"{n}\.weight", vis + ("blocks_{i}", n, "scale"), same) for n in ("norm1", "norm2")],
        *[(B + rf"{n}\.bias", vis + ("blocks_{i}", n, "bias"), same) for n in ("norm1", "norm2")],
        (B + r"attn\.qkv\.weight", vis + ("blocks_{i}", "attn", "qkv", "kernel"),
         (lambda w: w.T.reshape(w.shape[1], 3, v.num_heads, v.head_dim), lambda k: k.reshape(k.shape[0], -1).T)),
        (B + r"attn\.qkv\.bias", vis + ("blocks_{i}", "attn", "qkv", "bias"),
         (lambda b: b.reshape(3, v.num_heads, v.head_dim), lambda b: b.reshape(-1))),
        (B + r"attn\.proj\.weight", vis + ("blocks_{i}", "attn", "proj", "kernel"),
         heads_out(v.num_heads, v.head_dim)),
        (B + r"attn\.proj\.bias", vis + ("blocks_{i}", "attn", "proj", "bias"), same),
        *[(B + rf"mlp\.{n}\.weight", vis + ("blocks_{i}", "mlp", n, "kernel"), linear) for n in _VISION_MLP],
        *[(B + rf"mlp\.{n}\.bias", vis + ("blocks_{i}", "mlp", n, "bias"), same) for n in _VISION_MLP],
        (r"visual\.merger\.ln_q\.weight", vis + ("merger", "ln_q", "scale"), same),
        (r"visual\.merger\.ln_q\.bias", vis + ("merger", "ln_q", "bias"), same),
        *[(rf"visual\.merger\.mlp\.{j}\.weight", vis + ("merger", f"mlp_{j}", "kernel"), linear) for j in (0, 2)],
        *[(rf"visual\.merger\.mlp\.{j}\.bias", vis + ("merger", f"mlp_{j}", "bias"), same) for j in (0, 2)],
    ]
    return [(pattern, path, fns[0], fns[1]) for pattern, path, fns in table]


_VISION_MLP = ("fc1", "fc2", "gate_proj", "up_proj", "down_proj")  # Qwen2-VL's two, Qwen2.5-VL's three


class UnknownTensor(KeyError):
    pass


def param_path(name: str, cfg: Qwen2VLConfig) -> Path:
    """A torch tensor name → its unrolled param path. Raises UnknownTensor for foreign names."""
    return _lookup(name, cfg)[0]


def torch_to_param(name: str, array: np.ndarray, cfg: Qwen2VLConfig) -> tuple[Path, np.ndarray]:
    """One torch tensor → (unrolled param path, array in our layout). Raises UnknownTensor for foreign names."""
    path, to_ours = _lookup(name, cfg)
    return path, to_ours(np.asarray(array))


def _lookup(name: str, cfg: Qwen2VLConfig) -> tuple[Path, Callable]:
    name = canonical_name(name)
    for pattern, path, to_ours, _ in _rules(cfg):
        match = re.fullmatch(pattern, name)
        if match:
            index = match.group(1) if match.groups() else None
            return tuple(p.format(i=index) for p in path), to_ours
    raise UnknownTensor(name)


def torch_name(path: Path, cfg: Qwen2VLConfig) -> str:
    """An unrolled param path → its torch tensor name (on disk). Raises UnknownTensor for foreign paths."""
    return _reverse(path, cfg)[0]


def param_to_torch(path: Path, array: np.ndarray, cfg: Qwen2VLConfig) -> tuple[str, np.ndarray]:
    """The inverse of `torch_to_param` for an unrolled path."""
    name, to_torch = _reverse(path, cfg)
    return name, to_torch(np.asarray(array))


def _reverse(path: Path, cfg: Qwen2VLConfig) -> tuple[str, Callable]:
    for pattern, template, _, to_torch in _rules(cfg):
        index = _match_path(template, path)
        if index is not False:
            return pattern.replace(r"(\d+)", "" if index is None else index).replace("\\", ""), to_torch
    raise UnknownTensor("/".join(path))


def _match_path(template: Path, path: Path):
    if len(template) != len(path):
        return False
    index = None
    for t, p in zip(template, path):
        if "{i}" in t:
            prefix = t.replace("{i}", "")
            if not (p.startswith(prefix) and p[len(prefix):].isdigit()):
                return False
            index = p[len(prefix):]
        elif t != p:
            return False
    return index


def expected_torch_names(cfg: Qwen2VLConfig) -> list[str]:
    """Every tensor name a checkpoint for `cfg` must hold (lm_head only when untied)."""
    names = ["model.embed_tokens.weight", "model.norm.weight", "visual.patch_embed.proj.weight"]
    if not cfg.text.tie_word_embeddings:
        names.append("lm_head.weight")
    for i in range(cfg.text.num_hidden_layers):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight", p + "self_attn.o_proj.weight"]
        names += [p + f"self_attn.{x}_proj.{w}" for x in "qkv" for w in ("weight", "bias")]
        names += [p + f"mlp.{x}.weight" for x in ("gate_proj", "up_proj", "down_proj")]
    windowed = cfg.vision.windowed  # Qwen2.5-VL: RMSNorms (no bias), SwiGLU
    mlp = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj") if windowed else ("mlp.fc1", "mlp.fc2")
    norm_parts = ("weight",) if windowed else ("weight", "bias")
    for i in range(cfg.vision.depth):
        p = f"visual.blocks.{i}."
        names += [p + f"{m}.{w}" for m in ("norm1", "norm2") for w in norm_parts]
        names += [p + f"{m}.{w}" for m in ("attn.qkv", "attn.proj") + mlp for w in ("weight", "bias")]
    names += [f"visual.merger.ln_q.{w}" for w in norm_parts]
    names += [f"visual.merger.{m}.{w}" for m in ("mlp.0", "mlp.2") for w in ("weight", "bias")]
    return names


def _set(tree: dict, path: Path, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def stack_layers(params: dict, cfg: Qwen2VLConfig) -> dict:
    """Unrolled `layers_N` / `blocks_N` subtrees → one `layers` / `blocks` subtree with a leading layer axis
    (the nn.scan layout)."""
    import jax

    out = {k: dict(v) for k, v in params.items()}
    for top, prefix, count in (("language_model", "layers", cfg.text.num_hidden_layers),
                               ("visual", "blocks", cfg.vision.depth)):
        layers = [out[top].pop(f"{prefix}_{i}") for i in range(count)]
        out[top][prefix] = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *layers)
    return out


def param_shapes(cfg: Qwen2VLConfig) -> dict:
    """The params tree of `cfg` as jax.ShapeDtypeStruct leaves (unrolled layers), computed without allocating."""
    import flax.linen as nn

    from qwen2vl_jax.model import abstract_params

    return nn.unbox(abstract_params(cfg.replace(scan_layers=False)))


def _check_shapes(params: dict, cfg: Qwen2VLConfig) -> None:
    import jax

    expected = dict(jax.tree_util.tree_flatten_with_path(param_shapes(cfg))[0])
    wrong = []
    for key, value in jax.tree_util.tree_flatten_with_path(params)[0]:
        want = expected[key].shape
        if value.shape != want:
            name, torch_layout = param_to_torch(tuple(k.key for k in key), np.zeros(want, np.float32), cfg)
            wrong.append(f"{name}: expected {tuple(torch_layout.shape)}")
    if wrong:
        raise ValueError(f"checkpoint tensors have the wrong shape for this config: {wrong[:8]}"
                         f"{' …' if len(wrong) > 8 else ''}; is config.json the one these weights were saved with?")


def params_from_torch(state_dict: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]],
                      cfg: Qwen2VLConfig, dtype=None) -> dict:
    """A whole state dict (name → array) → our params tree (stacked when cfg.scan_layers).

    Missing, unexpected or wrongly-shaped tensors raise ValueError naming them."""
    items = state_dict.items() if isinstance(state_dict, Mapping) else state_dict
    expected = set(expected_torch_names(cfg))
    params, seen, unexpected = {}, set(), []
    for name, array in items:
        canonical = canonical_name(name)
        if canonical not in expected:
            if not (canonical == "lm_head.weight" and cfg.text.tie_word_embeddings):  # tied copies are dropped
                unexpected.append(name)
            continue
        array = np.asarray(array)
        if array.dtype.name not in FLOAT_DTYPES:
            raise ValueError(f"checkpoint tensor {name} has dtype {array.dtype}; weights must be one of "
                             f"{FLOAT_DTYPES} — the file may be corrupt or not a Qwen2-VL checkpoint")
        try:
            path, value = torch_to_param(name, array, cfg)
        except ValueError as error:  # a reshape that cannot work: the tensor has the wrong size
            raise ValueError(f"checkpoint tensor {name} has shape {array.shape}, which does not fit this config "
                             f"({error}); is config.json the one these weights were saved with?") from None
        seen.add(canonical)
        _set(params, path, value if dtype is None else value.astype(dtype))
    missing = sorted(expected - seen)
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the config: missing {missing[:8]}"
                         f"{' …' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                         f"{' …' if len(unexpected) > 8 else ''}")
    _check_shapes(params, cfg)
    return stack_layers(params, cfg) if cfg.scan_layers else params
