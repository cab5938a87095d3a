"""Bad media never stops a run: http(s) / gs:// image loading (timeouts, size cap, HTTP errors), decompression bombs,
and in training (ToExample → the batcher) and evaluation (runner.prepare → evaluate) every bad image or video is a
counted skip or an error line naming its file, while the other samples come out exactly as in a run without it."""
import http.server
import io
import json
import logging
import struct
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from data_pipeline.pipeline import training_batches
from data_pipeline.sources import JsonlSource
from data_pipeline.synthetic import write_jsonl
from data_pipeline.transforms import ToExample
from fake_gcs import gcs  # noqa: F401 (fixture)
from qwen2vl_jax.processing.loading import fetch_url, load_image
from training.train import model_and_processor
from configs.demo_cpu import get_config
from reference import tiny_checkpoint


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def blank_png(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG of any size, built row by row through zlib (20000×10000 is ~25 kB, made in a
    fraction of a second without ever holding the pixels)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    row, packer = b"\0" * (1 + (width + 7) // 8), zlib.compressobj(6)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# ---------------------------------------------------------------- http(s) images


class Handler(http.server.BaseHTTPRequestHandler):
    image = png(noise(20, 30))

    def log_message(self, *args):  # keep the test output clean
        pass

    def do_GET(self):
        route = getattr(self, "route_" + self.path.strip("/").split(".")[0], None)
        if route is None:
            self.send_error(404, "Not Found")
            return
        route()

    def send_body(self, body: bytes, length: bool = True):
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout, size cap)
            pass

    def route_ok(self):
        self.send_body(self.image)

    def route_slow(self):  # answers after 2 s
        time.sleep(2)
        self.send_body(self.image)

    def route_drip(self):  # headers at once, then a byte every 0.05 s: each read is quick, the whole is slow
        self.send_response(200)
        self.end_headers()
        try:
            for byte in self.image[:60]:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.05)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def route_big(self):  # honest Content-Length over the cap
        self.send_body(b"\0" * 300_000)

    def route_unannounced(self):  # no Content-Length: only counting the body while reading can stop it
        self.close_connection = True
        self.send_body(b"\0" * 300_000, length=False)


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_an_http_image_is_fetched(server):
    expected = np.asarray(load_image(Handler.image))
    np.testing.assert_array_equal(np.asarray(load_image(f"{server}/ok.png")), expected)


def test_an_http_error_names_the_url_and_status(server):
    with pytest.raises(ValueError, match=r"/missing\.png.*HTTP 404"):
        load_image(f"{server}/missing.png")


def test_a_slow_server_hits_the_timeout(server):
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"/slow\.png.*0\.3 s"):
        load_image(f"{server}/slow.png", timeout=0.3)
    assert time.monotonic() - start < 1.5


def test_a_dripping_server_hits_the_whole_download_deadline(server):
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"/drip\.png"):
        fetch_url(f"{server}/drip.png", timeout=0.5)
    assert time.monotonic() - start < 1.5


@pytest.mark.parametrize("route", ["big", "unannounced"])
def test_a_body_over_the_cap_is_refused(server, route):
    with pytest.raises(ValueError, match=rf"/{route}\.png.*100000-byte cap"):
        load_image(f"{server}/{route}.png", max_bytes=100_000)
    assert len(fetch_url(f"{server}/{route}.png", max_bytes=400_000)) == 300_000


def test_an_unreachable_host_is_an_oserror_naming_it():
    with pytest.raises(OSError, match="127.0.0.1:1/x.png"):
        load_image("http://127.0.0.1:1/x.png", timeout=2)  # port 1: connection refused


# ---------------------------------------------------------------- gs:// images, decompression bombs


