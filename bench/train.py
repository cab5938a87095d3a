"""Train-step throughput on the CPU: our jitted `training.step.train_step` vs a transformers + torch.optim step.

Same small Qwen2-VL config (real 151936-token vocabulary, tied LM head), same random weights (redrawn at unit
activation scale as tests/reference.py / bench/forward.py, converted with `params_from_torch`), same batch,
float32, 2 threads each:

- tokens: 4 samples, each one 224×224 image (grid (1, 16, 16): 256 patch rows → 64 LLM tokens) inside a ChatML-like
  prompt with 64 text tokens (L = 130 with <vision_start>/<vision_end>). Two label scenarios on these same tokens
  (Hugging Face convention: -100 = no loss, the shift happens inside both losses):
  - `all_text`: labels = input_ids except the image placeholders (260 of the 520 positions predict a target);
  - `answer_only` (instruction tuning): labels only on the last 16 text tokens of each sample, the "assistant
    answer" (64 of 520).
- ours: `jax.jit(partial(train_step, config=, optimizer=make_optimizer(lr, weight_decay=0.1, b1=0.9, b2=0.95,
  clip_norm=1.0)), donate_argnums=0)`, lower + compile timed apart; the cosine schedule spans 10^6 steps, so its
  lr equals the constant torch lr to 1e-11 relative over the bench. The headline "ours" batch carries
  `loss_index` / `loss_targets` from `data_pipeline.batching.loss_positions` (as `qwen2vl-train`'s pipeline adds
  them), so the LM head runs on K = f·B·L rows only (f the smallest of (0.125, 0.5, 1) holding every target);
  "ours, full head" is the same step on the batch without them (the head on all B·L rows).
- transformers: `Qwen2VLForConditionalGeneration` (sdpa, train mode, no dropout in Qwen2-VL) →
  `model(input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids, labels).loss.backward()`,
  `clip_grad_norm_(1.0)`, `torch.optim.AdamW(lr, betas=(0.9, 0.95), weight_decay=0.1)` (defaults otherwise: the
  per-tensor loop, as foreach defaults to off on CPU tensors), `zero_grad()`.

Per scenario, the three steps (ours, ours full head, torch) alternate, each from the same initial weights and a fresh
optimizer, so a load change hits all alike; `--warmup` steps each are excluded, then `--repeats` steps each are
timed; median step time, tokens/s (B·L / step), ratio = torch / ours. All three train on the same batch from the
same init, so the loss of every step must agree (the first one proves the same forward; the later ones the same
backward + optimizer): ours with vs without the selection to ~1e-6, ours vs torch likewise; the grad norm of step 1
is compared too.

Breakdown on `all_text` (`--no-breakdown` to skip), measured rather than guessed: ours forward-only (jitted loss, no
grad) and forward + backward (jitted value_and_grad of the same loss), each with and without the selection;
transformers forward-only under no_grad and forward + backward; per phase of torch's timed training steps (forward
with autograd, backward, clip, AdamW + zero_grad); and the tied LM head + cross-entropy alone (fwd + bwd into random
hidden states and the embedding): all B·L rows, ours and torch, and ours via `training.step.selected_cross_entropy`
on the selected rows of each scenario. `--bf16`: also ours (selection on) with bfloat16 compute over float32 master
params (dtype bfloat16, param_dtype float32).

Threads: as bench/forward.py (NPROC=2 sizes XLA:CPU's intra-op pool, torch.set_num_threads(2)). Every timing
records cpu_use = process CPU s / wall s (≈ 2 when uncontended). Another process on the 2 cores inflates a time
(torch's OpenMP steps far more than XLA's: 5× vs 1.8× seen here), so a timed round counts only when every call in it
had cpu_use >= `--min-cpu-use` (1.7); up to `--max-extra-rounds` contended rounds per group are dropped and
counted in `contended_rounds_dropped`, after which rounds are kept whatever their cpu_use (look at cpu_use then).

    python bench/train.py [--repeats 5] [--warmup 2] [--batch 4] [--answer-tokens 16] [--bf16] [--no-breakdown]
                          [--skip-torch] [--min-cpu-use 1.7] [--max-extra-rounds 4]

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
import torch  # noqa: E402
import transformers  # noqa: E402

from data_pipeline.batching import BatchLayout, loss_positions  # noqa: E402
from qwen2vl_jax import Qwen2VLConfig, TextConfig, VisionConfig, prepare_inputs  # noqa: E402
from training.step import (IGNORE, cross_entropy, init_state, loss_fn, make_optimizer,  # noqa: E402
                           selected_cross_entropy, train_step)

THREADS = fw.THREADS
GRID = (1, 16, 16)  # 224×224 → 256 patch rows → 64 LLM tokens
TEXT_BEFORE, TEXT_AFTER = 16, 48  # 64 text tokens per sample
LR, BETAS, WEIGHT_DECAY, CLIP = 1e-5, (0.9, 0.95), 0.1, 1.0
FRACTIONS = BatchLayout.loss_fractions  # what the training pipeline uses: (0.125, 0.5, 1.0)
SCENARIOS = ("all_text", "answer_only")
log = fw.log

CONFIG = Qwen2VLConfig(
    vision=VisionConfig(depth=4, embed_dim=256, num_heads=4, mlp_ratio=4.0, hidden_size=512),
    text=TextConfig(vocab_size=151936, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                    num_attention_heads=8, num_key_value_heads=2, mrope_section=(8, 12, 12),
                    tie_word_embeddings=True))


def make_batch(cfg, batch, rng):
    """→ numpy dict: input_ids, attention_mask, labels int64[B, L]; pixel_values float32[B·256, 1176]; grids.
    labels: the `all_text` scenario (every token but the image placeholders)."""
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


def answer_only(cfg, b, n):
    """The same batch with labels only on the last `n` text tokens of each sample (the "assistant answer")."""
    labels = np.full_like(b["labels"], IGNORE)
    is_text = (b["input_ids"] != cfg.image_token_id) & (b["attention_mask"] > 0)
    for r in range(len(labels)):
        cols = np.flatnonzero(is_text[r])[-n:]
        labels[r, cols] = b["input_ids"][r, cols]
    return dict(b, labels=labels)


def jax_batch(cfg, b, select):
    """→ the batch dict train_step / loss_fn take; select: add loss_index / loss_targets (the LM head on the
    labelled rows only), as data_pipeline.batching does."""
    prepared = prepare_inputs(cfg, b["input_ids"], b["attention_mask"], b["image_grid_thw"],
                              image_rows=len(b["pixel_values"]))
    out = {"input_ids": jnp.asarray(b["input_ids"], jnp.int32), "labels": jnp.asarray(b["labels"], jnp.int32),
           "prepared": {k: jnp.asarray(v) for k, v in prepared.items()},
           "vision_pixels": jnp.asarray(b["pixel_values"])}
    if select:
        out.update({k: jnp.asarray(v) for k, v in loss_positions(b["labels"], b["attention_mask"], FRACTIONS).items()})
    return out


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


def rel(a, b):
    return abs(a - b) / abs(b)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per side (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side first (after compiling)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--answer-tokens", type=int, default=16,
                        help="answer_only scenario: labelled text tokens at the end of each sample")
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
    b_all = make_batch(cfg, args.batch, rng)
    nb = {"all_text": b_all, "answer_only": answer_only(cfg, b_all, args.answer_tokens)}
    B, L = b_all["input_ids"].shape
    tokens = B * L

    scen_info = {}
    for name, b in nb.items():
        pos = loss_positions(b["labels"], b["attention_mask"], FRACTIONS)
        targets = int((pos["loss_targets"] != IGNORE).sum())
        assert targets == int((b["labels"][:, 1:] != IGNORE).sum())
        scen_info[name] = dict(
            labels=("input_ids except the image placeholders" if name == "all_text" else
                    f"the last {args.answer_tokens} text tokens of each sample only (assistant answer)"),
            targets=targets, labelled_fraction=targets / tokens, head_rows_selected=pos["loss_index"].size,
            head_fraction_selected=pos["loss_index"].size / tokens, head_rows_full=tokens)
    results = dict(
        bench="train",
        model="small Qwen2-VL (vision depth 4, embed 256, 4 heads; text hidden 512, 4 layers, 8 heads / 2 kv, "
              "intermediate 1536, vocab 151936, tied LM head), random weights (unit-scale redraw)",
        config=cfg.to_hf_dict(),
        input=dict(batch=B, sequence_length=L, tokens_per_step=tokens, image="224x224 per sample",
                   grid_thw=list(GRID), vision_patch_rows=len(b_all["pixel_values"]),
                   llm_image_tokens_per_sample=int(np.prod(GRID)) // 4, text_tokens_per_sample=TEXT_BEFORE + TEXT_AFTER,
                   loss_fractions=list(FRACTIONS),
                   note="labelled_fraction = positions whose next token is a target / (B·L); the selected head runs "
                        "on head_rows_selected = f·B·L rows (training.step.selected_cross_entropy)"),
        scenarios=scen_info,
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
        timings={}, compile_s={}, losses={}, loss_check={}, contended_rounds_dropped={})
    timings = results["timings"]
    for name, info in scen_info.items():
        log(f"scenario {name}: {info['targets']} targets of {tokens} positions ({info['labelled_fraction']:.3f}); "
            f"selected head rows {info['head_rows_selected']}")

    def record(key, entry):
        timings[key] = entry
        log(f"{key:44s} median {entry['median_s']:7.3f} s  (calls {', '.join(f'{x:.3f}' for x in entry['times_s'])}; "
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
    else:
        model.train()
        torch_init = {k: v.detach().clone() for k, v in model.state_dict().items()}

    opt = make_optimizer(LR, warmup_steps=0, total_steps=10**6, weight_decay=WEIGHT_DECAY, b1=BETAS[0],
                         b2=BETAS[1], clip_norm=CLIP)
    executables = {}

    def compile_step(config, batch, key):
        """Jitted train step for `batch`'s shapes (cached by key) and a fresh state from the initial params."""
        state = init_state(jax.tree_util.tree_map(jnp.copy, params), opt)  # the step donates its state
        if key not in executables:
            jitted = jax.jit(functools.partial(train_step, config=config, optimizer=opt), donate_argnums=0)
            t0 = time.perf_counter()
            executables[key] = jitted.lower(state, batch).compile()
            results["compile_s"][key] = time.perf_counter() - t0
            log(f"compiled {key} in {results['compile_s'][key]:.1f} s")
        return executables[key], state

    timer = Timer()
    jbatches = {}
    for name in SCENARIOS:
        b = nb[name]
        jsel, jfull = jax_batch(cfg, b, select=True), jax_batch(cfg, b, select=False)
        jbatches[name] = (jsel, jfull)
        K = scen_info[name]["head_rows_selected"]
        # the full-head batch has the same shapes in both scenarios, so its executable is shared
        exes = {"ours": compile_step(cfg, jsel, f"ours/train_step/head_rows_{K}"),
                "ours_full_head": compile_step(cfg, jfull, "ours/train_step/full_head")}
        batches = {"ours": jsel, "ours_full_head": jfull}
        states = {k: v[1] for k, v in exes.items()}
        losses = {k: [] for k in ("ours", "ours_full_head", "torch")}
        gnorm = {k: [] for k in losses}

        def ours_step(who, exe):
            states[who], metrics = exe(states[who], batches[who])
            metrics = jax.device_get(metrics)  # blocks until the step is done
            losses[who].append(float(metrics["loss"]))
            gnorm[who].append(float(metrics["grad_norm"]))

        step_fns = {f"{name}/ours/train_step": functools.partial(ours_step, "ours", exes["ours"][0]),
                    f"{name}/ours_full_head/train_step": functools.partial(ours_step, "ours_full_head",
                                                                           exes["ours_full_head"][0])}
        if model is not None:
            model.load_state_dict(torch_init)
            model.zero_grad(set_to_none=True)
            kw = torch_kwargs(cfg, b)
            topt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY)
            results["optimizer"]["torch_foreach"] = topt.defaults.get("foreach")

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
                losses["torch"].append(float(loss.detach()))
                gnorm["torch"].append(float(gn))
                for ph, dt in (("forward", t1 - t0), ("backward", t2 - t1), ("clip", t3 - t2),
                               ("adamw+zero_grad", t4 - t3)):
                    timer.wall.setdefault(f"{name}/torch/phase/{ph}", []).append(dt)
            step_fns[f"{name}/torch/train_step"] = torch_step

        log(f"[{name}] training steps: {args.warmup} warm-up + {args.repeats} timed per side, alternating "
            f"({', '.join(step_fns)})")
        keep, results["contended_rounds_dropped"][f"{name}/train_step"] = timer.rounds(
            step_fns, args.warmup, args.repeats, args.min_cpu_use, args.max_extra_rounds)
        for key in step_fns:
            record(key, timer.entry(key, keep))
        if model is not None:
            results.setdefault("torch_phases_median_s", {})[name] = {
                k.rsplit("/", 1)[1]: statistics.median(v[i] for i in keep) for k, v in timer.wall.items()
                if k.startswith(f"{name}/torch/phase/")}
            log(f"[{name}] torch phases (median s): " + ", ".join(
                f"{k} {v:.3f}" for k, v in results["torch_phases_median_s"][name].items()))
        results["losses"][name] = dict(loss={k: v for k, v in losses.items() if v},
                                       grad_norm={k: v for k, v in gnorm.items() if v})
        o, f, t = losses["ours"], losses["ours_full_head"], losses["torch"]
        check = dict(first_step_ours=o[0], first_step_ours_full_head=f[0],
                     selected_vs_full_head_first_step_rel=rel(o[0], f[0]),
                     selected_vs_full_head_max_rel_all_steps=max(rel(a, c) for a, c in zip(o, f)),
                     grad_norm_first_step_ours=gnorm["ours"][0],
                     grad_norm_first_step_ours_full_head=gnorm["ours_full_head"][0],
                     grad_norm_selected_vs_full_head_rel=rel(gnorm["ours"][0], gnorm["ours_full_head"][0]))
        if t:
            check.update(first_step_torch=t[0], ours_vs_torch_first_step_rel=rel(o[0], t[0]),
                         ours_vs_torch_max_rel_all_steps=max(rel(a, c) for a, c in zip(o, t)),
                         grad_norm_first_step_torch=gnorm["torch"][0],
                         grad_norm_ours_vs_torch_rel=rel(gnorm["ours"][0], gnorm["torch"][0]))
        results["loss_check"][name] = check
        log(f"[{name}] loss ours (selected head) {o[0]:.7f} vs ours full head {f[0]:.7f} (rel "
            f"{check['selected_vs_full_head_first_step_rel']:.1e}; max over steps "
            f"{check['selected_vs_full_head_max_rel_all_steps']:.1e})"
            + (f" vs torch {t[0]:.7f} (rel {check['ours_vs_torch_first_step_rel']:.1e}; max over steps "
               f"{check['ours_vs_torch_max_rel_all_steps']:.1e}); grad norm ours {gnorm['ours'][0]:.4f}, full "
               f"head {gnorm['ours_full_head'][0]:.4f}, torch {gnorm['torch'][0]:.4f}" if t else ""))
        del states, exes
    executables.clear()
    results["settings"]["xla_pool_threads"] = fw.xla_pool_threads()

    # ------------------------------------------------ breakdown (all_text): forward, forward + backward, LM head
    if not args.no_breakdown:
        fns = {}
        jsel, jfull = jbatches["all_text"]
        loss_only = jax.jit(lambda p, bt: loss_fn(p, bt, cfg)[0])
        grad_only = jax.jit(lambda p, bt: jax.value_and_grad(lambda q: loss_fn(q, bt, cfg)[0])(p))
        for key, fn, bt in (("all_text/ours/forward", loss_only, jsel),
                            ("all_text/ours_full_head/forward", loss_only, jfull),
                            ("all_text/ours/forward_backward", grad_only, jsel),
                            ("all_text/ours_full_head/forward_backward", grad_only, jfull)):
            t0 = time.perf_counter()
            exe = fn.lower(params, bt).compile()
            results["compile_s"][key] = time.perf_counter() - t0
            fns[key] = lambda exe=exe, bt=bt: jax.block_until_ready(exe(params, bt))
        # The tied LM head + cross-entropy alone (forward + backward into hidden states and the embedding): on all
        # B·L rows the [B·L, 512] x [512, 151936] products are most of the step's FLOPs.
        rng_h = np.random.default_rng(1)
        hidden = jnp.asarray(rng_h.standard_normal((B, L, cfg.text.hidden_size)).astype(np.float32))
        embed_np = np.asarray(params["language_model"]["embed_tokens"])
        embed = jnp.asarray(embed_np)
        labels = b_all["labels"]

        def head_full(h, e, lab):
            total, count = cross_entropy(jnp.einsum("bld,vd->blv", h, e), lab)
            return total / jnp.maximum(count, 1)

        def head_selected(h, e, idx, tgt):
            total, count = selected_cross_entropy(h, lambda x: x @ e.T, idx, tgt)
            return total / jnp.maximum(count, 1)
        full_args = (hidden, embed, jnp.asarray(labels, jnp.int32))
        full_exe = jax.jit(jax.value_and_grad(head_full, argnums=(0, 1))).lower(*full_args).compile()
        fns["all_text/ours_full_head/lm_head_fwd_bwd"] = lambda: jax.block_until_ready(full_exe(*full_args))
        head_losses = {"full_head": float(full_exe(*full_args)[0])}
        sel_exes = {}
        for name in SCENARIOS:
            pos = loss_positions(nb[name]["labels"], nb[name]["attention_mask"], FRACTIONS)
            sargs = (hidden, embed, jnp.asarray(pos["loss_index"]), jnp.asarray(pos["loss_targets"]))
            sel_exes[name] = jax.jit(jax.value_and_grad(head_selected, argnums=(0, 1))).lower(*sargs).compile()
            fns[f"{name}/ours/lm_head_fwd_bwd"] = lambda exe=sel_exes[name], a=sargs: jax.block_until_ready(exe(*a))
            head_losses[f"{name}/selected"] = float(sel_exes[name](*sargs)[0])
        head_losses["answer_only/full_head"] = float(full_exe(hidden, embed, jnp.asarray(nb["answer_only"]["labels"],
                                                                                          jnp.int32))[0])
        results["lm_head_alone_losses"] = head_losses
        assert rel(head_losses["all_text/selected"], head_losses["full_head"]) < 1e-5, head_losses
        assert rel(head_losses["answer_only/selected"], head_losses["answer_only/full_head"]) < 1e-5, head_losses
        if model is not None:
            kw = torch_kwargs(cfg, b_all)

            def torch_forward():
                with torch.no_grad():
                    return float(model(**kw).loss)

            def torch_forward_backward():
                loss = model(**kw).loss
                loss.backward()
                model.zero_grad()
                return float(loss.detach())
            th = torch.from_numpy(np.array(hidden)).requires_grad_()
            te = torch.from_numpy(embed_np.copy()).requires_grad_()
            tl = torch.from_numpy(labels)

            def torch_head():
                logits = torch.nn.functional.linear(th, te)
                loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                         tl[:, 1:].reshape(-1), ignore_index=IGNORE)
                loss.backward()
                th.grad = te.grad = None
                return float(loss.detach())
            fns["all_text/torch/forward_no_grad"] = torch_forward
            fns["all_text/torch/forward_backward"] = torch_forward_backward
            fns["all_text/torch/lm_head_fwd_bwd"] = torch_head
        log("breakdown: " + ", ".join(fns) + " (alternating rounds)")
        keep, results["contended_rounds_dropped"]["breakdown"] = timer.rounds(
            fns, 1, args.repeats, args.min_cpu_use, args.max_extra_rounds)
        for key in fns:
            record(key, timer.entry(key, keep))
        results["lm_head_flop"] = {
            "full_head": 3 * 2 * B * L * cfg.text.hidden_size * cfg.text.vocab_size,
            **{f"{n}/selected": 3 * 2 * scen_info[n]["head_rows_selected"] * cfg.text.hidden_size
               * cfg.text.vocab_size for n in SCENARIOS}}
        del fns, full_exe, sel_exes

    # ------------------------------------------------ optional: bf16 compute, float32 master params
    if args.bf16:
        cfg16 = cfg.replace(dtype="bfloat16", param_dtype="float32")
        jsel = jbatches["all_text"][0]
        state16 = init_state(jax.tree_util.tree_map(jnp.copy, params), opt)
        t0 = time.perf_counter()
        exe16 = jax.jit(functools.partial(train_step, config=cfg16, optimizer=opt), donate_argnums=0).lower(
            state16, jsel).compile()
        results["compile_s"]["ours_bf16_compute/train_step"] = time.perf_counter() - t0
        losses16 = []

        def step16():
            nonlocal state16
            state16, m = exe16(state16, jsel)
            losses16.append(float(jax.device_get(m["loss"])))
        keep, results["contended_rounds_dropped"]["all_text/bf16"] = timer.rounds(
            {"all_text/ours_bf16_compute/train_step": step16}, args.warmup, args.repeats, args.min_cpu_use,
            args.max_extra_rounds)
        record("all_text/ours_bf16_compute/train_step", timer.entry("all_text/ours_bf16_compute/train_step", keep))
        results["losses"]["all_text"]["loss"]["ours_bf16_compute"] = losses16
        del exe16, state16

    summarize(results, tokens)
    fw.write_results(results, args.out, fw.T0, print_table)


