"""Qwen2-VL configuration: frozen, hashable dataclasses with presets and a Hugging Face reader."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping


MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The ViT; `embed_dim` is its width and `hidden_size` the merger's output (= text hidden).

    model_type "qwen2_vl": LayerNorm, quick-GELU MLP of `mlp_ratio` · embed_dim, every block attends within a
    frame-pair. "qwen2_5_vl": RMSNorm, SwiGLU MLP of `intermediate_size` (with biases), blocks attend within
    `window_size`-pixel windows except `fullatt_block_indexes`, and a video's time positions advance
    `tokens_per_second` · second_per_grid_ts per frame-pair; those four fields are unused by qwen2_vl."""
    depth: int = 32
    embed_dim: int = 1280
    num_heads: int = 16
    mlp_ratio: float = 4.0
    hidden_size: int = 1536
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    layer_norm_eps: float = 1e-6
    model_type: str = "qwen2_vl"
    intermediate_size: int = 3420
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    tokens_per_second: float = 2.0

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not supported; choose one of {MODEL_TYPES}")
        object.__setattr__(self, "fullatt_block_indexes", tuple(int(i) for i in self.fullatt_block_indexes))
        if self.windowed and self.window_size % (self.patch_size * self.spatial_merge_size):
            raise ValueError(f"window_size {self.window_size} must be a multiple of patch_size · spatial_merge_size "
                             f"({self.patch_size * self.spatial_merge_size})")

    @property
    def windowed(self) -> bool:
        """Qwen2.5-VL: window attention, RMSNorm, SwiGLU and absolute-time video positions."""
        return self.model_type == "qwen2_5_vl"

    @property
    def window_units(self) -> int:
        """Merged units per window side (112 px → 4); 0 without windows."""
        return self.window_size // self.patch_size // self.spatial_merge_size if self.windowed else 0

    @property
    def full_attention_blocks(self) -> tuple[bool, ...]:
        """Per block: attends within its frame-pair (True) or within its window (False)."""
        return tuple(not self.windowed or i in self.fullatt_block_indexes for i in range(self.depth))

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return self.intermediate_size if self.windowed else int(self.embed_dim * self.mlp_ratio)

    @property
    def patch_dim(self) -> int:
        """Features per patch row: C · T · P · P (1176 for the released models)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The Qwen2 decoder."""
    vocab_size: int = 151936
    hidden_size: int = 1536
    intermediate_size: int = 8960
    num_hidden_layers: int = 28
    num_attention_heads: int = 12
    num_key_value_heads: int = 2
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class GenerationDefaults:
    """A checkpoint's generation_config.json: what `model.generate` does in transformers when the caller says nothing.

    Only what differs from the model config is kept, so a generation_config.json that repeats config.json's ids (as
    transformers' save_pretrained writes it) reads as `GenerationDefaults()`:
    eos_token_ids: every id that ends a row; () = the config's eos_token_id alone.
    pad_token_id: the id after a row ends; None = the config's pad_token_id.
    temperature, top_k, top_p, do_sample, repetition_penalty: None = not given (see `sampling`)."""
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    do_sample: bool | None = None
    repetition_penalty: float | None = None

    def sampling(self) -> tuple[float, int | None, float | None]:
        """(temperature, top_k, top_p) as transformers 5 samples by default: greedy (0.0, None, None) unless
        do_sample is true; then temperature (1.0 when not given), top_k (50 when not given, transformers' global
        default) and top_p (None: the whole distribution). repetition_penalty is not part of it."""
        if not self.do_sample:
            return 0.0, None, None
        return (1.0 if self.temperature is None else float(self.temperature),
                50 if self.top_k is None else int(self.top_k), self.top_p)


# none: keep every activation; full: keep only each layer's input and recompute the rest; dots: keep matmul
# outputs; dots_no_batch: keep matmul outputs without batch dims (weights-stationary products).
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")