def test_a_gs_image_is_read_through_epath(gcs, tmp_path):  # noqa: F811
    from etils import epath

    epath.Path("gs://bucket/img/a.png").write_bytes(Handler.image)
    np.testing.assert_array_equal(np.asarray(load_image("gs://bucket/img/a.png")),
                                  np.asarray(load_image(Handler.image)))
    with pytest.raises(FileNotFoundError, match="gs://bucket/img/nope.png"):
        load_image("gs://bucket/img/nope.png")
    epath.Path("gs://bucket/img/bad.png").write_bytes(b"junk")
    with pytest.raises(ValueError, match="gs://bucket/img/bad.png"):
        load_image(epath.Path("gs://bucket/img/bad.png"))


def test_a_real_decompression_bomb_is_a_value_error_saying_what_to_do(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(blank_png(20000, 10000))  # 200 Mpx > 2 × PIL's MAX_IMAGE_PIXELS
    with pytest.raises(ValueError, match=r"bomb\.png.*exceeds limit.*[Rr]esize.*MAX_IMAGE_PIXELS"):
        load_image(path)
    with pytest.raises(ValueError, match=r"bytes.*MAX_IMAGE_PIXELS"):
        load_image(path.read_bytes())


def test_pil_s_limit_is_the_one_applied(tmp_path, monkeypatch):
    path = tmp_path / "a.png"
    path.write_bytes(png(noise(40, 50)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # error above 2 × 500 pixels
    with pytest.raises(ValueError, match=r"a\.png.*MAX_IMAGE_PIXELS"):
        load_image(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)  # 2000 px ≤ 2 × 1500: a warning only, the image loads
    with pytest.warns(Image.DecompressionBombWarning):
        assert load_image(path).size == (50, 40)


# ---------------------------------------------------------------- the bad media


def cut(data: bytes) -> bytes:
    return data[: len(data) // 2]


def jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


# name → (kind, reference relative to the media root, what the reason must say besides the name)
BAD = {
    "missing": ("image", "media/nope.png", "not found"),
    "corrupt": ("image", "media/corrupt.png", "cannot read image"),
    "cut_png": ("image", "media/cut.png", "truncated"),
    "cut_jpeg": ("image", "media/cut.jpg", "truncated"),
    "bomb": ("image", "media/bomb.png", "MAX_IMAGE_PIXELS"),
    "no_frames": ("video", "media/noframes", "no frame"),
    "garbage_mp4": ("video", "media/clip.mp4", "cannot read video"),
    "empty_mp4": ("video", "media/empty.mp4", "cannot read video"),
    "cut_mp4": ("video", "media/cut.mp4", "cannot read video"),
}
IMAGE_CASES = [k for k, (kind, _, _) in BAD.items() if kind == "image"]
VIDEO_CASES = [k for k, (kind, _, _) in BAD.items() if kind == "video"]


def write_bad_media(root) -> None:
    media = root / "media"
    media.mkdir(exist_ok=True)
    (media / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (media / "cut.png").write_bytes(cut(png(noise(200, 200, seed=1))))
    (media / "cut.jpg").write_bytes(cut(jpeg(noise(200, 200, seed=2))))
    (media / "bomb.png").write_bytes(blank_png(20000, 10000))
    (media / "noframes").mkdir(exist_ok=True)
    (media / "noframes" / "notes.txt").write_text("no frames here")
    (media / "clip.mp4").write_bytes(np.random.default_rng(3).bytes(4096))
    (media / "empty.mp4").write_bytes(b"")
    (media / "cut.mp4").write_bytes(cut(mp4(20)))


def mp4(frames: int) -> bytes:
    """A small real mp4 (MPEG-4 part 2, 64×48, 10 fps; its index sits at the end, so half a file has none)."""
    import av

    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 10, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buffer.getvalue()


def user(kind: str, ref: str) -> dict:
    return {"role": "user", "content": [{"type": kind, kind: ref}, {"type": "text", "text": "What is it?"}]}


# ---------------------------------------------------------------- training


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo")
    return model_and_processor(get_config(), str(folder))


def data_config():
    from ml_collections import ConfigDict

    base = get_config().data.to_dict() | dict(batch_size=4, shuffle=False, num_epochs=1, workers=0)
    return ConfigDict(base)


@pytest.fixture(scope="module")
def training_data(tmp_path_factory):
    """(root, good JSONL lines, bad JSONL lines by case) — 6 good synthetic samples and one line per bad case."""
    root = tmp_path_factory.mktemp("train")
    good = open(write_jsonl(root, 6)).read().splitlines()
    write_bad_media(root)
    bad = {name: json.dumps({"id": f"bad-{name}", "messages": [user(kind, ref), {"role": "assistant",
                                                                                 "content": "x"}]})
           for name, (kind, ref, _) in BAD.items()}
    return root, good, bad


@pytest.mark.parametrize("case", list(BAD))
def test_to_example_turns_bad_media_into_an_error_record_naming_the_file(demo, training_data, case):
    _, processor = demo
    root, _, bad = training_data
    record = JsonlSource(write_lines(root / f"{case}.jsonl", [bad[case]]))[0]
    example = ToExample(processor, max_length=4096, max_vision_rows=1 << 16).map(record)
    _, ref, says = BAD[case]
    assert set(example) == {"error", "id"} and example["id"] == f"bad-{case}"
    assert str(root / ref) in example["error"] and says in example["error"], example["error"]


def write_lines(path, lines) -> str:
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def batches_of(path, demo) -> list[dict]:
    model_config, processor = demo
    return list(training_batches(JsonlSource(path), processor, model_config, data_config(), seed=0))


def test_training_skips_and_counts_every_bad_sample_and_the_rest_is_unchanged(demo, training_data, caplog):
    root, good, bad = training_data
    mixed = [good[0], bad["missing"], good[1], bad["corrupt"], bad["cut_png"], good[2], bad["cut_jpeg"],
             bad["bomb"], good[3], bad["no_frames"], bad["garbage_mp4"], good[4], bad["empty_mp4"], good[5],
             bad["cut_mp4"]]
    clean = batches_of(write_lines(root / "clean.jsonl", good), demo)
    with caplog.at_level(logging.WARNING):
        dirty = batches_of(write_lines(root / "mixed.jsonl", mixed), demo)
    assert sum(int(b["stats"]["skipped"]) for b in dirty) == len(BAD)
    assert sum(int(b["stats"]["skipped"]) for b in clean) == 0
    for name, (_, ref, _) in BAD.items():
        assert f"skipping sample bad-{name}" in caplog.text and str(root / ref) in caplog.text, name
    assert len(dirty) == len(clean)
    for a, b in zip(clean, dirty):
        assert a["example_ids"] == b["example_ids"]
        for key in a:
            if key not in ("example_ids", "stats"):
                assert_tree_equal(a[key], b[key])
        stats = {k: v for k, v in a["stats"].items() if k != "skipped"}
        assert stats == {k: v for k, v in b["stats"].items() if k != "skipped"}


def assert_tree_equal(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_tree_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_tree_equal(x, y)
    else:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------- evaluation




def eval_lines(good: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"id": f"q{i}", "question": "What color is the car?", "image": f"img/{i}.png", "answers": ["red"],
             "_pixels": rng.integers(0, 255, (int(rng.integers(30, 90)), int(rng.integers(30, 90)), 3), np.uint8)}
            for i in range(good)]


@pytest.fixture(scope="module")
def eval_setup(tmp_path_factory):
    """(checkpoint, root, good lines, bad lines by case)."""
    root = tmp_path_factory.mktemp("eval")
    checkpoint = tiny_checkpoint(root / "ckpt")
    (root / "img").mkdir()
    good = []
    for line in eval_lines(6):
        Image.fromarray(line.pop("_pixels")).save(root / line["image"])
        good.append(line)
    write_bad_media(root)
    bad = {name: {"id": f"bad-{name}", "question": "What is it?", kind: ref, "answers": ["x"]}
           for name, (kind, ref, _) in BAD.items()}
    return checkpoint, root, good, bad


def run_eval(checkpoint, data, out) -> list[dict]:
    from evaluation.runner import evaluate

    evaluate(str(checkpoint), str(data), "vqa", str(out), batch_size=4, max_new_tokens=4)
    return [json.loads(line) for line in open(out)]


@pytest.mark.parametrize("case", list(BAD))
def test_prepare_turns_bad_media_into_an_error_naming_the_file(eval_setup, case):
    from evaluation.data import JsonlEvalSource
    from evaluation.runner import prepare
    from qwen2vl_jax.processing import Processor

    checkpoint, root, _, bad = eval_setup
    data = root / f"{case}.jsonl"
    data.write_text(json.dumps(bad[case]) + "\n")
    request, prompt, error = prepare(Processor.from_pretrained(str(checkpoint)), JsonlEvalSource(str(data))[0], "vqa")
    _, ref, says = BAD[case]
    assert request is None and prompt.startswith("What is it?")
    assert str(root / ref) in error and says in error, error


def test_eval_fetches_http_images_and_reports_a_failed_fetch(eval_setup, server):
    from evaluation.data import JsonlEvalSource
    from evaluation.runner import prepare
    from qwen2vl_jax.processing import Processor

    checkpoint, root, _, _ = eval_setup
    data = root / "http.jsonl"
    (root / "ok.png").write_bytes(Handler.image)  # what the server sends, as a local file
    write_lines(data, [json.dumps({"id": name, "question": "?", "image": ref})
                       for name, ref in (("http", f"{server}/ok.png"), ("local", "ok.png"),
                                         ("missing", f"{server}/missing.png"))])
    processor, source = Processor.from_pretrained(str(checkpoint)), JsonlEvalSource(str(data))
    (request, _, error), (local, _, _) = (prepare(processor, source[i], "vqa") for i in (0, 1))
    assert error is None
    np.testing.assert_array_equal(request["pixel_values"], local["pixel_values"])
    request, _, error = prepare(processor, source[2], "vqa")
    assert request is None and f"{server}/missing.png" in error and "HTTP 404" in error


def test_eval_writes_an_error_line_per_bad_sample_and_the_rest_is_unchanged(eval_setup, tmp_path):
    checkpoint, root, good, bad = eval_setup
    mixed = [good[0], bad["missing"], bad["corrupt"], good[1], bad["cut_png"], bad["cut_jpeg"], good[2],
             bad["bomb"], good[3], bad["no_frames"], bad["garbage_mp4"], good[4], bad["empty_mp4"], good[5],
             bad["cut_mp4"]]
    write_lines(root / "clean.jsonl", [json.dumps(line) for line in good])
    write_lines(root / "mixed.jsonl", [json.dumps(line) for line in mixed])
    clean = run_eval(checkpoint, root / "clean.jsonl", tmp_path / "clean.jsonl")
    dirty = run_eval(checkpoint, root / "mixed.jsonl", tmp_path / "mixed.jsonl")
    assert [line["id"] for line in dirty] == [line["id"] for line in mixed]
    errors = {line["id"]: line["error"] for line in dirty if line["error"]}
    assert set(errors) == {f"bad-{name}" for name in BAD}
    for name, (_, ref, says) in BAD.items():
        assert str(root / ref) in errors[f"bad-{name}"] and says in errors[f"bad-{name}"], name
    assert all(line["prediction"] is None and line["score"] is None for line in dirty if line["error"])
    assert all(isinstance(line["prediction"], str) and line["prediction"] for line in clean)
    kept = [{k: v for k, v in line.items() if k != "index"} for line in dirty if not line["error"]]
    assert kept == [{k: v for k, v in line.items() if k != "index"} for line in clean]
    summary = json.loads((tmp_path / "mixed.summary.json").read_text())
    assert (summary["samples"], summary["scored"], summary["errors"]) == (len(mixed), len(good), len(BAD))
