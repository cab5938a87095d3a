"""The training input pipeline: ToExample (template ids, labels, truncation, bad samples) and Batches (buckets,
packing, exact iterator state)."""
import json
import threading

import numpy as np
import pytest
from ml_collections import ConfigDict
from PIL import Image

from data_pipeline.pipeline import training_batches
from data_pipeline.sources import JsonlSource
from data_pipeline.synthetic import make_example, to_messages, write_demo_processor, write_jsonl
from data_pipeline.transforms import ToExample
from qwen2vl_jax.processing import Processor
from training.step import IGNORE, cross_entropy
from training.train import model_and_processor
from configs.demo_cpu import get_config


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(model config, processor) of the demo config (compact tokenizer, small model)."""
    folder = tmp_path_factory.mktemp("demo")
    config = get_config()
    model_config, processor = model_and_processor(config, str(folder))
    return model_config, processor


def data_config(**changes) -> ConfigDict:
    base = get_config().data.to_dict() | dict(batch_size=4, shuffle=False, num_epochs=1, workers=0)
    return ConfigDict(base | changes)


def to_example(processor, max_length=128, max_vision_rows=4096):
    return ToExample(processor, max_length=max_length, max_vision_rows=max_vision_rows)


def test_ids_match_the_processor_and_only_assistant_tokens_are_labelled(demo):
    _, processor = demo
    example = make_example(3)
    messages = to_messages(example, example["image"])
    messages.append({"role": "user", "content": "And again?"})
    messages.append({"role": "assistant", "content": [{"type": "text", "text": "yes twice"}]})
    out = to_example(processor).map({"messages": messages, "images": [example["image"]], "id": "x"})
    reference = processor([messages], add_generation_prompt=False)
    np.testing.assert_array_equal(out["input_ids"], reference["input_ids"][0])
    tok = processor.tokenizer
    labelled = out["labels"][out["labels"] != IGNORE]
    expected = tok.encode(example["answer"]) + [tok.token_to_id("<|im_end|>")] + tok.encode("yes twice") + \
        [tok.token_to_id("<|im_end|>")]
    assert labelled.tolist() == expected
    image_positions = out["input_ids"] == tok.image_token_id
    assert image_positions.sum() == int(np.prod(out["image_grid_thw"][0])) // 4
    assert (out["labels"][image_positions] == IGNORE).all()
    assert out["position_ids"].shape == (3, len(out["input_ids"]))


def test_truncation_never_cuts_an_image_run(demo):
    _, processor = demo
    images = [make_example(0)["image"], make_example(1)["image"]]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Look."}]},
                {"role": "assistant", "content": "blue"},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this?"}]},
                {"role": "assistant", "content": "red"}]
    record = {"messages": messages, "images": images, "id": "a"}
    full = to_example(processor, max_length=10_000).map(record)
    starts = np.flatnonzero(full["input_ids"] == processor.tokenizer.token_to_id("<|vision_start|>"))
    short = to_example(processor, max_length=int(starts[1]) + 3).map(record)  # the cut falls inside image 2
    assert len(short["input_ids"]) == starts[1]  # moved back before the open run
    assert len(short["image_grid_thw"]) == 1 and len(short["pixels"]) == int(np.prod(short["image_grid_thw"][0]))
    np.testing.assert_array_equal(short["labels"], full["labels"][:starts[1]])
    too_short = to_example(processor, max_length=int(starts[0]) + 3).map(record)  # no answer left
    assert "no assistant tokens" in too_short["error"]


def test_bad_samples_are_skipped_counted_and_never_crash(demo, tmp_path, caplog):
    model_config, processor = demo
    path = write_jsonl(tmp_path, 6)
    lines = open(path).read().splitlines()
    first = {k: v for k, v in json.loads(lines[0]).items() if k != "id"}  # bad lines get their line number as id
    (tmp_path / "images" / "corrupt.png").write_bytes(b"\x89PNG not really")
    bad = [
        first | {"messages": [{"role": "user", "content": [{"type": "image", "image": "images/nope.png"},
                                                                         {"type": "text", "text": "?"}]},
                                             {"role": "assistant", "content": "x"}]},  # missing file
        first | {"messages": [{"role": "user", "content": [{"type": "image", "image": "images/corrupt.png"},
                                                                         {"type": "text", "text": "?"}]},
                                             {"role": "assistant", "content": "x"}]},  # corrupt file
        first | {"messages": [{"role": "user", "content": "word " * 300},
                                             {"role": "assistant", "content": "x"}]},  # over-long: answer cut off
        first | {"messages": [{"role": "user", "content": "no image"},
                                             {"role": "assistant", "content": "x"}], "images": ["images/0.png"]},
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines[:3] + [json.dumps(b) for b in bad] + ["{not json"] + lines[3:]) + "\n")
    batches = list(training_batches(JsonlSource(path), processor, model_config, data_config(), seed=0))
    stats = [b["stats"] for b in batches]
    assert sum(int(s["examples"]) for s in stats) == 6
    assert sum(int(s["skipped"]) for s in stats) == 5
    kept = [i for b in batches for row in b["example_ids"] for i in row]
    assert len(kept) == 6 and len(set(kept)) == 6
    assert caplog.text.count("skipping sample") == 5
    corrupt = "cannot read image '" + str(tmp_path / "images" / "corrupt.png")
    for reason in ("nope.png", corrupt, "no assistant tokens", "no matching", "line 8"):
        assert reason in caplog.text


def _records(n, start=0):
    for i in range(start, start + n):
        e = make_example(i)
        yield {"messages": to_messages(e), "images": [e["image"]], "id": str(i)}


def test_packing_keeps_examples_apart(demo):
    """The summed loss of a packed batch equals the sum over the same examples run one per row: packed samples
    neither see each other (segment ids) nor shift each other's positions."""
    import jax
    from qwen2vl_jax.model import Qwen2VL, init_params

    model_config, processor = demo
    records = list(_records(6))
    packed = next(iter(training_batches(records, processor, model_config, data_config(pack=True, batch_size=2,
                                                                                     length_buckets=(64, 256)),
                                        seed=0)))
    assert max(len(row) for row in packed["example_ids"]) > 1
    seg = packed["prepared"]["attention_mask"]
    assert seg.max() > 1 and (packed["prepared"]["position_ids"][0][seg == 2] < 64).all()
    params = init_params(model_config, seed=1)

    @jax.jit  # one compile per batch shape: far cheaper than op-by-op dispatch
    def loss(ids, prepared, pixels, labels):
        logits = Qwen2VL(model_config).apply({"params": params}, ids, prepared, pixels, method=Qwen2VL.forward)
        return cross_entropy(logits, labels)

    def total(batch):
        return loss(batch["input_ids"], batch["prepared"], batch["vision_pixels"], batch["labels"])

    n_packed = sum(len(r) for r in packed["example_ids"])
    ids = [i for row in packed["example_ids"] for i in row]
    assert ids == [str(i) for i in range(n_packed)]
    sub = next(iter(training_batches(records[:n_packed], processor, model_config,
                                     data_config(batch_size=n_packed), seed=0)))
    (a, ca), (b, cb) = total(packed), total(sub)
    assert int(ca) == int(cb)
    np.testing.assert_allclose(float(a), float(b), rtol=2e-5)


