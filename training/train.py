"""The training loop and the `qwen2vl-train` command.

    qwen2vl-train --config configs/demo_cpu.py --workdir /tmp/demo [--config.steps=300 ...]

The same command runs on a laptop CPU, one TPU VM, or every host of a multi-host slice (each host runs it; JAX finds
its peers). WORKDIR (local or gs://) receives checkpoints/, metrics.jsonl, tensorboard/, config.json, export/ (the
final params as a checkpoint folder for qwen2vl_jax.load / qwen2vl-generate / qwen2vl-eval) and, for the demo,
demo_eval.json and demo.png. A run that finds a checkpoint in WORKDIR resumes from it exactly: same state, same
data order, same following losses.

Multi-host input: each process reads and decodes only the batch shards of its own devices (data_pipeline.batching:
one example stream per batch shard), the processes agree on every batch's bucket shapes and check each other's step
and batch every step (data_pipeline.hosts), so a run's batches and losses do not depend on the process count."""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import sys
import time

import flax.linen as nn
import jax
from etils import epath

from data_pipeline.hosts import HostAgreement
from data_pipeline.pipeline import training_batches
from qwen2vl_jax.compiles import CompileCache, CompileCounter
from qwen2vl_jax import lora
from qwen2vl_jax.config import Qwen2VLConfig
from qwen2vl_jax.lora import DECODER_TARGETS, LoraConfig
from qwen2vl_jax.model import abstract_params, init_params
from qwen2vl_jax.processing import Processor
from sharding.mesh import initialize_distributed, make_mesh
from sharding.rules import batch_shard_count, local_batch_shards, param_shardings, place_local_batch
from training import preflight
from training.checkpoints import Checkpoints, Preemption
from training.interrupts import Interrupted, StopBeforeFirstStep
from training.metrics import MetricsWriter
from training.param_groups import adapters_only, is_uniform, trains, update_scales
from training.step import (init_state, jit_train_step, learning_rate_schedule, make_optimizer, skipped_streak,
                           state_shardings)

log = logging.getLogger("training.train")  # not __name__: "__main__" under python -m
HOST_KEYS = ("stats", "example_ids")  # batch entries that stay on the host
# peak dense bf16 FLOP/s per chip, for the MFU estimate (device_kind prefix → FLOP/s)
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
              "TPU v6": 918e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12}


