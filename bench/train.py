"""Train-step throughput on the CPU: our jitted `training.step.train_step` vs a transformers + torch.optim step.

Same small Qwen2-VL config (real 151936-token vocabulary, tied LM head), same random weights (redrawn at unit
activation scale as tests/reference.py / bench/forward.py, converted with `params_from_torch`), same batch,
float32, 2 threads each:

- batch: 4 samples, each one 224×224 image (grid (1, 16, 16): 256 patch rows → 64 LLM tokens) inside a ChatML-like
  prompt with 64 text tokens (L = 130 with <vision_start>/<vision_end>); labels = input_ids except the image
  placeholders (-100), Hugging Face convention (the shift happens inside both losses).
- ours: `jax.jit(partial(train_step, config=, optimizer=make_optimizer(lr, weight_decay=0.1, b1=0.9, b2=0.95,
  clip_norm=1.0)), donate_argnums=0)`, lower + compile timed apart; the cosine schedule spans 10^6 steps, so its
  lr equals the constant torch lr to 1e-11 relative over the bench.
- transformers: `Qwen2VLForConditionalGeneration` (sdpa, train mode, no dropout in Qwen2-VL) →
  `model(input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids, labels).loss.backward()`,
  `clip_grad_norm_(1.0)`, `torch.optim.AdamW(lr, betas=(0.9, 0.95), weight_decay=0.1)` (defaults otherwise: the
  per-tensor loop, as foreach defaults to off on CPU tensors), `zero_grad()`.

Steps of both sides alternate (one ours, one torch) so a load change hits both alike; `--warmup` steps each are
excluded, then `--repeats` steps each are timed; median step time, tokens/s (B·L / step), ratio = torch / ours.
Both models train on the same batch from the same init, so the loss of every step must agree (the first one proves
the same forward; the later ones the same backward + optimizer); the grad norm of step 1 is compared too.

Breakdown (`--no-breakdown` to skip), measured rather than guessed: ours forward-only (jitted loss, no grad), ours
forward + backward (jitted value_and_grad of the same loss) and the full step; transformers forward-only under
no_grad, and per phase of its timed training steps (forward with autograd, backward, clip, AdamW + zero_grad).
Also the what-if of computing the head only on the rows whose next token is labelled (here 260 of 516: the image
placeholders carry no label), which training/step.py does not do today. `--bf16`: also ours with bfloat16 compute over float32 master params (dtype bfloat16, param_dtype float32).

Threads: as bench/forward.py (NPROC=2 sizes XLA:CPU's intra-op pool, torch.set_num_threads(2)). Every timing
records cpu_use = process CPU s / wall s (≈ 2 when uncontended). Another process on the 2 cores inflates a time
(torch's OpenMP steps far more than XLA's: 5× vs 1.8× seen here), so a timed round counts only when every call in it
had cpu_use >= `--min-cpu-use` (1.7); up to `--max-extra-rounds` contended rounds per group are dropped and
counted in `contended_rounds_dropped`, after which rounds are kept whatever their cpu_use (look at cpu_use then).

    python bench/train.py [--repeats 5] [--warmup 2] [--batch 4] [--bf16] [--no-breakdown] [--skip-torch]
                          [--min-cpu-use 1.7] [--max-extra-rounds 4]

Writes bench/results/train.json (`--out`).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import forward as fw  # noqa: E402  (sets NPROC / OMP threads and torch.set_num_threads(2) before jax is imported)

import argparse  # noqa: E402
import functools  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from qwen2vl_jax import Qwen2VLConfig, TextConfig, VisionConfig, prepare_inputs  # noqa: E402
from training.step import IGNORE, init_state, loss_fn, make_optimizer, train_step  # noqa: E402

THREADS = fw.THREADS
GRID = (1, 16, 16)  # 224×224 → 256 patch rows → 64 LLM tokens
TEXT_BEFORE, TEXT_AFTER = 16, 48  # 64 text tokens per sample
LR, BETAS, WEIGHT_DECAY, CLIP = 1e-5, (0.9, 0.95), 0.1, 1.0
log = fw.log

CONFIG = Qwen2VLConfig(
    vision=VisionConfig(depth=4, embed_dim=256, num_heads=4, mlp_ratio=4.0, hidden_size=512),
    text=TextConfig(vocab_size=151936, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                    num_attention_heads=8, num_key_value_heads=2, mrope_section=(8, 12, 12),
                    tie_word_embeddings=True))


def loss_from_logits(logits, labels):
    """Mean next-token cross-entropy (training/step.py's `cross_entropy`, divided by the labelled count)."""
    from training.step import cross_entropy
    total, count = cross_entropy(logits, labels)
    return total / jnp.maximum(count, 1)


def make_batch(cfg, batch, rng):
    """→ numpy dict: input_ids, attention_mask, labels int64[B, L]; pixel_values float32[B·256, 1176]; grids."""
    text = lambda n: rng.integers(0, 151000, n).tolist()
    tokens = int(np.prod(GRID)) // cfg.vision.spatial_merge_size**2
    rows = []
    for _ in range(batch):
        before = [fw.IM_START] + text(TEXT_BEFORE - 4) + [fw.IM_END, fw.NEWLINE, fw.IM_START]
        after = text(TEXT_AFTER - 5) + [fw.IM_END, fw.NEWLINE, fw.IM_START] + text(2)
        rows.append(before + [cfg.vision_start_token_id] + [cfg.image_token_id] * tokens
                    + [cfg.vision_end_token_id] + after)
    ids = np.array(rows, np.int64)
    labels = np.where(ids == cfg.image_token_id, IGNORE, ids)
    pixels = rng.standard_normal((batch * int(np.prod(GRID)), cfg.vision.patch_dim)).astype(np.float32)
    return dict(input_ids=ids, attention_mask=np.ones_like(ids), labels=labels, pixel_values=pixels,
                image_grid_thw=np.array([GRID] * batch, np.int64))


def jax_batch(cfg, b):
    prepared = prepare_inputs(cfg, b["input_ids"], b["attention_mask"], b["image_grid_thw"],
                              image_rows=len(b["pixel_values"]))
    return {"input_ids": jnp.asarray(b["input_ids"], jnp.int32), "labels": jnp.asarray(b["labels"], jnp.int32),
            "prepared": {k: jnp.asarray(v) for k, v in prepared.items()},
            "vision_pixels": jnp.asarray(b["pixel_values"])}


def torch_kwargs(cfg, b):
    kw = {k: torch.from_numpy(b[k]) for k in ("input_ids", "attention_mask", "labels", "pixel_values",
                                               "image_grid_thw")}
    kw["mm_token_type_ids"] = torch.from_numpy((b["input_ids"] == cfg.image_token_id).astype(np.int64))
    kw["use_cache"] = False
    return kw


class Timer:
    """Collects (wall, process CPU) per call under a name."""

    def __init__(self):
        self.wall, self.cpu = {}, {}

    def run(self, name, fn):
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        self.wall.setdefault(name, []).append(time.perf_counter() - t0)
        self.cpu.setdefault(name, []).append(time.process_time() - c0)
        return out

    def entry(self, name, keep):
        """Timing dict over the calls at indices `keep` (the kept rounds)."""
        times, cpu = [self.wall[name][i] for i in keep], [self.cpu[name][i] for i in keep]
        return dict(median_s=statistics.median(times), min_s=min(times), times_s=[round(t, 4) for t in times],
                    cpu_use=round(sum(cpu) / sum(times), 2),
                    cpu_use_per_call=[round(c / t, 2) for c, t in zip(cpu, times)], loadavg_1m=os.getloadavg()[0])

    def rounds(self, fns, warmup, repeats, min_cpu_use, max_extra):
        """Calls every fn once per round (alternating, so a load change hits all alike): `warmup` rounds, then
        rounds until `repeats` of them had every call at cpu_use >= min_cpu_use (another process on the 2 cores
        lowers it), at most `max_extra` rounds more. → (indices of the kept rounds, rounds dropped as contended)."""
        keep, dropped, start = [], 0, len(self.wall.get(next(iter(fns)), []))
        for _ in range(warmup):
            for name, fn in fns.items():
                self.run(name, fn)
        i = start + warmup
        while len(keep) < repeats:
            for name, fn in fns.items():
                self.run(name, fn)
            quiet = all(self.cpu[n][i] / self.wall[n][i] >= min_cpu_use for n in fns)
            if quiet or dropped >= max_extra:
                keep.append(i)
            else:
                dropped += 1
                log(f"round dropped as contended: " + ", ".join(
                    f"{n} cpu use {self.cpu[n][i] / self.wall[n][i]:.2f}" for n in fns))
            i += 1
        return keep, dropped


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per side (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side first (after compiling)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--min-cpu-use", type=float, default=1.7,
                        help="a timed round counts only if every call in it used >= this many cores' CPU time")
    parser.add_argument("--max-extra-rounds", type=int, default=4,
                        help="contended rounds dropped at most, per measurement group (then kept anyway)")
    parser.add_argument("--bf16", action="store_true", help="also ours with bfloat16 compute, float32 params")
    parser.add_argument("--no-breakdown", action="store_true", help="skip forward-only / forward+backward timings")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "train.json"))
    args = parser.parse_args()
    cfg = CONFIG
    rng = np.random.default_rng(args.seed)
    b = make_batch(cfg, args.batch, rng)
    B, L = b["input_ids"].shape
    tokens = B * L

    results = dict(
        bench="train",
        model="small Qwen2-VL (vision depth 4, embed 256, 4 heads; text hidden 512, 4 layers, 8 heads / 2 kv, "
              "intermediate 1536, vocab 151936, tied LM head), random weights (unit-scale redraw)",
        config=cfg.to_hf_dict(),
        input=dict(batch=B, sequence_length=L, tokens_per_step=tokens, image="224x224 per sample",
                   grid_thw=list(GRID), vision_patch_rows=len(b["pixel_values"]),
                   llm_image_tokens_per_sample=int(np.prod(GRID)) // 4, text_tokens_per_sample=TEXT_BEFORE + TEXT_AFTER,
                   labelled_tokens=int((b["labels"][:, 1:] != IGNORE).sum())),
        optimizer=dict(kind="AdamW after global-norm clipping", lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY,
                       eps=1e-8, clip_norm=CLIP, ours="training.step.make_optimizer (cosine over 1e6 steps)",
                       torch="torch.optim.AdamW defaults (foreach off on CPU) + clip_grad_norm_"),
        settings=dict(threads=THREADS, torch_num_threads=torch.get_num_threads(), NPROC=os.environ["NPROC"],
                      XLA_FLAGS=os.environ.get("XLA_FLAGS", ""), torch_attn_implementation="sdpa",
                      repeats=args.repeats, warmup=args.warmup, dtype="float32",
                      min_cpu_use=args.min_cpu_use, max_extra_rounds=args.max_extra_rounds),
        versions=dict(jax=jax.__version__, jaxlib=__import__("jaxlib").__version__,
                      flax=__import__("flax").__version__, optax=__import__("optax").__version__,
                      torch=torch.__version__, transformers=transformers.__version__, numpy=np.__version__,
                      python=platform.python_version()),
        machine=dict(cpu=fw._cpu_name(), cpus=os.cpu_count(), isa=fw._isa(), ram_gb=round(fw._ram_gb(), 1),
                     platform=platform.platform(), jax_device=str(jax.devices()[0].device_kind),
                     loadavg_at_start=os.getloadavg(),
                     note=f"{os.cpu_count()}-core VM, possibly shared with other processes: compare timings only "
                          "where cpu_use is near the thread count (2.0)"),
        timings={}, compile_s={}, losses={})
    timings = results["timings"]

    def record(key, entry):
        timings[key] = entry
        log(f"{key:34s} median {entry['median_s']:7.3f} s  (calls {', '.join(f'{x:.3f}' for x in entry['times_s'])}; "
            f"cpu use {entry['cpu_use']}, load {entry['loadavg_1m']:.1f})")

    # ------------------------------------------------ weights: the transformers model, converted to ours
    log("building the transformers model (float32) and converting its weights")
    model = fw.build_torch(cfg, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    state_np = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    params = fw.to_jax_params(state_np, cfg)
    del state_np
    results["parameters"] = dict(total=n_params, torch_trainable=sum(p.numel() for p in model.parameters()
                                                                      if p.requires_grad),
                                 ours=sum(a.size for a in jax.tree_util.tree_leaves(params)))
    log(f"{n_params / 1e6:.1f} M parameters (ours {results['parameters']['ours'] / 1e6:.1f} M); "
        f"batch {B} x {L} tokens")
    if args.skip_torch:
        del model
        model = None

    # ------------------------------------------------ ours: compile
    batch = jax_batch(cfg, b)
    opt = make_optimizer(LR, warmup_steps=0, total_steps=10**6, weight_decay=WEIGHT_DECAY, b1=BETAS[0],
                         b2=BETAS[1], clip_norm=CLIP)

    def compile_step(config, params_):
        state = init_state(params_, opt)
        jitted = jax.jit(functools.partial(train_step, config=config, optimizer=opt), donate_argnums=0)
        t0 = time.perf_counter()
        exe = jitted.lower(state, batch).compile()
        return exe, state, time.perf_counter() - t0

    # copy: the step donates its state, and the breakdown below needs the initial params again
    step_exe, jstate, results["compile_s"]["ours/float32/train_step"] = compile_step(
        cfg, jax.tree_util.tree_map(jnp.copy, params))
    log(f"compiled our train step in {results['compile_s']['ours/float32/train_step']:.1f} s")

    # ------------------------------------------------ torch: model and optimizer
    if model is not None:
        model.train()
        kw = torch_kwargs(cfg, b)
        topt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY)
        results["optimizer"]["torch_foreach"] = topt.defaults.get("foreach")

    timer = Timer()
    ours_losses, torch_losses, ours_gn, torch_gn = [], [], [], []

    def ours_step():
        nonlocal jstate
        jstate, metrics = step_exe(jstate, batch)
        metrics = jax.device_get(metrics)  # blocks until the step is done
        ours_losses.append(float(metrics["loss"]))
        ours_gn.append(float(metrics["grad_norm"]))

    def torch_step():
        t0 = time.perf_counter()
        loss = model(**kw).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        t3 = time.perf_counter()
        topt.step()
        topt.zero_grad()
        t4 = time.perf_counter()
        torch_losses.append(float(loss.detach()))
        torch_gn.append(float(gn))
        for name, dt in (("forward", t1 - t0), ("backward", t2 - t1), ("clip", t3 - t2), ("adamw+zero_grad", t4 - t3)):
            timer.wall.setdefault(f"torch/float32/phase/{name}", []).append(dt)

    log(f"training steps: {args.warmup} warm-up + {args.repeats} timed per side, alternating")
    step_fns = {"ours/float32/train_step": ours_step}
    if model is not None:
        step_fns["torch/float32/train_step"] = torch_step
    keep, dropped = timer.rounds(step_fns, args.warmup, args.repeats, args.min_cpu_use, args.max_extra_rounds)
    results["contended_rounds_dropped"] = {"train_step": dropped}
    for key in step_fns:
        record(key, timer.entry(key, keep))
    results["settings"]["xla_pool_threads"] = fw.xla_pool_threads()
    if model is not None:
        results["torch_phases_median_s"] = {
            k.rsplit("/", 1)[1]: statistics.median(v[i] for i in keep) for k, v in timer.wall.items()
            if k.startswith("torch/float32/phase/")}
        log("torch phases (median s): " + ", ".join(f"{k} {v:.3f}" for k, v in
                                                    results["torch_phases_median_s"].items()))
    results["losses"] = dict(ours=ours_losses, torch=torch_losses, ours_grad_norm=ours_gn, torch_grad_norm=torch_gn)
    if torch_losses:
        rel = [abs(a - t) / abs(t) for a, t in zip(ours_losses, torch_losses)]
        results["loss_check"] = dict(
            first_step_ours=ours_losses[0], first_step_torch=torch_losses[0], first_step_rel_diff=rel[0],
            max_rel_diff_all_steps=max(rel), first_step_grad_norm_ours=ours_gn[0],
            first_step_grad_norm_torch=torch_gn[0], grad_norm_rel_diff=abs(ours_gn[0] - torch_gn[0]) / torch_gn[0])
        log(f"loss check: {results['loss_check']}")
    del jstate, step_exe

    # ------------------------------------------------ breakdown: forward only, forward + backward, LM head alone
    if not args.no_breakdown:
        fns = {}
        loss_only = jax.jit(lambda p, bt: loss_fn(p, bt, cfg)[0])
        grad_only = jax.jit(lambda p, bt: jax.value_and_grad(lambda q: loss_fn(q, bt, cfg)[0])(p))
        for key, fn in (("ours/float32/forward", loss_only), ("ours/float32/forward_backward", grad_only)):
            t0 = time.perf_counter()
            exe = fn.lower(params, batch).compile()
            results["compile_s"][key] = time.perf_counter() - t0
            fns[key] = lambda exe=exe: jax.block_until_ready(exe(params, batch))
        # The tied LM head + cross-entropy alone (forward + backward into hidden states and the embedding): the
        # [B·L, 512] x [512, 151936] products are most of the step's FLOPs.
        rng_h = np.random.default_rng(1)
        hidden = rng_h.standard_normal((B, L, cfg.text.hidden_size)).astype(np.float32)
        embed = np.asarray(params["language_model"]["embed_tokens"])
        labels = b["labels"]

        def head_loss(h, e, lab):
            logits = jnp.einsum("bld,vd->blv", h, e)
            return loss_from_logits(logits, lab)
        head_exe = jax.jit(jax.value_and_grad(head_loss, argnums=(0, 1))).lower(
            jnp.asarray(hidden), jnp.asarray(embed), jnp.asarray(labels, jnp.int32)).compile()
        head_args = (jnp.asarray(hidden), jnp.asarray(embed), jnp.asarray(labels, jnp.int32))
        fns["ours/float32/lm_head_fwd_bwd"] = lambda: jax.block_until_ready(head_exe(*head_args))
        # What-if: the head only on the rows whose next token is labelled (static count; half the rows here are
        # image placeholders, whose logits the loss ignores), gather + scatter included.
        rows = np.flatnonzero((labels[:, 1:] != IGNORE).reshape(-1))
        src = (rows // (L - 1)) * L + rows % (L - 1)  # row of h[:, :-1] in the flattened [B·L, D]
        targets = labels[:, 1:].reshape(-1)[rows]

        def head_loss_labelled(h, e, idx, tgt):
            hs = jnp.take(h.reshape(-1, h.shape[-1]), idx, axis=0)
            return optax.softmax_cross_entropy_with_integer_labels(hs @ e.T, tgt).mean()
        sel_args = (head_args[0], head_args[1], jnp.asarray(src, jnp.int32), jnp.asarray(targets, jnp.int32))
        sel_exe = jax.jit(jax.value_and_grad(head_loss_labelled, argnums=(0, 1))).lower(*sel_args).compile()
        fns["ours/float32/lm_head_labelled_rows_only"] = lambda: jax.block_until_ready(sel_exe(*sel_args))
        results["lm_head_labelled_rows"] = int(len(rows))
        full_loss = float(head_exe(*head_args)[0])
        sel_loss = float(sel_exe(*sel_args)[0])
        assert abs(full_loss - sel_loss) <= 1e-5 * abs(full_loss), (full_loss, sel_loss)
        if model is not None:
            def torch_forward():
                with torch.no_grad():
                    return float(model(**kw).loss)

            def torch_forward_backward():
                loss = model(**kw).loss
                loss.backward()
                model.zero_grad()
                return float(loss.detach())
            th = torch.from_numpy(hidden).requires_grad_()
            te = torch.from_numpy(embed.copy()).requires_grad_()
            tl = torch.from_numpy(labels)

            def torch_head():
                logits = torch.nn.functional.linear(th, te)
                loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                         tl[:, 1:].reshape(-1), ignore_index=IGNORE)
                loss.backward()
                th.grad = te.grad = None
                return float(loss.detach())
            fns["torch/float32/forward_no_grad"] = torch_forward
            fns["torch/float32/forward_backward"] = torch_forward_backward
            fns["torch/float32/lm_head_fwd_bwd"] = torch_head
        log("breakdown: " + ", ".join(fns) + " (alternating rounds)")
        keep, results["contended_rounds_dropped"]["breakdown"] = timer.rounds(
            fns, 1, args.repeats, args.min_cpu_use, args.max_extra_rounds)
        for key in fns:
            record(key, timer.entry(key, keep))
        results["lm_head_flop"] = 3 * 2 * B * L * cfg.text.hidden_size * cfg.text.vocab_size
        del fns, head_exe, sel_exe

    # ------------------------------------------------ optional: bf16 compute, float32 master params
    if args.bf16:
        cfg16 = cfg.replace(dtype="bfloat16", param_dtype="float32")
        exe16, state16, results["compile_s"]["ours/bf16_compute/train_step"] = compile_step(
            cfg16, jax.tree_util.tree_map(jnp.copy, params))
        losses16 = []

        def step16():
            nonlocal state16
            state16, m = exe16(state16, batch)
            losses16.append(float(jax.device_get(m["loss"])))
        keep, results["contended_rounds_dropped"]["bf16"] = timer.rounds(
            {"ours/bf16_compute/train_step": step16}, args.warmup, args.repeats, args.min_cpu_use,
            args.max_extra_rounds)
        record("ours/bf16_compute/train_step", timer.entry("ours/bf16_compute/train_step", keep))
        results["losses"]["ours_bf16_compute"] = losses16
        del exe16, state16

    summarize(results, tokens)
    fw.write_results(results, args.out, fw.T0, print_table)


