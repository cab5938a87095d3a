"""LoRA adapters as a Hugging Face PEFT folder (`adapter_model.safetensors` + `adapter_config.json`), both ways.

PEFT names a LoRA tensor after the transformers module it adapts (the in-memory name, transformers 5.x):

    base_model.model.model.language_model.layers.{i}.self_attn.q_proj.lora_A.weight   [r, in_features]
    base_model.model.model.language_model.layers.{i}.self_attn.q_proj.lora_B.weight   [out_features, r]
    base_model.model.model.visual.blocks.{i}.attn.qkv.lora_A.weight, base_model.model.model.visual.merger.mlp.0.…,
    base_model.model.lm_head.lora_A.weight

and computes W·x + (lora_alpha / r) · B·A·x. Ours: `lora_a` [*in, r], `lora_b` [r, *out] beside a kernel [*in, *out]
(qwen2vl_jax/lora.py); the module names come from checkpoint/mapping.py's rules, and the layout follows its kernel
rule (in dims flatten row-major to in_features, out dims to out_features): lora_A = a.reshape(-1, r).T,
lora_B = b.reshape(r, -1).T. Reading also takes transformers 4.x names (`base_model.model.model.layers.…`,
`base_model.model.visual.…`). The library writes the JSON itself; peft and torch are not imported."""
from __future__ import annotations

import json
import math
import re

import jax
import numpy as np
from etils import epath
from safetensors import numpy as safetensors_numpy

from qwen2vl_jax.checkpoint import mapping
from qwen2vl_jax.config import Qwen2VLConfig
from qwen2vl_jax.layers import STACKS

ADAPTER_DIR = "adapter"  # beside params/ in an export with LoRA (training/export.py)
ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
PREFIX = "base_model.model."
_KEY = re.compile(r"(.+)\.lora_([AB])\.weight")


def _modules(adapters: dict) -> dict[tuple[str, ...], dict[str, np.ndarray]]:
    """An adapter tree (scanned or unrolled; params with adapters are fine) → {unrolled module path: {"lora_a":
    [*in, r], "lora_b": [r, *out]}} as numpy arrays (global jax arrays must be fully addressable here)."""
    out: dict = {}
    for key, leaf in jax.tree_util.tree_leaves_with_path(adapters):
        names = tuple(str(getattr(k, "key", k)) for k in key)
        if names[-1] not in ("lora_a", "lora_b"):
            continue
        leaf = np.asarray(leaf)
        if names[:2] in STACKS:  # scanned: one leading layer axis
            for i, layer in enumerate(leaf):
                out.setdefault((names[0], f"{names[1]}_{i}", *names[2:-1]), {})[names[-1]] = layer
        else:
            out.setdefault(names[:-1], {})[names[-1]] = leaf
    return out


def _module_name(path: tuple[str, ...], config: Qwen2VLConfig) -> str:
    """Unrolled module path → transformers 5.x in-memory module name ("model.language_model.layers.0.mlp.up_proj")."""
    if path == ("visual", "patch_embed"):
        raise ValueError("visual/patch_embed is a Conv3d in transformers, where PEFT stores adapters as convolutions; "
                         "leave it out of lora.targets to export a PEFT adapter")
    name = mapping.torch_name(path + ("kernel",), config)
    return mapping.in_memory_name(name.removesuffix(".weight"))


