"""Generation: greedy tokens equal transformers' generate, batching changes nothing, sampling is seeded, bucketed
shapes keep compilations few, and bad requests are named."""
import functools
import re

import numpy as np
import pytest

import qwen2vl_jax
from qwen2vl_jax.buckets import Ladders, PaddingStats, rung, shapes_for
from qwen2vl_jax.compiles import CompileCounter
from qwen2vl_jax.generation import STATS, collate, generate_many
from qwen2vl_jax.processing import smart_resize
from reference import make_batch, make_request, reference, transformers_generate

# four images of different sizes and prompt lengths, and one video (t' = 2 ≤ max(h', w'): the rule both share)
REQUESTS = [[3, ("image", (1, 4, 4)), 5], [9, ("image", (1, 8, 6)), 2], [1, ("image", (1, 2, 10)), 14],
            [6, ("image", (1, 6, 6)), 7], [2, ("video", (4, 6, 4)), 4]]
NEW = 10


@functools.lru_cache(maxsize=None)
def _transformers_greedy(name: str, seed: int, index: int) -> np.ndarray:
    cfg, model, _ = reference(name, seed)
    return transformers_generate(model, cfg, make_request(cfg, REQUESTS[index], index), NEW)


# random tied models collapse onto repeating one token (the tied head favours the input token); the untied seed-1
# model's answers vary, so it is the one that checks positions and the cache step by step
@pytest.mark.parametrize("name,seed", [("tied", 0), ("untied", 1)])
def test_batched_greedy_equals_transformers_per_sample(name, seed):
    cfg, _, params = reference(name, seed)
    requests = [make_request(cfg, pieces, i) for i, pieces in enumerate(REQUESTS)]
    ours = qwen2vl_jax.generate(cfg, params, make_batch(cfg, requests), max_new_tokens=NEW, eos_token_ids=[])
    assert ours.shape == (len(REQUESTS), NEW) and ours.dtype == np.int32
    for i in range(len(REQUESTS)):
        np.testing.assert_array_equal(ours[i], _transformers_greedy(name, seed, i), err_msg=f"request {i}")
    if name == "untied":
        assert sorted(len(set(row)) for row in ours) == [3, 4, 8, 8, 10]
        from qwen2vl_jax.checkpoint.mapping import stack_layers  # the scanned layout keeps a stacked cache

        scanned = qwen2vl_jax.generate(cfg.replace(scan_layers=True), stack_layers(params, cfg),
                                       make_batch(cfg, requests), max_new_tokens=NEW, eos_token_ids=[])
        np.testing.assert_array_equal(scanned, ours)
    alone = qwen2vl_jax.generate(cfg, params, requests[2], max_new_tokens=NEW, eos_token_ids=[])
    np.testing.assert_array_equal(alone[0], ours[2])


def test_rows_stop_at_eos_and_then_pad():
    cfg, _, params = reference("untied", 1)
    requests = [make_request(cfg, pieces, i) for i, pieces in enumerate(REQUESTS[:3])]
    free = qwen2vl_jax.generate(cfg, params, make_batch(cfg, requests), max_new_tokens=NEW, eos_token_ids=[])
    stop = int(free[1, 3])  # row 1's 4th token becomes the eos id
    stopped = qwen2vl_jax.generate(cfg, params, make_batch(cfg, requests), max_new_tokens=NEW, eos_token_ids=[stop])
    for row in range(3):
        hits = np.flatnonzero(free[row] == stop)
        end = hits[0] + 1 if len(hits) else NEW
        np.testing.assert_array_equal(stopped[row, :end], free[row, :end])
        assert (stopped[row, end:] == cfg.pad_token_id).all()
    assert (stopped[1, 4:] == cfg.pad_token_id).all()


