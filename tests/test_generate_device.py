"""Generation on device: every compile in the process counted over 20 random requests, one device→host copy per
call (no per-token host sync), the decode loop updates the cache in place, sharded params give one device's
tokens, and token ids outside the vocabulary are refused (real) or harmless (masked)."""
import jax
import numpy as np
import pytest

import qwen2vl_jax
from qwen2vl_jax.buckets import Shapes
from qwen2vl_jax.checkpoint.mapping import stack_layers
from qwen2vl_jax.compiles import CompileCounter
from qwen2vl_jax.decoding import abstract_calls, programs
from qwen2vl_jax.generation import Timeline
from qwen2vl_jax.processing import smart_resize
from reference import make_batch, make_request, reference, transformers_generate
from test_generate import NEW, REQUESTS


def _model(name="untied", seed=1):
    cfg, _, params = reference(name, seed)
    return cfg, jax.device_put(params)


def test_twenty_random_requests_compile_at_most_ten_programs_in_the_process():
    """One request at a time (images 28–1500 px, aspect up to 1:8) on default ladders: every backend compile in
    the process is counted, and the second half of the requests compiles nothing."""
    cfg, params = _model("tied", 0)
    rng = np.random.default_rng(0)
    requests = []
    for i in range(20):
        side, aspect = int(rng.integers(28, 1501)), rng.uniform(1, 8)
        h, w = (side, max(28, int(side / aspect)))[:: 1 if rng.random() < 0.5 else -1]
        h, w = smart_resize(h, w)
        requests.append(make_request(cfg, [int(rng.integers(1, 200)), ("image", (1, h // 14, w // 14)),
                                       int(rng.integers(1, 60))], 200 + i))
    after = []
    with CompileCounter() as compiles:
        for request in requests:
            assert qwen2vl_jax.generate(cfg, params, request, max_new_tokens=4, eos_token_ids=[]).shape == (1, 4)
            after.append(compiles.count())
    print(f"\ncompiles after each request {after}: {dict(compiles.names)}")
    assert after[-1] <= 10 and after[9] == after[-1], dict(compiles.names)  # ×2 ladders: 6 prefill + 2 decode
    assert set(compiles.names) == {"prefill", "decode"}, dict(compiles.names)


def test_one_copy_to_the_host_per_call_and_two_programs():
    cfg, params = _model()
    batch = make_batch(cfg, [make_request(cfg, pieces, i) for i, pieces in enumerate(REQUESTS)])
    expected = qwen2vl_jax.generate(cfg, params, batch, max_new_tokens=NEW, eos_token_ids=[])
    timeline = Timeline()
    with jax.transfer_guard_device_to_host("disallow"):  # any implicit device→host copy (a per-step sync) raises
        got = qwen2vl_jax.generate(cfg, params, batch, max_new_tokens=NEW, eos_token_ids=[], timeline=timeline)
    np.testing.assert_array_equal(got, expected)
    assert [name for name, _ in timeline.phases] == ["prepare", "prefill", "decode", "fetch"]
    assert timeline.steps == [NEW]  # the loop ran max_new_tokens − 1 decoder steps after the prefill's token, + 1
    early = Timeline()
    stop = int(expected[0, 2])
    qwen2vl_jax.generate(cfg, params, {k: v[:1] if k in ("input_ids", "attention_mask") else v
                                       for k, v in make_batch(cfg, [make_request(cfg, REQUESTS[0], 0)]).items()},
                         max_new_tokens=NEW, eos_token_ids=[stop], timeline=early)
    assert early.steps[0] <= 3  # the loop ends on device when every row is done


@pytest.mark.parametrize("scan", [False, True])
def test_decode_updates_the_cache_in_place(scan):
    """Compiled memory of the decode program: the donated cache is aliased to the output and no temporary holds a
    copy of it (scan layout: XLA:CPU materializes one layer's slice at a time, 1/layers of the cache)."""
    cfg, _, params = reference("untied", 1)
    cfg = cfg.replace(scan_layers=scan)
    params = stack_layers(params, cfg) if scan else params
    shapes = Shapes(batch=4, length=256, cache=8192, vision_rows=0)
    calls = abstract_calls(cfg, shapes)
    _, decode = programs(cfg)
    memory = decode.lower(params, calls["cache"], calls["state"], calls["controls"]).compile().memory_analysis()
    cache_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(calls["cache"]))
    assert memory.alias_size_in_bytes == cache_bytes
    limit = cache_bytes / cfg.text.num_hidden_layers + cache_bytes / 8 if scan else cache_bytes / 8
    assert memory.temp_size_in_bytes < limit, (memory.temp_size_in_bytes, cache_bytes)


def test_sharded_params_give_one_devices_tokens():
    from sharding.mesh import make_mesh
    from sharding.rules import GENERATION_RULES, generation_rules, param_shardings

    cfg, params = _model()
    batch = make_batch(cfg, [make_request(cfg, pieces, i) for i, pieces in enumerate(REQUESTS)])
    expected = qwen2vl_jax.generate(cfg, params, batch, max_new_tokens=NEW, eos_token_ids=[])
    mesh = make_mesh("tensor=4,data=2")
    sharded = jax.device_put(params, param_shardings(cfg, mesh, GENERATION_RULES))
    assert sharded["language_model"]["lm_head"]["kernel"].sharding.spec == jax.P(None, "tensor")
    with CompileCounter() as compiles, generation_rules(mesh):
        first = qwen2vl_jax.generate(cfg, sharded, batch, max_new_tokens=NEW, eos_token_ids=[])
        again = qwen2vl_jax.generate(cfg, sharded, batch, max_new_tokens=NEW, eos_token_ids=[])
    np.testing.assert_array_equal(first, expected)
    np.testing.assert_array_equal(again, expected)
    assert dict(compiles.names) == {"prefill": 1, "decode": 1}


def test_ids_outside_the_vocabulary():
    cfg, params = _model()
    requests = [make_request(cfg, pieces, i) for i, pieces in enumerate(REQUESTS[:3])]
    batch = make_batch(cfg, requests)
    expected = qwen2vl_jax.generate(cfg, params, batch, max_new_tokens=NEW, eos_token_ids=[])
    junk = dict(batch, input_ids=batch["input_ids"].copy())
    masked = batch["attention_mask"] == 0
    junk["input_ids"][masked] = np.random.default_rng(0).choice([-5, cfg.text.vocab_size, 10**6, 7], masked.sum())
    np.testing.assert_array_equal(qwen2vl_jax.generate(cfg, params, junk, max_new_tokens=NEW, eos_token_ids=[]),
                                  expected)
    bad = dict(batch, input_ids=batch["input_ids"].copy())
    bad["input_ids"][1, -2] = cfg.text.vocab_size + 3
    with pytest.raises(ValueError, match=rf"input_ids\[1, {bad['input_ids'].shape[1] - 2}\] = "
                                         rf"{cfg.text.vocab_size + 3} is outside this checkpoint's vocabulary"):
        qwen2vl_jax.generate(cfg, params, bad, max_new_tokens=NEW)


def test_a_text_only_prompt_equals_transformers():
    cfg, model, params = reference("untied", 1)
    request = {"input_ids": np.random.default_rng(5).integers(0, 490, (1, 12))}
    got = qwen2vl_jax.generate(cfg, jax.device_put(params), request, max_new_tokens=NEW, eos_token_ids=[])
    np.testing.assert_array_equal(got[0], transformers_generate(model, cfg, request, NEW))


def test_sharded_decode_moves_no_weights_or_cache_between_devices():
    """Compiled decode on tensor=2,data=4: per step only activation-sized collectives (the tensor-parallel
    all-reduces of [B/data, 1, D], greedy's argmax over the vocabulary shards); no weight, cache or logits gather."""
    import flax.linen as nn
    from jax.sharding import NamedSharding, PartitionSpec as P

    from qwen2vl_jax.model import abstract_params
    from sharding import hlo_stats
    from sharding.mesh import make_mesh
    from sharding.rules import GENERATION_RULES, batch_shardings, generation_rules, param_shardings

    cfg = reference("untied", 1)[0]
    mesh = make_mesh("tensor=2,data=4")
    shapes = Shapes(batch=8, length=256, cache=2048, vision_rows=1024)
    place = lambda tree, shardings: jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
    params = place(nn.unbox(abstract_params(cfg)), param_shardings(cfg, mesh, GENERATION_RULES))
    calls = abstract_calls(cfg, shapes, shards=4)
    inputs = place(calls["inputs"], batch_shardings(calls["inputs"], mesh, GENERATION_RULES))
    with generation_rules(mesh):
        prefill, decode = programs(cfg, tuple(nn.get_logical_axis_rules()), jax.sharding.get_abstract_mesh())
        compiled = prefill.lower(params, inputs, calls["controls"], cache_length=shapes.cache).compile()
        token, cache, kv_valid, seen = (place(x, s) for x, s in zip(
            (calls["state"]["token"], calls["cache"], calls["state"]["kv_valid"], calls["state"]["seen"]),
            compiled.output_shardings))
        rows = NamedSharding(mesh, P("data"))
        state = dict(calls["state"], token=token, kv_valid=kv_valid, seen=seen,
                     done=place(calls["state"]["done"], rows), next_position=place(calls["state"]["next_position"], rows))
        text = decode.lower(params, cache, state, calls["controls"]).compile().as_text()
    step_activation = shapes.batch // 4 * cfg.text.hidden_size * 4  # [B / data, 1, D] float32
    greedy = [c for c in hlo_stats.collectives(text) if "branch_1" not in c.op_name]  # branch_1: the sampling sort
    assert greedy and max(c.bytes for c in greedy) <= 4 * step_activation, sorted(
        (c.bytes, c.kind, c.op_name[-60:]) for c in greedy)[-3:]


def test_vision_padding_is_cheap_and_changes_nothing():
    """Padding rows of a ViT bucket form runs of their own segments: the blockwise kernel visits one block per
    padding block (not padding², as one shared segment would), and the real rows' features do not change."""
    from qwen2vl_jax.attention_blockwise import visited_block_pairs
    from qwen2vl_jax.inputs import PADDING_RUN, vision_layout
    from qwen2vl_jax.model import Qwen2VL

    cfg, params = _model()
    grids = np.array([[1, 4, 6], [2, 2, 4]])
    real = int(grids.prod(-1).sum())
    pixels = np.random.default_rng(0).standard_normal((real, cfg.vision.patch_dim)).astype(np.float32)
    features = {}
    encode = jax.jit(lambda p, x, pos, seg: Qwen2VL(cfg).apply({"params": p}, x, pos, seg, method=Qwen2VL.encode_vision))
    for bucket in (real, 4096):
        pos, seg = vision_layout(grids, 2, bucket)[:2]
        assert (seg[real:] < 0).all() and len(set(seg[real:PADDING_RUN + real].tolist())) <= 2
        padded = np.concatenate([pixels, np.zeros((bucket - real, cfg.vision.patch_dim), np.float32)])
        features[bucket] = np.asarray(encode(params, padded, pos, seg))[:real // 4]
        if bucket == 4096:
            assert int(visited_block_pairs(seg[None])) <= 4096 // 256 + 2  # one kv block per query block
    np.testing.assert_allclose(features[4096], features[real], rtol=1e-5, atol=1e-5)