def test_iterator_state_round_trips_through_a_checkpoint(demo, tmp_path):
    import jax.numpy as jnp
    from training.checkpoints import Checkpoints

    model_config, processor = demo
    records = list(_records(40))
    config = data_config(pack=True, batch_size=2, shuffle=True, num_epochs=None, length_buckets=(64, 128))
    it = iter(training_batches(records, processor, model_config, config, seed=3))
    for _ in range(3):
        next(it)
    checkpoints = Checkpoints(str(tmp_path / "ckpt"), every=1)
    checkpoints.save(3, {"x": jnp.zeros(2)}, it, force=True)
    expected = [next(it)["example_ids"] for _ in range(4)]
    checkpoints.close()
    again = Checkpoints(str(tmp_path / "ckpt"), every=1)
    _, data_state = again.restore(3, {"x": jnp.zeros(2)})
    fresh = iter(training_batches(records, processor, model_config, config, seed=3))
    fresh.set_state(data_state)
    assert [next(fresh)["example_ids"] for _ in range(4)] == expected
    again.close()


def test_batches_use_bucketed_shapes(demo):
    model_config, processor = demo
    config = data_config(batch_size=3, length_buckets=(40, 64, 128), vision_buckets=(64, 256, 1024))
    shapes = {(b["input_ids"].shape, b["vision_pixels"].shape[1])
              for b in training_batches(list(_records(30)), processor, model_config, config, seed=0)}
    assert {s[0][1] for s in shapes} <= {40, 64, 128} and {s[1] for s in shapes} <= {64, 256, 1024}
    assert all(s[0][0] == 3 for s in shapes)


@pytest.fixture(scope="module")
def tfds_source(tmp_path_factory):
    from data_pipeline.synthetic import write_tfds
    from data_pipeline.sources import open_source

    folder = str(tmp_path_factory.mktemp("tfds"))
    write_tfds(folder, {"train": 24, "test": 4})
    return open_source("tfds:synthetic_vqa:train", data_dir=folder)