def test_sampling_is_seeded_and_its_filters_work():
    cfg, _, params = reference("untied", 1)
    batch = make_batch(cfg, [make_request(cfg, pieces, i) for i, pieces in enumerate(REQUESTS[:2])])
    run = functools.partial(qwen2vl_jax.generate, cfg, params, batch, max_new_tokens=NEW, eos_token_ids=[])
    greedy = run()
    first, again, other = run(temperature=1.0, seed=1), run(temperature=1.0, seed=1), run(temperature=1.0, seed=2)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other) and not np.array_equal(first, greedy)
    np.testing.assert_array_equal(run(temperature=1.0, top_k=1, seed=3), greedy)  # top-1 is the argmax
    np.testing.assert_array_equal(run(temperature=5.0, top_p=1e-6, seed=4), greedy)  # smallest nucleus: argmax


def test_fifty_random_requests_compile_few_programs():
    """50 requests, images 28..1500 px with aspect up to 1:8, random prompt lengths, in batches of 4."""
    cfg, _, params = reference("tied")
    rng = np.random.default_rng(0)
    requests = []
    for i in range(50):
        side = rng.integers(28, 1501)
        aspect = rng.uniform(1, 8)
        h, w = (side, max(28, int(side / aspect)))[:: 1 if rng.random() < 0.5 else -1]
        h, w = smart_resize(int(h), int(w))
        requests.append(make_request(cfg, [int(rng.integers(1, 200)), ("image", (1, h // 14, w // 14)),
                                       int(rng.integers(1, 60))], 100 + i))
    STATS.__init__()
    batches = [make_batch(cfg, requests[start:start + 4]) for start in range(0, 50, 4)]
    shapes = [shapes_for(Ladders(), len(b["input_ids"]), b["input_ids"].shape[1], len(b["pixel_values"]), 4)
              for b in batches]
    for b, s in zip(batches, shapes):  # ×2 rungs: no padded axis is more than half padding above the first rung
        assert s.length == 256 or s.length < 2 * b["input_ids"].shape[1], s
        assert s.vision_rows == 1024 or s.vision_rows < 2 * len(b["pixel_values"]), s
    with CompileCounter() as compiles:
        for batch in batches:
            out = qwen2vl_jax.generate(cfg, params, batch, max_new_tokens=4, eos_token_ids=[])
            assert out.shape == (len(batch["input_ids"]), 4)
    counts = {name: compiles.count(name) for name in ("prefill", "decode")}
    print(f"\ncompiles {dict(compiles.names)}; padding waste {STATS.waste()}")
    # one prefill per distinct bucketed shape and one decode per (batch, cache) rung: here 5 and 2
    assert counts == {"prefill": len(set(shapes)), "decode": len({(s.batch, s.cache) for s in shapes})}, counts
    assert counts["prefill"] <= 6 and counts["decode"] <= 2
    assert compiles.count() == sum(counts.values()), dict(compiles.names)  # nothing else
    assert max(STATS.waste().values()) < 0.9 and STATS.waste()["vision_rows"] < 0.5, STATS.waste()


def test_bad_requests_are_named_and_leave_others_alone():
    cfg, _, params = reference("untied", 1)
    good = [make_request(cfg, pieces, i) for i, pieces in enumerate(REQUESTS)]
    alone = [qwen2vl_jax.generate(cfg, params, r, max_new_tokens=4, eos_token_ids=[])[0] for r in good[:3]]
    no_image = {k: v for k, v in good[1].items() if k not in ("pixel_values", "image_grid_thw")}
    long = {"input_ids": np.full((1, 20000), 7), "attention_mask": np.ones((1, 20000), np.int64)}
    results = generate_many(cfg, params, [good[0], no_image, good[1], long, good[2]], batch_size=4,
                            max_new_tokens=4, eos_token_ids=[])
    assert isinstance(results[1], ValueError) and "image placeholder tokens" in str(results[1])
    assert isinstance(results[3], ValueError) and re.search("prompt length .* 20000 exceeds the largest bucket 16384",
                                                            str(results[3]))
    for got, want in zip((results[0], results[2], results[4]), alone):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="image placeholder tokens"):  # the batch function names it too
        qwen2vl_jax.generate(cfg, params, no_image, max_new_tokens=4)
    with pytest.raises(ValueError, match="max_new_tokens must be"):
        qwen2vl_jax.generate(cfg, params, good[0], max_new_tokens=0)


def test_collate_equals_the_processor_layout():
    cfg = reference("untied", 1)[0]
    requests = [make_request(cfg, pieces, i) for i, pieces in enumerate(REQUESTS)]
    collated, expected = collate(requests, cfg.pad_token_id), make_batch(cfg, requests)
    assert collated.keys() == expected.keys()
    for key in expected:
        np.testing.assert_array_equal(collated[key], expected[key], err_msg=key)


def test_ladders_pick_the_smallest_rung_and_count_padding():
    ladders = Ladders()
    assert rung((256, 1024), 257, "x") == 1024
    shapes = shapes_for(ladders, batch=3, length=300, vision_rows=2000, max_new_tokens=64)
    assert (shapes.batch, shapes.length, shapes.cache, shapes.vision_rows) == (4, 512, 2048, 2048)
    assert shapes_for(ladders, 1, 2000, 0, 10).cache == 8192 and shapes_for(ladders, 1, 5, 0, 1).vision_rows == 0
    for need in range(1, 16385, 97):  # ×2 rungs: past the first rung, a padded axis is less than half padding
        assert rung(ladders.length, need, "x") < max(2 * need, 257)
        assert rung(ladders.vision_rows, 4 * need, "x") < max(8 * need, 1025)
    stats = PaddingStats()
    stats.add(shapes, tokens=900, vision_rows=2000, cache_used=1000)
    waste = stats.waste()
    assert waste["tokens"] == pytest.approx(1 - 900 / 2048) and waste["vision_rows"] == pytest.approx(1 - 2000 / 2048)


def test_generate_with_params_loaded_onto_a_mesh(tmp_path):
    from sharding.mesh import make_mesh

    cfg, model, params = reference("untied", 1)
    model.save_pretrained(tmp_path)
    batch = make_batch(cfg, [make_request(cfg, pieces, i) for i, pieces in enumerate(REQUESTS)])
    expected = qwen2vl_jax.generate(cfg, params, batch, max_new_tokens=NEW, eos_token_ids=[])
    config, sharded = qwen2vl_jax.load(tmp_path, mesh=make_mesh("fsdp=4,tensor=2"))
    assert len(sharded["language_model"]["embed_tokens"].sharding.device_set) == 8
    np.testing.assert_array_equal(qwen2vl_jax.generate(config, sharded, batch, max_new_tokens=NEW,
                                                       eos_token_ids=[]), expected)


def test_repetition_penalty_and_the_checkpoints_defaults_match_transformers():
    """repetition_penalty as transformers applies it (greedy, prompt and generated tokens); generation_config.json's
    values (config.generation) are what generate does when the caller passes nothing."""
    from qwen2vl_jax.config import GenerationDefaults

    cfg, model, params = reference("untied", 1)
    request = make_request(cfg, REQUESTS[1], 1)
    want = transformers_generate(model, cfg, request, NEW, repetition_penalty=1.5)
    got = qwen2vl_jax.generate(cfg, params, request, max_new_tokens=NEW, repetition_penalty=1.5, eos_token_ids=[])
    np.testing.assert_array_equal(got[0], want)
    assert not np.array_equal(got, qwen2vl_jax.generate(cfg, params, request, max_new_tokens=NEW, eos_token_ids=[]))
    stop = int(got[0, 4])
    end = int(np.flatnonzero(got[0] == stop)[0]) + 1
    checkpoint = cfg.replace(generation=GenerationDefaults(eos_token_ids=(12345, stop), repetition_penalty=1.5,
                                                           pad_token_id=7))
    defaults = qwen2vl_jax.generate(checkpoint, params, request, max_new_tokens=NEW)
    np.testing.assert_array_equal(defaults[0, :end], got[0, :end])
    assert (defaults[0, end:] == 7).all()