@dataclasses.dataclass(frozen=True)
class Qwen2VLConfig:
    """Everything the network needs. `dtype` is the compute/param dtype of matmuls ("float32" or
    "bfloat16"); norms, softmax and RoPE angles always run in float32."""
    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    bos_token_id: int = 151643
    eos_token_id: int = 151645
    pad_token_id: int = 151643
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = False
    attention: str = "auto"  # qwen2vl_jax.attention.IMPLEMENTATIONS; auto: splash on TPU, cuDNN on GPU (bf16), XLA
    remat: str = "none"  # rematerialization of each layer's activations in the backward pass: see REMAT_POLICIES
    generation: GenerationDefaults = GenerationDefaults()  # generation_config.json; not written by to_hf_dict
    lora: Any = None  # qwen2vl_jax.lora.LoraConfig: adapters beside the matched linear layers; not in to_hf_dict

    def __post_init__(self):
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}: choose one of {REMAT_POLICIES}")
        from qwen2vl_jax.attention import IMPLEMENTATIONS

        if self.attention not in IMPLEMENTATIONS:
            raise ValueError(f"attention={self.attention!r}: choose one of {IMPLEMENTATIONS}")

    def replace(self, **changes: Any) -> "Qwen2VLConfig":
        return dataclasses.replace(self, **changes)

    @property
    def model_type(self) -> str:
        """The checkpoint family, "qwen2_vl" | "qwen2_5_vl" (config.json's model_type; held by `vision`)."""
        return self.vision.model_type

    @staticmethod
    def preset(name: str) -> "Qwen2VLConfig":
        try:
            return PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None

    @staticmethod
    def from_hf(path_or_dict: str | os.PathLike | Mapping[str, Any]) -> "Qwen2VLConfig":
        """Reads a Hugging Face config.json (a folder, the file, or its dict), in the released flat layout
        (text fields at top level, `vision_config`, `rope_scaling`) or the nested `text_config` layout.

        Token ids come from `text_config` or the top level; where both hold one, `text_config` wins (transformers
        5 writes bos/eos/pad there). An eos list gives its first id as `eos_token_id` and the whole list as
        `generation.eos_token_ids`. Given a path (local or gs://), the generation_config.json beside config.json,
        when present, fills `generation`; a dict has none to read."""
        if isinstance(path_or_dict, Mapping):
            return _from_hf_dict(dict(path_or_dict))
        path = _config_path(path_or_dict)
        generation_path = path.parent / "generation_config.json"
        generation = _read_json(generation_path) if generation_path.exists() else None
        return _from_hf_dict(_read_json(path), generation, os.fspath(path), os.fspath(generation_path))

    def to_hf_dict(self) -> dict[str, Any]:
        """The nested transformers 5.x config dict for this configuration."""
        v, t = self.vision, self.text
        text = dict(
            vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
            num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
            num_key_value_heads=t.num_key_value_heads, rms_norm_eps=t.rms_norm_eps,
            max_position_embeddings=t.max_position_embeddings, hidden_act="silu", use_sliding_window=False,
            rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta, "mrope_section": list(t.mrope_section)},
            tie_word_embeddings=t.tie_word_embeddings, bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
        )
        shared = dict(depth=v.depth, num_heads=v.num_heads, patch_size=v.patch_size,
                      temporal_patch_size=v.temporal_patch_size, spatial_merge_size=v.spatial_merge_size,
                      in_channels=v.in_channels)
        if v.windowed:
            vision = dict(shared, hidden_size=v.embed_dim, out_hidden_size=v.hidden_size,
                          intermediate_size=v.intermediate_size, window_size=v.window_size,
                          fullatt_block_indexes=list(v.fullatt_block_indexes), hidden_act="silu",
                          tokens_per_second=int(v.tokens_per_second) if float(v.tokens_per_second).is_integer()
                          else v.tokens_per_second)
        else:
            vision = dict(shared, embed_dim=v.embed_dim, hidden_size=v.hidden_size, hidden_act="quick_gelu",
                          mlp_ratio=int(v.mlp_ratio) if float(v.mlp_ratio).is_integer() else v.mlp_ratio)
        architecture = "Qwen2_5_VLForConditionalGeneration" if v.windowed else "Qwen2VLForConditionalGeneration"
        return dict(
            model_type=v.model_type, architectures=[architecture],
            text_config=text, vision_config=vision, tie_word_embeddings=t.tie_word_embeddings,
            image_token_id=self.image_token_id, video_token_id=self.video_token_id,
            vision_start_token_id=self.vision_start_token_id, vision_end_token_id=self.vision_end_token_id,
            bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
        )


