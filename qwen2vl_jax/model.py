"""Qwen2-VL: packed ViT → merger → splice into the text embeddings → Qwen2 decoder with M-RoPE."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qwen2vl_jax.config import Qwen2VLConfig
from qwen2vl_jax.decoder import TextModel
from qwen2vl_jax.inputs import grid_array, prepare_inputs, vision_layout
from qwen2vl_jax.vision import VisionTransformer


class Qwen2VL(nn.Module):
    """`apply({"params": p}, input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos,
    video_grid_thw, second_per_grid_ts)` → logits float32[B, L, V], for arrays laid out as the Hugging Face processor
    lays them out (second_per_grid_ts: Qwen2.5-VL's seconds per video frame-pair; Qwen2-VL ignores it).

    That entry point prepares the data-dependent layout on the host, so its grids must be concrete. Under jit,
    call `qwen2vl_jax.prepare_inputs` outside and use the static-shape methods `encode_vision` and `decode`."""
    config: Qwen2VLConfig
    decoding: bool = False  # generation: the decoder keeps keys/values (`prefill`, `decode_step`)

    def setup(self):
        self.visual = VisionTransformer(self.config)
        self.language_model = TextModel(self.config, keep_kv=self.decoding)

    def __call__(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                 pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None):
        for name, value in (("input_ids", input_ids), ("attention_mask", attention_mask),
                            ("image_grid_thw", image_grid_thw), ("video_grid_thw", video_grid_thw)):
            if isinstance(value, jax.core.Tracer):
                raise ValueError(f"{name} is traced (under jit); Qwen2VL.__call__ lays out the inputs on the host. "
                                 "Call qwen2vl_jax.prepare_inputs outside jit, then apply method=Qwen2VL.forward")
        patch_dim, pixels = self.config.vision.patch_dim, []
        for p, name in ((pixel_values, "pixel_values"), (pixel_values_videos, "pixel_values_videos")):
            if p is None:
                continue
            p = p if isinstance(p, jax.Array) else np.asarray(p)
            if p.ndim != 2 or p.shape[1] != patch_dim:
                raise ValueError(f"{name} must be [patches, {patch_dim}] as the processor returns; got {p.shape}")
            pixels.append(p)
        prepared = prepare_inputs(
            self.config, input_ids, attention_mask, image_grid_thw, video_grid_thw,
            image_rows=None if pixel_values is None else pixel_values.shape[0],
            video_rows=None if pixel_values_videos is None else pixel_values_videos.shape[0],
            second_per_grid_ts=second_per_grid_ts)
        vision_pixels = _packed_pixels(self.config, pixels, prepared["vision_rows"]) if pixels else None
        return self.forward(jnp.asarray(input_ids), prepared, vision_pixels)

    def vision_features(self, pixel_values, grid_thw):
        """The merged features of some images or videos, as transformers' `visual(pixel_values, grid_thw)` gives them:
        pixel_values float[N, C·T·P·P], grid_thw int[n, 3] (concrete) → [N / merge², D] in processor order."""
        grids = grid_array(grid_thw, "grid_thw", self.config.vision.spatial_merge_size)
        layout = vision_layout(grids, self.config.vision.spatial_merge_size,
                               window_units=self.config.vision.window_units)
        pixels = _packed_pixels(self.config, [pixel_values], layout.rows)
        merged = self.encode_vision(pixels, jnp.asarray(layout.pos_hw), jnp.asarray(layout.segment_ids))
        return jnp.take(merged, jnp.asarray(layout.feature_slot), axis=0)

    def forward(self, input_ids, prepared, vision_pixels=None):
        """Static shapes only. input_ids: int[B, L]; prepared: the dict from `prepare_inputs`;
        vision_pixels: float[N, C·T·P·P] (images then videos, padded to N rows), or [S, N, C·T·P·P] per batch shard
        with prepared's vision arrays shaped alike (see `embed`), or None → logits float32[B, L, V]."""
        features = None
        if vision_pixels is not None:
            features = self.encode_vision(vision_pixels, prepared["vision_pos_hw"], prepared["vision_segment_ids"])
        return self.decode(input_ids, prepared["attention_mask"], prepared["position_ids"],
                           features, prepared["splice_index"])

    def hidden_states(self, input_ids, prepared, vision_pixels=None):
        """As `forward`, without the LM head → final-normed hidden states [B, L, D] (training computes the head only
        where a loss is taken: `logits`)."""
        features = None
        if vision_pixels is not None:
            features = self.encode_vision(vision_pixels, prepared["vision_pos_hw"], prepared["vision_segment_ids"])
        embeds = self.embed(input_ids, features, prepared["splice_index"])
        x, _ = self.language_model.hidden(embeds, prepared["position_ids"],
                                          jnp.asarray(prepared["attention_mask"], jnp.int32))
        return x

    def logits(self, x):
        """The LM head: hidden states [B, L, D] → logits float32[B, L, V]."""
        return self.language_model.head(x)

    def encode_vision(self, pixels, pos_hw, segment_ids):
        """pixels: float[N, C·T·P·P]; pos_hw: int32[N, 2]; segment_ids: int32[N] → merged features [N/4, D];
        or with a leading shard axis S on all three (one packed sequence per batch shard) → [S, N/4, D]."""
        return self.visual(pixels, pos_hw, segment_ids)

    def embed(self, input_ids, features=None, splice_index=None):
        """Token embeddings with vision features spliced in → [B, L, D].

        features [M, D]: row splice_index[b, l] replaces position (b, l) wherever splice_index ≥ 0 (any row may take
        any feature). features [S, M, D] (the ViT run per batch shard): row b belongs to shard b // (B / S) and
        splice_index indexes that shard's M features, so the splice is a gather within each shard — on a mesh no
        feature crosses devices."""
        embeds = self.language_model.embed(input_ids)
        if features is None:
            return embeds
        index = jnp.asarray(splice_index)
        features = features.astype(embeds.dtype)
        if features.ndim == 2:
            # replicate the (small: merged rows × hidden) features, so the gather lands in the embeddings' sharding
            features = nn.with_logical_constraint(features, (None, None))
            gathered = jnp.take(features, jnp.maximum(index, 0), axis=0)
        else:
            (B, L), (S, _, D) = index.shape, features.shape
            if B % S:
                raise ValueError(f"{B} batch rows cannot be split over {S} vision shards: B must be a multiple of S")
            features = nn.with_logical_constraint(features, ("batch", None, "embed"))
            flat = nn.with_logical_constraint(jnp.maximum(index, 0).reshape(S, B // S * L), ("batch", None))
            gathered = jnp.take_along_axis(features, flat[..., None], axis=1).reshape(B, L, D)
        return nn.with_logical_constraint(jnp.where((index >= 0)[..., None], gathered, embeds),
                                          ("batch", "length", "embed"))

    def prefill(self, input_ids, attention_mask, position_ids, features=None, splice_index=None):
        """Generation's first pass (needs `decoding=True`): as `decode`, but → (logits float32[B, V] at the last
        position, keys/values: (k, v) [layers, B, L, Hkv, hd] with scan_layers, else a list of per-layer
        (k, v) [B, L, Hkv, hd]) — prompts are left padded, so the last position is real. `decode_step`'s cache holds
        them as [..., B, Hkv, C, hd] (`cache_from_prefill`)."""
        embeds = self.embed(input_ids, features, splice_index)
        x, kv = self.language_model.hidden(embeds, position_ids, jnp.asarray(attention_mask, jnp.int32))
        return self.language_model.head(x[:, -1:])[:, 0], kv

    @staticmethod
    def cache_from_prefill(kv, slots: int):
        """`prefill`'s keys/values → the decode cache, zeros after L: (k, v) [layers, B, Hkv, slots, hd] with
        scan_layers, else a list of per-layer (k, v) [B, Hkv, slots, hd] (separate buffers, each read where it lies:
        slicing one stacked array per layer would copy it)."""
        def grow(a):
            a = jnp.swapaxes(a, -3, -2)
            return _cache_sharding(jnp.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, slots - a.shape[-2]), (0, 0)]))
        return jax.tree_util.tree_map(grow, kv)

    def decode_step(self, input_ids, position_ids, cache, index, kv_valid):
        """One cached step (needs `decoding=True`). input_ids: int[B, T] new tokens; position_ids: int[3, B, T];
        cache: `cache_from_prefill`'s, C slots; index: int32[] slot of the first new token; kv_valid: int32[B, C]
        cached keys the new tokens may see (0 at their own slots). → (logits float32[B, T, V], the cache with the new
        keys/values written at index; donate it and the write happens in place)."""
        embeds = self.language_model.embed(input_ids)
        mask = {"index": index, "kv_valid": kv_valid}
        x, new = self.language_model.hidden(embeds, position_ids, mask, cache)
        # new keys/values [..., B, T, Hkv, hd] → the cache's [..., B, Hkv, T, hd] at slot `index`
        write = lambda c, n: _cache_sharding(jax.lax.dynamic_update_slice_in_dim(
            c, jnp.swapaxes(n, -3, -2).astype(c.dtype), index, axis=c.ndim - 2))
        return self.language_model.head(x), jax.tree_util.tree_map(write, cache, new)

    def decode(self, input_ids, attention_mask, position_ids, features=None, splice_index=None):
        """input_ids, attention_mask: int[B, L]; position_ids: int[3, B, L] → logits float32[B, L, V]."""
        embeds = self.embed(input_ids, features, splice_index)
        return self.language_model(embeds, position_ids, jnp.asarray(attention_mask, jnp.int32))