def summarize(results, tokens):
    tm = {k: v["median_s"] for k, v in results["timings"].items()}
    cpu = {k: v["cpu_use"] for k, v in results["timings"].items()}
    rows = []
    for name in SCENARIOS:
        info = results["scenarios"][name]
        o, f, t = (tm.get(f"{name}/{who}/train_step") for who in ("ours", "ours_full_head", "torch"))
        rows.append(dict(
            scenario=name, labelled_fraction=info["labelled_fraction"], targets=info["targets"],
            head_rows_selected=info["head_rows_selected"], ours_s=o, ours_full_head_s=f, torch_s=t,
            ratio_torch_over_ours=t / o if t else None, ratio_torch_over_ours_full_head=t / f if t else None,
            selection_speedup=f / o, ours_tokens_per_s=tokens / o, torch_tokens_per_s=tokens / t if t else None,
            cpu_use=dict(ours=cpu[f"{name}/ours/train_step"], ours_full_head=cpu[f"{name}/ours_full_head/train_step"],
                         torch=cpu.get(f"{name}/torch/train_step"))))
    results["table"] = rows
    if "all_text/torch/train_step" in tm:
        results["ratio_torch_over_ours_train_step"] = {r["scenario"]: r["ratio_torch_over_ours"] for r in rows}
    if "all_text/ours/forward_backward" in tm:
        bd = {}
        for who in ("ours", "ours_full_head"):
            step, fb, fwd = (tm[f"all_text/{who}/{k}"] for k in ("train_step", "forward_backward", "forward"))
            bd[who] = dict(forward=fwd, backward=fb - fwd, optimizer_and_rest=step - fb,
                           lm_head_fwd_bwd=tm[f"all_text/{who}/lm_head_fwd_bwd"],
                           lm_head_share_of_fwd_bwd=tm[f"all_text/{who}/lm_head_fwd_bwd"] / fb)
        if "all_text/torch/forward_backward" in tm:
            fb = tm["all_text/torch/forward_backward"]
            bd["torch"] = dict(forward_no_grad=tm["all_text/torch/forward_no_grad"], forward_backward=fb,
                               lm_head_fwd_bwd=tm["all_text/torch/lm_head_fwd_bwd"],
                               lm_head_share_of_fwd_bwd=tm["all_text/torch/lm_head_fwd_bwd"] / fb)
        results["breakdown_all_text_s"] = bd
        flop = results["lm_head_flop"]
        results["lm_head_gflop_per_s"] = {
            "ours_full_head": flop["full_head"] / tm["all_text/ours_full_head/lm_head_fwd_bwd"] / 1e9,
            **{f"ours_selected/{n}": flop[f"{n}/selected"] / tm[f"{n}/ours/lm_head_fwd_bwd"] / 1e9
               for n in SCENARIOS},
            **({"torch": flop["full_head"] / tm["all_text/torch/lm_head_fwd_bwd"] / 1e9}
               if "all_text/torch/lm_head_fwd_bwd" in tm else {})}