@pytest.mark.parametrize("pack", [False, True])
def test_worker_processes_give_the_same_batches_and_resume(demo, tfds_source, pack):
    """data.workers > 0 (grain mp_prefetch) decodes in other processes: same batches, same order; and a resume
    mid-stream, repeated 5 times per layout, under the conditions that stalled grain's set_state (the first pool
    still alive, the resumed stream read from another thread), continues exactly where the uninterrupted stream
    goes, every time."""
    model_config, processor = demo
    config = lambda workers: data_config(batch_size=2, shuffle=True, num_epochs=None, workers=workers, pack=pack)
    inline = iter(training_batches(tfds_source, processor, model_config, config(0), seed=1))
    expected = [next(inline) for _ in range(8)]
    pooled = iter(training_batches(tfds_source, processor, model_config, config(2), seed=1))
    got = [next(pooled) for _ in range(3)]
    for g, want in zip(got, expected):
        assert g["example_ids"] == want["example_ids"]
        np.testing.assert_array_equal(g["input_ids"], want["input_ids"])
        np.testing.assert_array_equal(g["vision_pixels"], want["vision_pixels"])
    for repetition in range(5):
        at = 1 + repetition % 3  # batches before the checkpoint
        state = json.loads(json.dumps(pooled.get_state() if at == 3 else states_after(at, tfds_source, demo,
                                                                                        config(0))))
        resumed = iter(training_batches(tfds_source, processor, model_config, config(2), seed=1))
        out = []
        reader = threading.Thread(target=lambda: (resumed.set_state(state),
                                                  out.extend(next(resumed)["example_ids"] for _ in range(3))),
                                  daemon=True)
        reader.start()
        reader.join(timeout=60)
        assert not reader.is_alive(), f"repetition {repetition}: the resumed stream stalled 60 s"
        resumed.close()
        assert out == [b["example_ids"] for b in expected[at:at + 3]], f"repetition {repetition} (after {at})"
    pooled.close()


def states_after(batches, source, demo, config):
    """The iterator state after `batches` batches of an in-process stream."""
    model_config, processor = demo
    it = iter(training_batches(source, processor, model_config, config, seed=1))
    for _ in range(batches):
        next(it)
    return it.get_state()


def test_old_grain_iterator_states_resume_at_their_record():
    """Checkpoints written before positions were record indices hold grain iterator states; they still resume."""
    from data_pipeline.batching import record_position

    assert record_position({"position": 9}) == 9
    assert record_position({"parent": {"next_index": 5}}) == 5
    # an mp_prefetch (2 workers) state after 7 records: worker 0 read 4, worker 1 read 3
    mp = {"next_index_in_cycle": 1, "next_index_in_datasets": 2, "iterators_in_use_indices": [0, 1],
          "iterators_in_use_states": [{"next_index": 4}, {"next_index": 3}], "exhausted": [0, 0], "future_states": {}}
    assert record_position({"parent": mp}) == 7
    with pytest.raises(ValueError, match="cannot read a record position"):
        record_position({"parent": {"something": 1}})


def test_qwen2_5_vl_training_batches_give_the_models_own_logits(demo):
    """A Qwen2.5-VL model (window attention, window-ordered packed ViT) on a packed training batch: each example's
    logits equal the model run on the processor's own layout of that example (`Qwen2VL.__call__`), so the batch's
    window order, window segment ids and splice index agree with the model's host-side layout."""
    import dataclasses

    from qwen2vl_jax.model import Qwen2VL, init_params

    model_config, processor = demo
    vision = dataclasses.replace(model_config.vision, model_type="qwen2_5_vl", window_size=56,
                                 fullatt_block_indexes=(1,), intermediate_size=48)
    config = model_config.replace(vision=vision)
    from data_pipeline.pipeline import with_pixel_bounds

    records = list(_records(4))
    data = data_config(pack=True, batch_size=2, length_buckets=(64, 512))
    batch = next(iter(training_batches(records, processor, config, data, seed=0)))
    processor = with_pixel_bounds(processor, data.min_pixels, data.max_pixels, data.get("video_total_pixels"))
    params = init_params(config, seed=2)
    model = Qwen2VL(config)
    import jax  # jitted (ids and grids of the single examples stay concrete): far cheaper than op-by-op dispatch

    logits = np.asarray(jax.jit(lambda p, ids, prep, px: model.apply({"params": p}, ids, prep, px,
                                                                     method=Qwen2VL.forward))(
        params, batch["input_ids"], batch["prepared"], batch["vision_pixels"]))
    by_id = {r["id"]: r for r in records}
    seen, padded_windows = 0, 0
    for row, ids in enumerate(batch["example_ids"]):
        segments = batch["prepared"]["attention_mask"][row]
        for s, example_id in enumerate(ids, start=1):
            record = by_id[example_id]
            alone = processor([record["messages"]], images=record["images"], add_generation_prompt=False)
            padded_windows += int(((alone["image_grid_thw"][:, 1:] // 2) % 2).any())  # a merged side not a multiple of 2
            want = np.asarray(jax.jit(lambda p, px: model.apply({"params": p}, alone["input_ids"],
                                                                alone["attention_mask"], px,
                                                                alone["image_grid_thw"]))(
                params, alone["pixel_values"]))[0]
            np.testing.assert_allclose(logits[row][segments == s], want, atol=2e-5, rtol=2e-5)
            seen += 1
    assert seen == 4 and padded_windows > 0
