"""Video files: decode + preprocess time of a 61 s 1280×720 30 fps clip, and LLM tokens per clip under both budgets.

    python bench/video.py [--seconds 61] [--width 1280] [--height 720] [--fps 30] [--pipeline]

Encodes the clip itself (H.264, libx264 veryfast, moving pattern + noise), then times fetch_video (frame count by
demux, one decoding pass keeping the 2 fps frames) and preprocess_video under the default total_pixels
(qwen-vl-utils 0.0.14: 115200·28²) and the original release's 24576·28². The token table is arithmetic only
(qwen-vl-utils' frame count and per-frame budget). --pipeline also times the grain training pipeline (2 workers)
on records holding video files. Writes bench/results/video.json."""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qwen2vl_jax.processing import fetch_video, preprocess_video  # noqa: E402
from qwen2vl_jax.processing import video_decode  # noqa: E402
from qwen2vl_jax.processing.video import (  # noqa: E402
    QWEN2VL_RELEASE_TOTAL_PIXELS,
    VIDEO_TOTAL_PIXELS,
    num_sampled_frames,
    video_frame_size,
)

BUDGETS = {"qwen-vl-utils 0.0.14 (115200·28²)": VIDEO_TOTAL_PIXELS,
           "Qwen2-VL release (24576·28²)": QWEN2VL_RELEASE_TOTAL_PIXELS}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def encode_clip(path: str, seconds: float, width: int, height: int, fps: int) -> float:
    """A moving gradient with a noise patch (so frames differ and the encoder has work); → seconds taken."""
    import av

    start = time.perf_counter()
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * 255 // width), (y * 255 // height), ((x + y) * 127 // (width + height))], -1)
    base = base.astype(np.uint8)
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"preset": "veryfast", "crf": "23"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(int(seconds * fps)):
            frame = np.roll(base, 4 * i, axis=1)
            frame[100:228, 100:228] = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return time.perf_counter() - start


def tokens(grid: np.ndarray) -> int:
    return int(np.prod(grid)) // 4  # 2×2 merge


def time_clip(path: str) -> dict:
    t0 = time.perf_counter()
    total, fps = video_decode._probe(path, repr(path))
    probe_s = time.perf_counter() - t0
    rss_before = peak_rss_mb()
    t0 = time.perf_counter()
    frames, meta = fetch_video(path)
    fetch_s = time.perf_counter() - t0
    out = {"file_MB": round(os.path.getsize(path) / 1e6, 2), "total_frames": total, "fps": fps,
           "count_by_demux_s": round(probe_s, 3), "fetch_video_s": round(fetch_s, 2),
           "frames": int(len(frames)), "frame_shape": list(frames.shape[1:]), "sample_fps": round(meta.sample_fps, 4),
           "sampled_frames_MB": round(frames.nbytes / 1e6, 1),
           "peak_rss_MB_before_fetch": round(rss_before, 1), "peak_rss_MB_after_fetch": round(peak_rss_mb(), 1),
           "preprocess": {}}
    for name, budget in BUDGETS.items():
        t0 = time.perf_counter()
        rows, grid = preprocess_video(frames, total_pixels=budget)
        out["preprocess"][name] = {"preprocess_video_s": round(time.perf_counter() - t0, 2),
                                   "grid_thw": grid.tolist(), "vision_rows": int(len(rows)),
                                   "llm_tokens": tokens(grid)}
        del rows
    return out


def token_table() -> list[dict]:
    rows = []
    for seconds in (10, 61, 300, 1200):
        for height, width in ((360, 640), (720, 1280), (1080, 1920)):
            n = num_sampled_frames(seconds * 30, 30.0)
            row = {"seconds": seconds, "resolution": f"{width}x{height}", "fps": 30, "frames": n}
            for name, budget in BUDGETS.items():
                h, w = video_frame_size(n, height, width, total_pixels=budget)
                row[name] = {"frame_size": [h, w], "llm_tokens": n // 2 * (h // 28) * (w // 28)}
            rows.append(row)
    return rows


def pipeline_throughput(folder: str, clip: str, examples: int) -> dict:
    """Examples/s of the grain training pipeline (2 workers) on records each holding the video file."""
    from ml_collections import ConfigDict

    from configs.demo_cpu import get_config
    from data_pipeline.pipeline import training_batches
    from training.train import model_and_processor

    config = get_config()
    model_config, processor = model_and_processor(config, os.path.join(folder, "demo"))
    answer = {"role": "assistant", "content": [{"type": "text", "text": "A cat sits on the mat."}]}
    records = [{"messages": [{"role": "user", "content": [{"type": "video", "video": clip},
                                                          {"type": "text", "text": "Describe the video."}]}, answer],
                "videos": [clip], "id": str(i)} for i in range(examples)]
    data = ConfigDict(config.data.to_dict() | dict(batch_size=2, shuffle=False, num_epochs=1, workers=2,
                                                   length_buckets=(4096,), vision_buckets=(32768,)))
    start, seen, skipped = time.perf_counter(), 0, 0
    for batch in training_batches(records, processor, model_config, data, seed=0):
        seen += sum(len(row) for row in batch["example_ids"])
        skipped += int(batch["stats"].get("skipped", 0)) if "stats" in batch else 0
    seconds = time.perf_counter() - start
    return {"examples": seen, "skipped": skipped, "seconds": round(seconds, 2),
            "examples_per_s": round(seen / seconds, 3), "workers": 2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=61)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--pipeline", action="store_true", help="also time the training pipeline on video records")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "video.json"))
    args = parser.parse_args()
    result: dict = {"cpu_count": os.cpu_count()}
    with tempfile.TemporaryDirectory() as folder:
        clip = os.path.join(folder, "clip.mp4")
        result["encode_s"] = round(encode_clip(clip, args.seconds, args.width, args.height, args.fps), 1)
        result["clip"] = {"seconds": args.seconds, "resolution": f"{args.width}x{args.height}", "fps": args.fps,
                          "codec": "h264 (libx264 veryfast crf 23)"} | time_clip(clip)
        result["tokens_per_clip"] = token_table()
        if args.pipeline:
            short = os.path.join(folder, "short.mp4")
            encode_clip(short, 10, 640, 360, 30)
            result["pipeline_10s_640x360"] = pipeline_throughput(folder, short, examples=16)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