def _config_path(src: str | os.PathLike):
    """A folder or its config.json (local or gs://) → the epath.Path of config.json."""
    from etils import epath  # local or gs://

    path = epath.Path(src)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise ValueError(f"no config.json at {os.fspath(path)!r}: pass a Hugging Face model folder or its config.json")
    return path


def _read_json(path) -> dict[str, Any]:
    """A JSON object from an epath.Path; ValueError naming the file when it is not one."""
    try:
        out = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{os.fspath(path)} is not valid JSON ({e}); fix or delete it") from None
    if not isinstance(out, dict):
        raise ValueError(f"{os.fspath(path)} holds a {type(out).__name__}, not a JSON object; fix or delete it")
    return out


def _pick(d: Mapping[str, Any], cls, renames: Mapping[str, str] = {}) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for key, value in d.items():
        key = renames.get(key, key)
        if key in names and value is not None:
            out[key] = value
    return out


def _from_hf_dict(d: dict[str, Any], generation: Mapping[str, Any] | None = None, config_file: str = "config.json",
                  generation_file: str = "generation_config.json") -> Qwen2VLConfig:
    """config.json's dict (and generation_config.json's, when there is one) → Qwen2VLConfig."""
    text_src = dict(d.get("text_config") or {})
    for key, value in d.items():  # the released flat layout keeps text fields at top level
        if key not in ("text_config", "vision_config"):
            text_src.setdefault(key, value)
    rope = text_src.get("rope_parameters") or text_src.get("rope_scaling") or {}
    if "rope_theta" in rope:
        text_src["rope_theta"] = rope["rope_theta"]
    if "mrope_section" in rope:
        text_src["mrope_section"] = tuple(rope["mrope_section"])
    text = _pick(text_src, TextConfig)
    if "tie_word_embeddings" in d:  # the top-level flag is what transformers ties by
        text["tie_word_embeddings"] = bool(d["tie_word_embeddings"])
    text.setdefault("num_key_value_heads", text.get("num_attention_heads", TextConfig.num_attention_heads))
    if "head_dim" in text_src and text_src["head_dim"] is not None:
        hidden, heads = text.get("hidden_size", 0), text.get("num_attention_heads", 1)
        if text_src["head_dim"] != hidden // heads:
            raise ValueError(f"config.json: head_dim {text_src['head_dim']} != hidden_size/num_attention_heads; "
                             "Qwen2 derives head_dim, so this checkpoint is not a Qwen2-VL one")
    model_type = d.get("model_type") or "qwen2_vl"
    if model_type not in MODEL_TYPES:
        raise ValueError(f"{config_file}: model_type {model_type!r} is not a Qwen2-VL family model; this project "
                         f"reads {MODEL_TYPES}")
    renames = {"in_chans": "in_channels", "spatial_patch_size": "patch_size", "model_type": ""}
    if model_type == "qwen2_5_vl":  # vision hidden_size is the ViT width there; the merger's is out_hidden_size
        renames |= {"hidden_size": "embed_dim", "out_hidden_size": "hidden_size"}
    vision = _pick(d.get("vision_config") or {}, VisionConfig, renames)
    vision["model_type"] = model_type
    nested = d.get("text_config") or {}
    ids, eos_list = {}, ()
    for key in _TOKEN_KEYS:
        value = nested.get(key) if nested.get(key) is not None else d.get(key)
        if value is None:
            continue
        ids_given = _token_ids(value, key, config_file)
        ids[key] = ids_given[0]
        if key == "eos_token_id":
            eos_list = ids_given
    vision.setdefault("hidden_size", text.get("hidden_size", TextConfig.hidden_size))
    config = Qwen2VLConfig(vision=VisionConfig(**vision), text=TextConfig(**text), **ids)
    return config.replace(generation=_generation(config, eos_list, generation, generation_file))