def print_table(results):
    inp = results["input"]
    print(f"\nQwen2-VL small train step, batch {inp['batch']} x L {inp['sequence_length']} "
          f"({inp['tokens_per_step']} tokens, 224x224 image each), float32, CPU, {results['settings']['threads']} "
          f"threads; median of {results['settings']['repeats']}")
    fmt = lambda x, w, p=3: f"{x:{w}.{p}f}" if isinstance(x, (int, float)) else f"{'-':>{w}s}"
    print(f"{'scenario':12s} {'labelled':>8s} {'head rows':>9s} {'ours s':>7s} {'full-head s':>11s} {'torch s':>7s} "
          f"{'torch/ours':>10s} {'torch/full':>10s} {'full/ours':>9s} {'cpu use o/f/t':>15s}")
    for r in results["table"]:
        c = r["cpu_use"]
        print(f"{r['scenario']:12s} {fmt(r['labelled_fraction'], 8)} {r['head_rows_selected']:9d} "
              f"{fmt(r['ours_s'], 7)} {fmt(r['ours_full_head_s'], 11)} {fmt(r['torch_s'], 7)} "
              f"{fmt(r['ratio_torch_over_ours'], 10, 2)} {fmt(r['ratio_torch_over_ours_full_head'], 10, 2)} "
              f"{fmt(r['selection_speedup'], 9, 2)} {fmt(c['ours'], 4, 2)}/{fmt(c['ours_full_head'], 4, 2)}/"
              f"{fmt(c['torch'], 4, 2)}")
    print("ratio = torch / ours (> 1: ours faster); labelled = positions with a target / (B·L)")
    if "breakdown_all_text_s" in results:
        print("breakdown (all_text, s): " + "; ".join(
            f"{who}: " + ", ".join(f"{k} {v:.3f}" for k, v in d.items())
            for who, d in results["breakdown_all_text_s"].items()))
        print("LM head fwd+bwd GFLOP/s: " + ", ".join(f"{k} {v:.0f}"
                                                     for k, v in results["lm_head_gflop_per_s"].items()))
    if "torch_phases_median_s" in results:
        for name, ph in results["torch_phases_median_s"].items():
            print(f"torch phases {name} (s): " + ", ".join(f"{k} {v:.3f}" for k, v in ph.items()))
    for name, c in results["loss_check"].items():
        print(f"{name}: first-step loss ours {c['first_step_ours']:.7f}, full head "
              f"{c['first_step_ours_full_head']:.7f} (rel {c['selected_vs_full_head_first_step_rel']:.1e}, max "
              f"{c['selected_vs_full_head_max_rel_all_steps']:.1e})"
              + (f", torch {c['first_step_torch']:.7f} (rel {c['ours_vs_torch_first_step_rel']:.1e}, max "
                 f"{c['ours_vs_torch_max_rel_all_steps']:.1e}; grad norm rel {c['grad_norm_ours_vs_torch_rel']:.1e})"
                 if "first_step_torch" in c else ""))
    print("compile s: " + ", ".join(f"{k} {v:.1f}" for k, v in results["compile_s"].items()))
    print(f"contended rounds dropped: {results.get('contended_rounds_dropped')}")
    print(f"xla pool threads {results['settings'].get('xla_pool_threads')}, torch threads "
          f"{results['settings']['torch_num_threads']}; peak RSS {results['peak_rss_gb']} GB; "
          f"total {results['total_runtime_s']} s")


if __name__ == "__main__":
    main()