def model_and_processor(config, workdir: str) -> tuple[Qwen2VLConfig, Processor]:
    """→ (model config, processor): init_from's config, or the preset with config.model's changes and the
    tokenizer's token ids. The tokenizer comes from config.tokenizer, else from init_from; "demo" writes the demo's
    compact tokenizer into WORKDIR/tokenizer."""
    tokenizer_dir = demo_tokenizer(workdir) if config.tokenizer == "demo" else tokenizer_folder(config, workdir)
    if not tokenizer_dir:
        raise preflight.PreflightError("set --config.tokenizer (a folder with tokenizer.json and "
                                       "preprocessor_config.json) or --config.init_from (a converted checkpoint, which "
                                       "carries its tokenizer; configs/demo_cpu_lora.py needs one: a demo run's "
                                       "WORKDIR/export)")
    processor = Processor.from_pretrained(tokenizer_dir)
    model = dict(config.model)
    overrides = {k: model[k] for k in ("dtype", "param_dtype", "remat", "scan_layers", "attention") if k in model}
    if config.init_from:
        model_config = Qwen2VLConfig.from_hf(config.init_from).replace(**overrides)
    else:
        base = Qwen2VLConfig.preset(model["preset"])
        tok = processor.tokenizer
        vocab = {0: base.text.vocab_size, -1: -(-len(tok) // 64) * 64}.get(model["vocab_size"], model["vocab_size"])
        text = dataclasses.replace(base.text, vocab_size=vocab, **dict(model.get("text", {})))
        vision = dataclasses.replace(base.vision, **dict(model.get("vision", {})))
        model_config = base.replace(
            text=text, vision=vision, image_token_id=tok.image_token_id, video_token_id=tok.video_token_id,
            vision_start_token_id=tok.token_to_id("<|vision_start|>"),
            vision_end_token_id=tok.token_to_id("<|vision_end|>"), bos_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_ids[0], pad_token_id=tok.pad_token_id, **overrides)
    spec = lora_config(config)
    if spec is not None:  # the frozen base is stored in lora.base_dtype (bf16 outside the int8 layers)
        model_config = model_config.replace(lora=spec, param_dtype="float32" if spec.base_dtype == "float32"
                                            else "bfloat16")
    return model_config, processor


def lora_config(config) -> LoraConfig | None:
    """config.lora as a qwen2vl_jax.lora.LoraConfig, or None when lora.rank is 0; PreflightError for bad values."""
    fields = config.get("lora")
    if not fields or not fields.rank:
        return None
    try:
        return LoraConfig(rank=fields.rank, alpha=float(fields.alpha), dropout=float(fields.dropout),
                          targets=fields.targets or DECODER_TARGETS, base_dtype=fields.base_dtype)
    except ValueError as error:
        raise preflight.PreflightError(str(error)) from None


def initial_params(config, model_config: Qwen2VLConfig, mesh) -> dict:
    """init_from's params (each device reads its slice, cast to param_dtype) or a seeded random init, sharded; with
    LoRA, that base + fresh adapters, the adapted kernels quantized for an int8 base."""
    base_config = model_config.replace(lora=None)
    quantized = model_config.lora is not None and model_config.lora.quantized
    if config.init_from and quantized:  # read and quantize one array at a time: never the whole float base
        from qwen2vl_jax.checkpoint.load import open_checkpoint
        lazy_base = open_checkpoint(config.init_from, model_config.param_dtype, model_config.scan_layers)[1]
        base = lora.place_quantized(model_config, lazy_base, lora.split(param_shardings(model_config, mesh))[0])
        quantized = False
    elif config.init_from:
        from qwen2vl_jax.checkpoint.load import load
        base = load(config.init_from, dtype=model_config.param_dtype, mesh=mesh,
                    scan_layers=model_config.scan_layers)[1]
    else:
        base = init_params(base_config, config.seed, param_shardings(base_config, mesh))
    if model_config.lora is None:
        return base
    shardings = param_shardings(model_config, mesh)
    params = lora.merge_trees(base, lora.init_adapters(model_config, config.seed, lora.split(shardings)[1]))
    if quantized:  # a random base: quantized whole
        params = jax.jit(functools.partial(lora.quantize, model_config), out_shardings=shardings,
                         donate_argnums=0)(params)
    return params


def trained_only(trained):
    """state → the state a LoRA run's checkpoints hold: the parameters that train (`trained`, a bool tree like
    params: the adapters and lora.train_also's), optimizer state, step and rng — not the frozen base (GBs that never
    change; a resume reads it again from init_from)."""
    return lambda state: state.replace(params=lora.select(state.params, trained))


def demo_tokenizer_dir(workdir: str) -> str:
    return os.path.join(workdir, "tokenizer")


def demo_tokenizer(workdir: str) -> str:
    """WORKDIR/tokenizer, with the demo's tokenizer written there unless it already is. → the folder."""
    folder = demo_tokenizer_dir(workdir)
    if not (epath.Path(folder) / "tokenizer.json").exists():
        from data_pipeline.synthetic import write_demo_processor
        write_demo_processor(folder)
    return folder


def tokenizer_folder(config, workdir: str) -> str:
    """Where the run's tokenizer.json + preprocessor_config.json live ("" when nowhere)."""
    return demo_tokenizer_dir(workdir) if config.tokenizer == "demo" else (config.tokenizer or config.init_from)


def prepare_workdir(config, workdir: str) -> None:
    """Process 0 writes config.json and, for the demo, its tokenizer and data set; the others wait for it."""
    if jax.process_index() == 0:
        epath.Path(workdir).mkdir(parents=True, exist_ok=True)
        (epath.Path(workdir) / "config.json").write_text(config.to_json_best_effort(indent=2))
        if config.tokenizer == "demo":
            demo_tokenizer(workdir)
        if config.data.get("demo_set"):
            import tensorflow_datasets as tfds

            from data_pipeline.synthetic import question_types, write_tfds
            tfds.display_progress_bar(False)
            splits = dict(config.data.demo_set)
            try:
                types = question_types(splits.pop("types", ""))
            except ValueError as error:
                raise preflight.PreflightError(f"data.demo_set.types: {error}") from None
            write_tfds(data_folder(config, workdir), splits, seed=config.seed, types=types)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("qwen2vl-train: workdir prepared")


def data_folder(config, workdir: str) -> str:
    """config.data.data_dir, or WORKDIR/data when empty."""
    return config.data.data_dir or os.path.join(workdir, "data")


def place(batch: dict, mesh, shard_ids) -> tuple[dict, dict]:
    """This process's batch (its batch shards `shard_ids`) → (global arrays in the batch shardings, shardings)."""
    return place_local_batch({k: v for k, v in batch.items() if k not in HOST_KEYS}, mesh, shard_ids)


def model_flops_per_token(params) -> tuple[float, float]:
    """≈ (FLOPs per text token, FLOPs per vision patch) of a training step for a params tree (shapes suffice):
    6 × the parameters each passes through (forward + backward; attention scores and the merger's 4× row reduction
    ignored)."""
    from training.param_groups import group_of

    sizes = {"vision": 0, "merger": 0, "llm": 0}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        sizes[group_of(path)] += leaf.size
    return 6.0 * sizes["llm"], 6.0 * (sizes["vision"] + sizes["merger"])


def peak_flops() -> float | None:
    kind = jax.devices()[0].device_kind
    return next((f for prefix, f in PEAK_FLOPS.items() if kind.startswith(prefix)), None)


def vision_geometry(config) -> tuple[int, int]:
    """(patch size, spatial merge size) of the model the config trains, read without building it."""
    if config.init_from:
        vision = Qwen2VLConfig.from_hf(config.init_from).vision
    else:
        vision = dataclasses.replace(Qwen2VLConfig.preset(config.model["preset"]).vision,
                                     **dict(config.model.get("vision", {})))
    return vision.patch_size, vision.spatial_merge_size


def train(config, workdir: str) -> dict:
    """Runs (or resumes) the run `config` describes in `workdir`; → summary dict (steps, last loss, compiles...).
    Raises preflight.PreflightError (a config or workdir that cannot work) before any device work, and
    interrupts.Interrupted when SIGINT/SIGTERM come before the first step."""
    initialize_distributed()
    workdir = os.fspath(workdir)
    with StopBeforeFirstStep(take_sigterm=jax.process_count() == 1) as guard:
        return _train(config, workdir, guard)


def _train(config, workdir: str, guard: StopBeforeFirstStep) -> dict:
    mesh = make_mesh(config.mesh, dcn=config.get("dcn_mesh") or None)
    preflight.check_config(config, batch_shard_count(mesh), *vision_geometry(config))
    preflight.check_workdir(workdir, jax.process_index())
    preflight.check_resume(config, workdir)
    # before the first compile: programs an earlier run (or a preempted one) compiled are loaded, not compiled again
    cache = CompileCache(config.get("compile_cache", "").replace("{workdir}", workdir)).open()
    prepare_workdir(config, workdir)
    model_config, processor = model_and_processor(config, workdir)
    from data_pipeline.sources import open_source
    source = open_source(config.data.train, data_dir=data_folder(config, workdir))
    if len(source) == 0:
        raise preflight.PreflightError(f"data.train={config.data.train!r} holds no records")
    hosts = HostAgreement(local_batch_shards(mesh), batch_shard_count(mesh))
    dataset = training_batches(source, processor, model_config, config.data, seed=config.seed,
                               shards=hosts.shards, shard_ids=hosts.shard_ids,
                               hosts=hosts if jax.process_count() > 1 else None)

    with jax.set_mesh(mesh):
        shapes = nn.unbox(abstract_params(model_config))
        o = config.optim
        try:  # which parameters train and at what rate: a bad pattern stops here, before any compile
            scales = update_scales(shapes, config.stage, o.get("freeze", ""), o.get("lr_multipliers", ""))
            if model_config.lora is not None:
                scales = adapters_only(scales, config.lora.get("train_also", ""))
                stored = [jax.tree_util.keystr(path) for (path, leaf), t in zip(
                    jax.tree_util.tree_leaves_with_path(shapes), jax.tree.leaves(trains(scales)))
                    if t and not jax.numpy.issubdtype(leaf.dtype, jax.numpy.inexact)]
                if stored:
                    raise ValueError(f"lora.train_also matches parameters stored as integers (the int8 base): "
                                     f"{stored[:3]}; train those in full only with lora.base_dtype='bfloat16'")
        except ValueError as error:
            raise preflight.PreflightError(str(error)) from None
        # steps counts batches; with grad_accum k the optimizer makes steps / k updates (warmup_steps counts updates)
        optimizer = make_optimizer(o.learning_rate, warmup_steps=o.warmup_steps,
                                   total_steps=config.steps // o.grad_accum, weight_decay=o.weight_decay, b1=o.b1,
                                   b2=o.b2, clip_norm=o.clip_norm, grad_accum=o.grad_accum, trainable=trains(scales),
                                   scales=None if is_uniform(scales) else scales)
        s_shardings = state_shardings(model_config, optimizer, mesh)
        make_state = jax.jit(functools.partial(init_state, optimizer=optimizer, seed=config.seed),
                             out_shardings=s_shardings)
        abstract = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                          jax.eval_shape(make_state, shapes), s_shardings)
        keep_only = None if model_config.lora is None else trained_only(trains(scales))
        abstract = (keep_only or (lambda x: x))(abstract)
        preflight.check_disk(workdir, sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(abstract)))
        checkpoints = Checkpoints(os.path.join(workdir, "checkpoints"), config.checkpoint_every,
                                  config.keep_checkpoints, keep_only)
        iterator = iter(dataset)
        try:
            # resume: nothing is initialized or loaded, the newest whole checkpoint is read into its shardings
            restored = checkpoints.restore_latest(abstract)
            if restored:
                first, state, data_state = restored
                if keep_only is not None:  # the frozen base again from init_from (or the seed), as at the start
                    base = lora.split(initial_params(config, model_config, mesh))[0]
                    state = state.replace(params=lora.merge_trees(base, state.params))
                iterator.set_state(data_state)
                log.info("resumed from step %d", first)
            else:
                first, state = 0, make_state(initial_params(config, model_config, mesh))
            summary = run_loop(config, workdir, model_config, mesh, state, optimizer, scales, s_shardings,
                               iterator, checkpoints, first, model_flops_per_token(shapes), hosts, guard)
        finally:
            iterator.close()
            checkpoints.close()
        if summary["steps"] == config.steps or summary["data_ran_out"]:
            from training.export import export_params
            summary["export"] = export_params(
                os.path.join(workdir, "export"), model_config, summary["state"].params,
                tokenizer_folder(config, workdir),
                {"min_pixels": config.data.min_pixels, "max_pixels": config.data.max_pixels},
                peft_adapter=not config.get("lora", {}).get("train_also"))
    if config.get("demo_eval") and not summary["preempted"] and jax.process_index() == 0:
        from training.demo_eval import evaluate_demo
        summary["demo_eval"] = evaluate_demo(config, workdir, model_config, processor, summary.pop("state"))
    summary.pop("state", None)
    programs = cache.close().programs
    summary["compile_cache"] = cache.summary() | {"step_loaded": programs.loaded("step"),
                                                  "step_compiled": programs.compiled("step")}
    log.info("%d programs loaded from the cache, %d compiled", programs.loaded(), programs.compiled())
    return summary