_TOKEN_KEYS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
               "bos_token_id", "eos_token_id", "pad_token_id")


def _token_ids(value: Any, key: str, where: str) -> tuple[int, ...]:
    """An id or a non-empty list of ids → a tuple of ints; ValueError naming `where` and `key` otherwise."""
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ValueError(f"{where}: {key} must be a token id or a non-empty list of them, got {value!r}; "
                         "fix the file")
    return tuple(values)


def _generation(config: Qwen2VLConfig, eos_list: tuple[int, ...], src: Mapping[str, Any] | None,
                where: str) -> GenerationDefaults:
    """generation_config.json's dict (None: absent, then config.json's eos list alone) → GenerationDefaults, with
    ids that repeat the config's own dropped (see GenerationDefaults)."""
    src = dict(src or {})
    kinds = {"temperature": (int, float), "top_p": (int, float), "repetition_penalty": (int, float),
             "top_k": (int,), "do_sample": (bool,)}
    out = {}
    for key, types in kinds.items():
        value = src.get(key)
        if value is None:
            continue
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ValueError(f"{where}: {key} must be {' or '.join(t.__name__ for t in types)}, got {value!r}; "
                             "fix the file")
        out[key] = float(value) if float in types else value
    if src.get("eos_token_id") is not None:
        eos_list = _token_ids(src["eos_token_id"], "eos_token_id", where)
    if eos_list and eos_list != (config.eos_token_id,):
        out["eos_token_ids"] = eos_list
    if src.get("pad_token_id") is not None:
        pad = _token_ids(src["pad_token_id"], "pad_token_id", where)
        if len(pad) != 1:
            raise ValueError(f"{where}: pad_token_id must be one token id, got {src['pad_token_id']!r}; fix the file")
        if pad[0] != config.pad_token_id:
            out["pad_token_id"] = pad[0]
    return GenerationDefaults(**out)


_VISION = VisionConfig()
PRESETS: dict[str, Qwen2VLConfig] = {
    "2b": Qwen2VLConfig(vision=dataclasses.replace(_VISION, hidden_size=1536), text=TextConfig()),
    "7b": Qwen2VLConfig(
        vision=dataclasses.replace(_VISION, hidden_size=3584),
        text=TextConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                        num_key_value_heads=4, tie_word_embeddings=False)),
    "72b": Qwen2VLConfig(
        vision=dataclasses.replace(_VISION, hidden_size=8192),
        text=TextConfig(vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False)),
    # Qwen2.5-VL: one ViT (window attention, SwiGLU 3420) whose merger outputs the text width; sizes from the
    # released config.json files.
    **{f"2.5-{name}": Qwen2VLConfig(
        vision=VisionConfig(model_type="qwen2_5_vl", hidden_size=hidden),
        text=TextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=128000,
                        tie_word_embeddings=tied))
       for name, vocab, hidden, mlp, layers, heads, kv, tied in (
           ("3b", 151936, 2048, 11008, 36, 16, 2, True), ("7b", 152064, 3584, 18944, 28, 28, 4, False),
           ("32b", 152064, 5120, 27648, 64, 40, 8, False), ("72b", 152064, 8192, 29568, 80, 64, 8, False))},
    # A few MB: real token ids and vocabulary, so the released tokenizer works with it.
    "tiny": Qwen2VLConfig(
        vision=VisionConfig(depth=2, embed_dim=64, num_heads=4, mlp_ratio=2.0, hidden_size=64),
        text=TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, mrope_section=(2, 3, 3))),
}