def _packed_pixels(config: Qwen2VLConfig, pixels: list, rows: np.ndarray):
    """[pixel_values; pixel_values_videos] in the packed ViT's row order (`vision_rows`: the window order of
    Qwen2.5-VL; Qwen2-VL packs them as they are)."""
    pixels = jnp.concatenate([jnp.asarray(p) for p in pixels])
    return jnp.take(pixels, jnp.asarray(rows), axis=0) if config.vision.windowed else pixels


def _cache_sharding(cache):
    """One sharding for a decode cache [layers?, B, Hkv, C, hd] from prefill to the last step (rows over the batch
    axes, KV heads over the head axes where they divide), so no program re-lays it out on entry."""
    return nn.with_logical_constraint(cache, ("layers",) * (cache.ndim - 4) + ("batch", "kv_heads", None, None))


def _init(config: Qwen2VLConfig, key) -> dict:
    """Random params, boxed in nn.LogicallyPartitioned (from one image placeholder and a 2×2-patch image). The
    dummy one-row batch is traced without the caller's activation rules: it is no batch a mesh could split."""
    ids = np.array([[config.image_token_id]])
    prepared = prepare_inputs(config, ids, image_grid_thw=np.array([[1, 2, 2]]), image_rows=4)
    pixels = np.zeros((4, config.vision.patch_dim), np.float32)
    with nn.logical_axis_rules(()):
        return Qwen2VL(config).init(key, ids, prepared, pixels, method=Qwen2VL.forward)["params"]


def abstract_params(config: Qwen2VLConfig) -> dict:
    """The params tree of `config` as jax.ShapeDtypeStruct leaves boxed in nn.LogicallyPartitioned (logical axis
    names per dim; `nn.unbox` drops them), in the config's layer layout, computed without allocating."""
    return jax.eval_shape(lambda: _init(config, jax.random.key(0)))


def init_params(config: Qwen2VLConfig, seed: int = 0, shardings=None) -> dict:
    """Random params (unboxed), created directly in `shardings` (a tree like params, e.g. from
    sharding.rules.param_shardings) when given, so a large model never sits whole on one device."""
    return jax.jit(lambda key: nn.unbox(_init(config, key)), out_shardings=shardings)(jax.random.key(seed))