def run_loop(config, workdir, model_config, mesh, state, optimizer, scales, s_shardings, iterator, checkpoints,
             first: int, flops_per_token: tuple[float, float], hosts: HostAgreement,
             guard: StopBeforeFirstStep | None = None) -> dict:
    steps = {}  # jitted step per batch-sharding layout

    def step_for(shardings):
        key = tuple(sorted((k, str(s.spec)) for k, s in jax.tree_util.tree_leaves_with_path(shardings)
                           for k in [jax.tree_util.keystr(k)]))
        if key not in steps:
            steps[key] = jit_train_step(model_config, optimizer, mesh, s_shardings, shardings, scales)
        return steps[key]

    accum = config.optim.grad_accum
    schedule = learning_rate_schedule(config.optim.learning_rate, config.optim.warmup_steps, config.steps // accum)
    text_flops, vision_flops = flops_per_token
    peak = peak_flops()
    writer = MetricsWriter(workdir, config.steps, first, tensorboard=config.get("tensorboard", True))
    preemption = None  # made after the first step (every process stops at the same step); until then `guard`
    window = {"tokens": 0, "padded": 0, "vision": 0, "vision_padded": 0, "skipped": 0, "time": time.perf_counter()}
    totals = {"skipped": 0, "tokens": 0, "padded": 0, "examples": 0}  # this process's shards only
    nonfinite_run, step, metrics, shapes, ran_out = 0, first, {}, set(), False
    with CompileCounter() as compiles:
        try:
            while step < config.steps:
                try:
                    batch = next(iterator)
                except StopIteration:
                    ran_out = True
                    log.warning("the training data ran out after step %d (data.num_epochs=%s): saving and stopping",
                                step, config.data.num_epochs)
                    if step > first:
                        checkpoints.save(step, state, iterator, force=True)
                    break
                stats = batch["stats"]
                shapes.add(tuple(batch[k].shape if k in batch else None
                                 for k in ("input_ids", "vision_pixels", "loss_index")))
                data_crc = hosts.check(step, batch)
                device_batch, shardings = place(batch, mesh, hosts.shard_ids)
                state, metrics = step_for(shardings)(state, device_batch)
                step += 1
                if preemption is None:
                    preemption = Preemption(first)  # takes SIGTERM over from the guard
                    if guard is not None:
                        guard.disarm()
                for key, name in (("tokens", "real_tokens"), ("padded", "padded_tokens"),
                                  ("vision", "real_vision_rows"), ("vision_padded", "padded_vision_rows"),
                                  ("skipped", "skipped")):
                    window[key] += int(stats[name])
                totals["skipped"] += int(stats["skipped"])
                totals["tokens"] += int(stats["real_tokens"])
                totals["padded"] += int(stats["padded_tokens"])
                totals["examples"] += int(stats["examples"])
                writer.advance()
                if step % config.log_every == 0 or step == config.steps:
                    loss = float(metrics["loss"])
                    streak = skipped_streak(state.opt_state)
                    nonfinite_run = int(streak) if streak is not None else (
                        0 if math.isfinite(loss) else nonfinite_run + config.log_every)
                    if nonfinite_run >= config.max_nonfinite_steps:
                        raise FloatingPointError(
                            f"the loss has been NaN/inf for {nonfinite_run} steps (updates were skipped); lower "
                            f"optim.learning_rate or check the data; the last good checkpoint is in {workdir}")
                    elapsed = time.perf_counter() - window["time"]
                    flops = text_flops * window["tokens"] + vision_flops * window["vision"]
                    writer.write(step, {
                        "loss": loss, "grad_norm": float(metrics["grad_norm"]),
                        "lr": float(schedule((step - 1) // accum)),
                        "tokens_per_s": window["tokens"] / elapsed,
                        "padding_efficiency": window["tokens"] / max(window["padded"], 1),
                        "vision_padding_efficiency": window["vision"] / max(window["vision_padded"], 1),
                        "mfu": flops / elapsed / (peak * jax.device_count()) if peak else None,
                        "skipped_samples": totals["skipped"], "step_compiles": compiles.count("step"),
                        "data_crc": data_crc})
                    window = dict.fromkeys(window, 0) | {"time": time.perf_counter()}
                if preemption.stop(step):
                    checkpoints.save(step, state, iterator, force=True)
                    log.warning("preemption (SIGTERM): saved step %d to %s; stopping", step, workdir)
                    break
                checkpoints.save(step, state, iterator, force=step == config.steps)
        finally:
            if preemption is not None:
                preemption.restore()
            writer.close()
    return {"steps": step, "loss": float(metrics["loss"]) if metrics else None,
            "preempted": preemption is not None and preemption.requested, "data_ran_out": ran_out,
            "step_compiles": compiles.count("step"), "batch_shapes": len(shapes), "skipped_samples": totals["skipped"],
            "padding_efficiency": totals["tokens"] / max(totals["padded"], 1), "examples_read": totals["examples"],
            "state": state}


def main(argv=None) -> None:
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "experiment config file (configs/NAME.py)", lock_config=True)
    flags.DEFINE_string("workdir", None, "run folder (local or gs://): checkpoints, metrics, results")
    flags.DEFINE_bool("check", False, "pre-flight check only: read the train file, bucket and pack it, plan the step's "
                      "memory on --config.chip; report to stdout and WORKDIR/check.json (training/check.py)")
    flags.mark_flags_as_required(["config", "workdir"])

    def run(_):
        from absl import logging as absl_logging

        from data_pipeline.batching import NoUsableRecords

        started.append(True)
        absl_logging.set_verbosity(absl_logging.WARNING)  # orbax and tfds log every file they touch at INFO
        for ours in ("training", "data_pipeline"):
            logging.getLogger(ours).setLevel(logging.INFO)
        try:
            if flags.FLAGS.check:
                from training.check import check_command
                sys.exit(check_command(flags.FLAGS.config, flags.FLAGS.workdir))
            summary = train(flags.FLAGS.config, flags.FLAGS.workdir)
        except Interrupted as e:  # everything was unwound (workers stopped, nothing committed); XLA may still
            log.error("%s", e)  # be compiling on other threads, so leave without the interpreter's teardown
            logging.shutdown()
            sys.stdout.flush()
            os._exit(128 + e.signum)
        except (preflight.PreflightError, NoUsableRecords) as e:
            log.error("%s", e)
            sys.exit(2 if isinstance(e, preflight.PreflightError) else 1)
        print(json.dumps(summary, indent=2, default=float))

    started = []
    argv = list(sys.argv if argv is None else argv)
    try:
        app.run(run, argv=argv)
    except (AttributeError, KeyError) as e:  # ml_collections refusing a --config.FIELD while absl parses the flags
        message = None if started else preflight.unknown_field(argv, e)
        if message is None:
            raise
        print(message, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