PAIRS = (("train step (fwd+bwd+clip+AdamW)", "ours/float32/train_step", "torch/float32/train_step"),
         ("train step, ours bf16 compute", "ours/bf16_compute/train_step", "torch/float32/train_step"),
         ("forward + backward (no optimizer)", "ours/float32/forward_backward", "torch/float32/forward_backward"),
         ("forward only (loss, no grad)", "ours/float32/forward", "torch/float32/forward_no_grad"),
         ("LM head + CE alone, fwd+bwd", "ours/float32/lm_head_fwd_bwd", "torch/float32/lm_head_fwd_bwd"),
         ("  same, labelled rows only (what-if)", "ours/float32/lm_head_labelled_rows_only",
          "torch/float32/lm_head_fwd_bwd"))


def summarize(results, tokens):
    tm = {k: v["median_s"] for k, v in results["timings"].items()}
    cpu = {k: v["cpu_use"] for k, v in results["timings"].items()}
    rows = []
    for label, ours, ref in PAIRS:
        if ours in tm:
            rows.append(dict(measurement=label, ours_s=tm[ours], torch_s=tm.get(ref),
                             ours_tokens_per_s=tokens / tm[ours],
                             torch_tokens_per_s=tokens / tm[ref] if ref in tm else None,
                             ratio_torch_over_ours=tm[ref] / tm[ours] if ref in tm else None,
                             cpu_use_ours=cpu[ours], cpu_use_torch=cpu.get(ref)))
    results["table"] = rows
    if "torch/float32/train_step" in tm:
        results["ratio_torch_over_ours_train_step"] = tm["torch/float32/train_step"] / tm["ours/float32/train_step"]
    if "ours/float32/forward_backward" in tm:
        step, fb, f = tm["ours/float32/train_step"], tm["ours/float32/forward_backward"], tm["ours/float32/forward"]
        results["ours_phases_median_s"] = dict(forward=f, backward=fb - f, optimizer_and_rest=step - fb)
    if "ours/float32/lm_head_fwd_bwd" in tm:
        results["lm_head_gflop_per_s"] = {who: results["lm_head_flop"] / tm[f"{who}/float32/lm_head_fwd_bwd"] / 1e9
                                          for who in ("ours", "torch") if f"{who}/float32/lm_head_fwd_bwd" in tm}