def write_peft_adapter(folder, config: Qwen2VLConfig, adapters, base_model_name_or_path: str = "") -> str:
    """Writes `adapters` (`lora.split(params)[1]` or params holding them; scanned or unrolled; numpy or fully
    addressable jax arrays) for `config.lora` into `folder` (local or gs://) as ADAPTER_FILE (float32 lora_A
    [r, in_features] / lora_B [out_features, r] per adapted module) + CONFIG_FILE that peft 0.22
    (`PeftModel.from_pretrained(Qwen2VLForConditionalGeneration…, folder)`) and vLLM load. → folder."""
    lora = config.lora
    if lora is None:
        raise ValueError("config.lora is None: there is no adapter to write (give the LoRA config the adapters "
                         "were trained with)")
    modules = _modules(adapters)
    if not modules:
        raise ValueError(f"no lora_a/lora_b leaves in the tree given for {folder}; pass lora.split(params)[1]")
    tensors, targets = {}, []
    for path, pair in sorted(modules.items()):
        name = _module_name(path, config)
        a, b = pair["lora_a"], pair["lora_b"]
        tensors[f"{PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, lora.rank).T, np.float32)
        tensors[f"{PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b.reshape(lora.rank, -1).T, np.float32)
        targets.append(name)
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path or None,
        "revision": None, "inference_mode": True, "r": lora.rank, "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout, "target_modules": targets, "exclude_modules": None, "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "lora_bias": False,
        "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {},
    }
    out = epath.Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    (out / ADAPTER_FILE).write_bytes(safetensors_numpy.save(tensors, metadata={"format": "pt"}))
    (out / CONFIG_FILE).write_text(json.dumps(peft_config, indent=2))
    return str(out)


def _unsupported(peft_config: dict, where: str) -> None:
    checks = [(peft_config.get("peft_type", "LORA") == "LORA", "peft_type is not LORA"),
              (not peft_config.get("use_dora"), "use_dora (DoRA)"),
              (peft_config.get("bias", "none") == "none", f"bias={peft_config.get('bias')!r}"),
              (not peft_config.get("lora_bias"), "lora_bias"),
              (not peft_config.get("fan_in_fan_out"), "fan_in_fan_out"),
              (not peft_config.get("modules_to_save"), f"modules_to_save={peft_config.get('modules_to_save')}"),
              (not peft_config.get("rank_pattern"), "rank_pattern (per-module ranks)"),
              (not peft_config.get("alpha_pattern"), "alpha_pattern (per-module alphas)")]
    bad = [what for ok, what in checks if not ok]
    if bad:
        raise ValueError(f"{where} uses {', '.join(bad)}, which qwen2vl_jax LoRA does not have (one rank and alpha "
                         f"for plain Linear adapters); merge it into the base with peft's merge_and_unload instead")


def _targets_regex(paths: set[tuple[str, ...]], config: Qwen2VLConfig, where: str) -> str:
    """Adapted unrolled module paths → a LoraConfig.targets regex over our module paths that matches exactly them in
    either layout when whole stacks are adapted (`language_model/layers(_\\d+)?/…`), unrolled only otherwise."""
    counts = {("language_model", "layers"): config.text.num_hidden_layers, ("visual", "blocks"): config.vision.depth}
    by_stack: dict[tuple[str, ...], set[int]] = {}
    single = []
    for path in paths:
        match = re.fullmatch(r"(layers|blocks)_(\d+)", path[1]) if len(path) > 1 else None
        if match and (path[0], match.group(1)) in STACKS:
            by_stack.setdefault((path[0], match.group(1)) + path[2:], set()).add(int(match.group(2)))
        else:
            single.append("/".join(path))
    for generic, layers in sorted(by_stack.items()):
        if layers == set(range(counts[generic[:2]])):
            single.append("/".join((generic[0], generic[1] + r"(_\d+)?") + generic[2:]))
        elif config.scan_layers:
            raise ValueError(f"{where} adapts {'/'.join(generic)} in layers {sorted(layers)} only; a scanned model has "
                             f"one adapter for all layers: load it with scan_layers=False")
        else:
            single += ["/".join((generic[0], f"{generic[1]}_{i}") + generic[2:]) for i in sorted(layers)]
    return "^(" + "|".join(sorted(single)) + ")$"


def read_peft_adapter(folder, config: Qwen2VLConfig, base_dtype: str = "bfloat16"):
    """A PEFT LoRA folder (ours or trained elsewhere on Qwen2-VL / Qwen2.5-VL) → (adapters, lora.LoraConfig): the
    adapter-only tree (`lora.split`'s second half) in `config`'s layout (stacked when config.scan_layers), float32
    lora_a [layers?, *in, r] / lora_b [layers?, r, *out]; `config.replace(lora=lora_config)` is the model to put
    them on (use_rslora becomes alpha·sqrt(r), the same scaling)."""
    from qwen2vl_jax.lora import LoraConfig

    folder = epath.Path(folder)
    where = str(folder / CONFIG_FILE)
    if not (folder / CONFIG_FILE).exists() or not (folder / ADAPTER_FILE).exists():
        raise FileNotFoundError(f"{folder} is not a PEFT adapter folder: it needs {CONFIG_FILE} and {ADAPTER_FILE}")
    peft_config = json.loads((folder / CONFIG_FILE).read_text())
    _unsupported(peft_config, where)
    tensors = safetensors_numpy.load((folder / ADAPTER_FILE).read_bytes())
    rank = int(peft_config["r"])
    pairs: dict[tuple[str, ...], dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        match = _KEY.fullmatch(key.removeprefix(PREFIX))
        try:
            if not (key.startswith(PREFIX) and match):
                raise mapping.UnknownTensor(key)
            path = mapping.param_path(match.group(1) + ".weight", config)[:-1]
        except mapping.UnknownTensor:
            raise ValueError(f"{folder / ADAPTER_FILE}: tensor {key} is not a LoRA weight of a Qwen2-VL Linear "
                             f"(expected {PREFIX}<module>.lora_A.weight / .lora_B.weight)") from None
        pairs.setdefault(path, {})[match.group(2)] = value
    half = [("/".join(p), sorted(ab)) for p, ab in pairs.items() if len(ab) != 2]
    if half:
        raise ValueError(f"{folder / ADAPTER_FILE}: modules without both lora_A and lora_B: {half[:4]}")
    alpha = float(peft_config["lora_alpha"]) * (math.sqrt(rank) if peft_config.get("use_rslora") else 1.0)
    lora_config = LoraConfig(rank=rank, alpha=alpha, dropout=float(peft_config.get("lora_dropout") or 0.0),
                             targets=_targets_regex(set(pairs), config, where), base_dtype=base_dtype)
    shapes = {}
    for key, leaf in jax.tree_util.tree_leaves_with_path(mapping.param_shapes(config.replace(lora=lora_config))):
        names = tuple(str(getattr(k, "key", k)) for k in key)
        if names[-1] in ("lora_a", "lora_b"):
            shapes.setdefault(names[:-1], {})[names[-1]] = leaf.shape
    assert set(shapes) == set(pairs), (sorted(shapes), sorted(pairs))  # the regex picks exactly the file's modules
    adapters: dict = {}
    for path, ab in pairs.items():
        want_a, want_b = shapes[path]["lora_a"], shapes[path]["lora_b"]
        if ab["A"].shape != (rank, math.prod(want_a[:-1])) or ab["B"].shape != (math.prod(want_b[1:]), rank):
            raise ValueError(f"{folder / ADAPTER_FILE}: {_module_name(path, config)} has lora_A {ab['A'].shape}, "
                             f"lora_B {ab['B'].shape}; this config (r={rank}) needs "
                             f"{(rank, math.prod(want_a[:-1]))} and {(math.prod(want_b[1:]), rank)} — is it the "
                             f"adapter of this base model?")
        node = adapters
        for name in path:
            node = node.setdefault(name, {})
        node["lora_a"] = ab["A"].astype(np.float32).T.reshape(want_a)
        node["lora_b"] = ab["B"].astype(np.float32).T.reshape(want_b)
    if config.scan_layers:
        adapters = _stack(adapters)
    return adapters, lora_config


def _stack(tree: dict) -> dict:
    """Unrolled `layers_N` / `blocks_N` adapter subtrees → one stacked subtree (all layers are present)."""
    out = {top: dict(sub) for top, sub in tree.items()}
    for top, prefix in STACKS:
        if top not in out:
            continue
        layers = sorted((k for k in out[top] if re.fullmatch(rf"{prefix}_\d+", k)), key=lambda k: int(k.split("_")[-1]))
        if layers:
            out[top][prefix] = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *[out[top].pop(k) for k in layers])
    return out
