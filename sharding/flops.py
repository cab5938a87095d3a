"""FLOPs of a train step and the MFU ceiling its collectives leave on a TPU chip (used by `sharding.plan`).

Model FLOPs (the MFU numerator, no rematerialization counted), per step for the whole batch:

    6 · (P_text · B·L  +  P_head · K  +  P_vision · V)  +  attention
    P_text   = layers · (d·q + 2·d·kv + q·d + 3·d·ffn)       matmul weights one text position touches (no embedding
                                                            lookup, no biases/norms); all B·L positions, padding too
    P_head   = vocab · d                                    the LM head, at the K = B·L/8 selected positions
    P_vision = patch_dim·e + depth·(4e² + m·e·mlp) + (g² + g·d)/merge²   per ViT patch (g = merge²·e: the merger;
               m = 2 MLP matrices, 3 for Qwen2.5-VL's SwiGLU)
    attention = 3 · 4 · (layers · q · B · L²/2  +  e · B · n · Σ_blocks seen)  (forward QKᵀ and PV, 2 FLOPs per MAC,
                ×3 for forward + backward; text causal: L²/2 pairs per row; ViT: one image of n = V/B patches per
                sample; a full block's patch sees n patches, a Qwen2.5-VL window block's min(n, window patches))

The step itself executes more: remat "full" recomputes the forward (hardware ≈ 8/6 of the 6·P matmul FLOPs),
"dots"/"dots_no_batch" recompute only cheap elementwise work (counted as 1×).

MFU ceiling on a chip (per device, per step): compute time t_c = hardware FLOPs / peak bf16 FLOP/s; collective
time t_x = Σ bytes each device sends (bandwidth-optimal ring: all-gather and all-to-all (n−1)/n of the result,
reduce-scatter (n−1)× the result, all-reduce 2(n−1)/n, collective-permute the result; from sharding.hlo_stats) /
ICI egress per chip, taken as half the chip's bidirectional ICI bandwidth — as if every link carried the collective,
which a ring over one mesh axis does not, so t_x is optimistic and the ceilings are upper bounds:
    not overlapped: model FLOPs / peak / (t_c + t_x);   fully overlapped: model FLOPs / peak / max(t_c, t_x).
HBM traffic, latency and the DCN are not modelled."""
from __future__ import annotations

# peak bf16 FLOP/s, HBM bytes, bidirectional ICI bytes/s per chip. Cloud TPU docs (cloud.google.com/tpu/docs/v5e,
# /v5p, /v6e, /v4; system architecture tables): v5e 197 TFLOPs, 16 GB, 400 GBps ICI; v5p 459 TFLOPs, 95 GB,
# 1200 GBps; v6e 918 TFLOPs, 32 GB, 800 GBps; v4 275 TFLOPs, 32 GiB. The v4 page gives no per-chip ICI figure:
# assumed 6 links × 50 GB/s per direction (the TPU v4 paper's 400 Gb/s links) = 600 GBps bidirectional.
CHIPS = {
    "v5e": {"peak_flops": 197e12, "hbm": 16e9, "ici_bidirectional": 400e9},
    "v5p": {"peak_flops": 459e12, "hbm": 95e9, "ici_bidirectional": 1200e9},
    "v4": {"peak_flops": 275e12, "hbm": 32e9, "ici_bidirectional": 600e9},
    "v6e": {"peak_flops": 918e12, "hbm": 32e9, "ici_bidirectional": 800e9},
}
REMAT_MATMUL_FACTOR = {"none": 1.0, "dots": 1.0, "dots_no_batch": 1.0, "full": 8 / 6}


def model_flops(config, batch: int, seq: int, patches_per_sample: int, head_positions: int | None = None) -> dict:
    """Model FLOPs of one train step over the global batch (see the module docstring); head_positions: K, the
    positions the LM head runs on (default all B·L). → {"text", "head", "vision", "attention_text",
    "attention_vision", "total"} in FLOPs."""
    v, t = config.vision, config.text
    d, q, kv = t.hidden_size, t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    e, group = v.embed_dim, v.spatial_merge_size**2 * v.embed_dim
    tokens, patches = batch * seq, batch * patches_per_sample
    head_positions = tokens if head_positions is None else head_positions
    p_text = t.num_hidden_layers * (d * q + 2 * d * kv + q * d + 3 * d * t.intermediate_size)
    mlp_matrices = 3 if v.windowed else 2  # Qwen2.5-VL's SwiGLU: gate, up, down
    p_vision = (v.patch_dim * e + v.depth * (4 * e * e + mlp_matrices * e * v.mlp_dim)
                + (group * group + group * v.hidden_size) / v.spatial_merge_size**2)
    # a window block's query sees one window (window_units² · merge² patches) rather than the whole image
    window = (v.window_units * v.spatial_merge_size) ** 2 if v.windowed else patches_per_sample
    full_blocks = sum(v.full_attention_blocks)
    seen = full_blocks * patches_per_sample + (v.depth - full_blocks) * min(window, patches_per_sample)
    out = {"text": 6.0 * p_text * tokens, "head": 6.0 * t.vocab_size * d * head_positions,
           "vision": 6.0 * p_vision * patches,
           "attention_text": 12.0 * t.num_hidden_layers * q * batch * seq * seq / 2,
           "attention_vision": 12.0 * e * batch * patches_per_sample * seen}
    out["total"] = sum(out.values())
    return out


def hardware_flops(flops: dict, remat: str) -> float:
    """What the step executes: the 6·P matmul part scaled for rematerialization, attention as is (its backward
    recomputes the probabilities blockwise whatever the remat policy; not counted extra)."""
    dense = flops["text"] + flops["head"] + flops["vision"]
    return dense * REMAT_MATMUL_FACTOR.get(remat, 1.0) + flops["attention_text"] + flops["attention_vision"]


def mfu_ceiling(model_flops_per_device: float, hardware_flops_per_device: float, wire_bytes_per_device: float,
                chip: str) -> dict:
    """→ {"compute_seconds", "collective_seconds", "mfu_not_overlapped", "mfu_overlapped"} per device per step on
    `chip` (a key of CHIPS; the model in the module docstring)."""
    spec = CHIPS[chip]
    compute = hardware_flops_per_device / spec["peak_flops"]
    collective = wire_bytes_per_device / (spec["ici_bidirectional"] / 2)
    ideal = model_flops_per_device / spec["peak_flops"]
    return {"compute_seconds": compute, "collective_seconds": collective,
            "mfu_not_overlapped": ideal / (compute + collective) if compute + collective else 0.0,
            "mfu_overlapped": ideal / max(compute, collective) if max(compute, collective) else 0.0}