def print_table(results):
    inp = results["input"]
    print(f"\nQwen2-VL small train step, batch {inp['batch']} x L {inp['sequence_length']} "
          f"({inp['tokens_per_step']} tokens, 224x224 image each), float32, CPU, {results['settings']['threads']} "
          f"threads; median of {results['settings']['repeats']}")
    fmt = lambda x, w, p=3: f"{x:{w}.{p}f}" if isinstance(x, (int, float)) else f"{'-':>{w}s}"
    print(f"{'measurement':36s} {'ours s':>7s} {'torch s':>7s} {'ratio':>6s} {'ours tok/s':>10s} "
          f"{'torch tok/s':>11s} {'cpu use o/t':>11s}")
    for r in results["table"]:
        print(f"{r['measurement']:36s} {fmt(r['ours_s'], 7)} {fmt(r['torch_s'], 7)} "
              f"{fmt(r['ratio_torch_over_ours'], 6, 2)} {fmt(r['ours_tokens_per_s'], 10, 0)} "
              f"{fmt(r['torch_tokens_per_s'], 11, 0)} {fmt(r['cpu_use_ours'], 5, 2)}/{fmt(r['cpu_use_torch'], 5, 2)}")
    print("ratio = torch / ours (> 1: ours faster)")
    if "ours_phases_median_s" in results:
        print("ours phases (s): " + ", ".join(f"{k} {v:.3f}" for k, v in results["ours_phases_median_s"].items()))
    if "torch_phases_median_s" in results:
        print("torch phases (s): " + ", ".join(f"{k} {v:.3f}" for k, v in results["torch_phases_median_s"].items()))
    if "lm_head_gflop_per_s" in results:
        print("LM head fwd+bwd GFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in results["lm_head_gflop_per_s"].items()))
    if "loss_check" in results:
        c = results["loss_check"]
        print(f"first-step loss ours {c['first_step_ours']:.6f} vs torch {c['first_step_torch']:.6f} "
              f"(rel {c['first_step_rel_diff']:.1e}; max over all steps {c['max_rel_diff_all_steps']:.1e}); "
              f"grad norm rel diff {c['grad_norm_rel_diff']:.1e}")
    print("compile s: " + ", ".join(f"{k} {v:.1f}" for k, v in results["compile_s"].items()))
    print(f"contended rounds dropped: {results.get('contended_rounds_dropped')}")
    print(f"xla pool threads {results['settings'].get('xla_pool_threads')}, torch threads "
          f"{results['settings']['torch_num_threads']}; peak RSS {results['peak_rss_gb']} GB; "
          f"total {results['total_runtime_s']} s")


if __name__ == "__main__":
    main()
