"""The pre-flight report: `qwen2vl-train --config … --workdir … --check` reads the whole train file and says whether
the run can work, before any device work beyond the memory planner.

    qwen2vl-train --config configs/qwen2vl_2b_v5e8.py --workdir /tmp/chk --config.data.train=jsonl:train.jsonl \\
        --config.chip=v5e --check

Every record goes through the training's own `ToExample` (a progress bar over the file) and the examples through
the training's own batcher (`data_pipeline.batching`, in file order, one stream per batch shard of the config's
mesh). The report (stdout, and as JSON in WORKDIR/check.json):

    records                  how many the source holds
    failed                   records that cannot become an example (bad JSON, missing media, bad messages): count,
                             count per reason, the first few with their file line
    dropped                  valid records that do not fit: vision patch rows over the largest per-shard vision rung,
                             nothing left to learn after truncation, too long with data.truncate=False
    truncated                examples cut to the largest length rung (the cut moves before a vision span it would
                             split: the span's image or video is left out whole, never cut inside)
    length / vision_rows     samples per rung of the length ladder / per-shard vision ladder (+ "over"), measured
                             before truncation; text_tokens / vision_tokens: min, median, p90, max per sample
    packing                  real / padded tokens (and vision rows) of the batches the batcher builds
    memory                   the compiled train step's per-chip peak for config.chip and the config's mesh, batch,
                             largest length and vision rungs (sharding.plan: XLA:TPU with libtpu, else XLA:CPU with
                             its warning), against the chip's HBM: fits / does not fit
    ok, problems, exit_code  0: fine; 1: records fail, samples are dropped or the step does not fit

A config that cannot work raises preflight.PreflightError (the command exits 2, as training does)."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os

import numpy as np

from data_pipeline.transforms import ToExample, _runs
from qwen2vl_jax.inputs import IGNORE
from training import preflight

FIRST = 5  # failures / drops / truncations quoted in full
TOO_LONG = "longer than the largest length rung (data.truncate=False)"
NOTHING_LEFT = "nothing left to learn after truncation to the largest length rung"
SPAN_LEFT_OUT = "a vision span over the largest length rung, left out whole, left nothing to learn"
TOO_MANY_PATCHES = "vision patch rows over the largest vision rung per batch shard"


def check_command(config, workdir: str) -> int:
    """The `--check` command: runs the check, prints the report, writes WORKDIR/check.json; → the exit code."""
    reserve_cpu_devices(config)
    report = run_check(config, os.fspath(workdir))
    print(format_report(report))
    return report["exit_code"]


def run_check(config, workdir: str, progress: bool = True) -> dict:
    """→ the report dict (module docstring); written to WORKDIR/check.json."""
    from etils import epath

    from data_pipeline.pipeline import batch_layout, check_token_ids, example_options, with_pixel_bounds
    from training.train import model_and_processor, vision_geometry

    mesh = target_mesh(config)
    preflight.check_config(config, mesh["batch_shards"], *vision_geometry(config))
    preflight.check_workdir(workdir)
    model_config, processor = model_and_processor(config, workdir)
    try:
        check_token_ids(processor, model_config)
        layout = batch_layout(model_config, config.data, mesh["batch_shards"])
    except ValueError as error:
        raise preflight.PreflightError(str(error)) from None
    source = open_train_source(config, workdir)
    processor = with_pixel_bounds(processor, config.data.min_pixels, config.data.max_pixels,
                                  config.data.get("video_total_pixels"))
    transform = ObservedExample(processor, **example_options(model_config, config.data, layout))
    tally = Tally(source, transform, model_config.vision.spatial_merge_size ** 2)
    packing = pack(source, tally, layout, progress)
    report = {"config": {"data.train": config.data.train, "mesh": mesh, "batch_size": config.data.batch_size,
                         "length_buckets": list(layout.lengths), "vision_buckets_per_shard":
                         list(layout.shard_vision_rows), "pack": layout.pack, "truncate": config.data.truncate},
              **tally.summary(layout), "packing": packing, "memory": plan_memory(config, model_config, mesh)}
    report["problems"] = problems(report)
    report["ok"] = not report["problems"]
    report["exit_code"] = 0 if report["ok"] else 1
    (epath.Path(workdir) / "check.json").write_text(json.dumps(report, indent=2, default=_plain))
    return report


def reserve_cpu_devices(config) -> None:
    """Before JAX starts its backend: as many fake CPU devices as an explicit mesh has, for an XLA:CPU plan when
    XLA:TPU cannot plan it (no libtpu, or no TPU slice of that size)."""
    from sharding.mesh import parse_axes

    try:
        sizes = list(parse_axes(config.mesh).values()) + list(parse_axes(config.get("dcn_mesh") or None).values())
    except ValueError:
        return  # target_mesh says what is wrong
    flags = os.environ.get("XLA_FLAGS", "")
    if config.get("chip") and -1 not in sizes and "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={math.prod(sizes or [1])}"


def target_mesh(config) -> dict:
    """The mesh the run would use → {"ici", "dcn": axis sizes, "devices", "per_slice", "batch_shards", "resolved"}.
    Explicit sizes need no devices here; a -1 axis takes this machine's devices, as training does."""
    from sharding.mesh import AXES, parse_axes, resolve_axes

    try:
        ici, dcn = parse_axes(config.mesh), parse_axes(config.get("dcn_mesh") or None)
        slices = math.prod(dcn.values() or [1])
        if -1 in ici.values():
            import jax
            per_slice, resolved = jax.device_count() // slices, "this machine's devices"
        else:
            per_slice, resolved = math.prod(ici.values() or [1]), "as written"
        ici = resolve_axes(ici, per_slice)
    except ValueError as error:
        raise preflight.PreflightError(f"mesh={config.mesh!r} dcn_mesh={config.get('dcn_mesh')!r}: {error}") from None
    dcn = {name: dcn.get(name, 1) for name in AXES}
    shards = ici["data"] * ici["fsdp"] * dcn["data"] * dcn["fsdp"]
    return {"ici": ici, "dcn": dcn, "devices": per_slice * slices, "per_slice": per_slice, "batch_shards": shards,
            "resolved": resolved}


def open_train_source(config, workdir: str):
    """config.data.train opened as training opens it; PreflightError naming the spec when it cannot be."""
    from data_pipeline.sources import open_source
    from training.train import data_folder

    try:
        source = open_source(config.data.train, data_dir=data_folder(config, workdir))
    except (OSError, ValueError) as error:
        raise preflight.PreflightError(f"data.train={config.data.train!r} cannot be opened: {error}") from None
    if len(source) == 0:
        raise preflight.PreflightError(f"data.train={config.data.train!r} holds no records")
    return source


class ObservedExample(ToExample):
    """ToExample that also notes, per record, what its truncation saw: `seen` = None when the record failed before
    (unreadable, missing media, bad messages), else {"tokens", "vision_tokens", "images", "videos"} of the whole
    sample and {"kept", "kept_images", "kept_videos", "learnable"} after the cut."""

    seen: dict | None = None

    def map(self, record: dict) -> dict:
        self.seen = None
        return super().map(record)

    def _truncate(self, ids, labels):
        vision = np.isin(ids, [self.ids["image"], self.ids["video"]])
        self.seen = {"tokens": len(ids), "vision_tokens": int(vision.sum()), "images": _runs(ids, self.ids["image"]),
                     "videos": _runs(ids, self.ids["video"])}
        kept_ids, kept_labels, images, videos = super()._truncate(ids, labels)
        self.seen |= {"kept": len(kept_ids), "kept_images": images, "kept_videos": videos,
                      "learnable": bool((kept_labels != IGNORE).any())}
        return kept_ids, kept_labels, images, videos


@dataclasses.dataclass
class Tally:
    """Each record's outcome, in the order the records are read: `add(index, record)` → the example (or error
    dict) for the batcher."""
    source: object
    transform: ObservedExample
    merge: int  # patch rows per vision token (spatial_merge_size²)
    failed: list = dataclasses.field(default_factory=list)  # (where, reason, error)
    dropped: list = dataclasses.field(default_factory=list)  # (where, reason, error)
    truncated: list = dataclasses.field(default_factory=list)  # (where, tokens before, after, vision items cut)
    sizes: list = dataclasses.field(default_factory=list)  # (tokens, vision tokens) of each tokenized sample

    def add(self, index: int, record: dict) -> dict:
        example = self.transform.map(record)
        seen, where = self.transform.seen, self.where(index)
        if seen is not None:
            self.sizes.append((seen["tokens"], seen["vision_tokens"]))
        error = example.get("error")
        if error is not None:
            error = error.removeprefix(f"{where}: ")
            if seen is None:
                reason = "unreadable record" if "error" in record else error.split(":", 1)[0]
                self.failed.append((where, reason, error))
            else:
                self.dropped.append((where, self._drop_reason(seen), error))
        elif seen["kept"] < seen["tokens"]:
            cut = seen["images"] - seen["kept_images"] + seen["videos"] - seen["kept_videos"]
            self.truncated.append((where, seen["tokens"], seen["kept"], cut))
        return example

    def where(self, index: int) -> str:
        """The record's place for a person: "FILE line N" for JSONL, else "SOURCE record I"."""
        from data_pipeline.pipeline import source_name

        if hasattr(self.source, "line"):
            return f"{self.source.path} line {self.source.line(index)}"
        return f"{source_name(self.source)} record {index}"

    def _drop_reason(self, seen: dict) -> str:
        if not self.transform.truncate and seen["tokens"] > self.transform.max_length:
            return TOO_LONG
        if seen.get("learnable", True):
            return TOO_MANY_PATCHES
        cut = seen["images"] - seen["kept_images"] + seen["videos"] - seen["kept_videos"]
        return SPAN_LEFT_OUT if cut else NOTHING_LEFT

    def summary(self, layout) -> dict:
        """→ the report's records / failed / dropped / truncated / length / vision_rows / token stats."""
        tokens = np.array([t for t, _ in self.sizes], np.int64)
        vision = np.array([v for _, v in self.sizes], np.int64)
        return {"records": len(self.source),
                "examples": len(self.source) - len(self.failed) - len(self.dropped),
                "failed": _outcomes(self.failed), "dropped": _outcomes(self.dropped),
                "truncated": {"count": len(self.truncated),
                              "vision_items_left_out": sum(cut for *_, cut in self.truncated),
                              "first": [{"where": w, "tokens": t, "kept": k, "vision_items_left_out": c}
                                        for w, t, k, c in self.truncated[:FIRST]]},
                "length": histogram(tokens, layout.lengths),
                "vision_rows": histogram(vision[vision > 0] * self.merge, layout.shard_vision_rows)
                | {"text_only": int((vision == 0).sum())},
                "text_tokens": spread(tokens - vision), "vision_tokens": spread(vision)}


def _outcomes(items: list) -> dict:
    """[(where, reason, error)] → {"count", "by_reason": {reason: n}, "first": [{where, reason, error}]}."""
    by_reason: dict[str, int] = {}
    for _, reason, _ in items:
        by_reason[reason] = by_reason.get(reason, 0) + 1
    return {"count": len(items), "by_reason": by_reason,
            "first": [{"where": w, "reason": r, "error": e} for w, r, e in items[:FIRST]]}


def histogram(values: np.ndarray, ladder) -> dict:
    """values int[N] → {"rungs": ladder, "samples": per rung the samples it is the smallest to hold, "over": those
    no rung holds}."""
    at = np.searchsorted(np.asarray(ladder), values, side="left")
    counts = np.bincount(at, minlength=len(ladder) + 1)
    return {"rungs": list(ladder), "samples": [int(c) for c in counts[:-1]], "over": int(counts[-1])}


def spread(values: np.ndarray) -> dict:
    """values int[N] → {"min", "median", "p90", "max"} (all 0 when empty)."""
    if not len(values):
        return dict.fromkeys(("min", "median", "p90", "max"), 0)
    return {"min": int(values.min()), "median": float(np.median(values)), "p90": float(np.percentile(values, 90)),
            "max": int(values.max())}


class _ShardRecords:
    """One batch shard's records (s, s + S, … in file order) through `tally`: what pipeline.ShardRecords gives the
    batcher (open, per_pass, name), so data_pipeline.batching packs them as training would. The records repeat (as
    data.num_epochs=None repeats them) so the last batches are full; only the first pass is tallied, and a pass
    without one usable example ends the stream."""

    def __init__(self, indices: range, source, tally: Tally, bar):
        self.indices, self.source, self.tally, self.bar = indices, source, tally, bar
        self.per_pass = len(indices) + 1  # never "a whole pass failed": the report counts failures itself
        self.name = "check"
        self.live, self.done = None, False  # done: the first pass is read
        self.empty = False  # its first pass held no usable record (training stops with NoUsableRecords)

    def open(self, position: int):
        self.live = self._examples(position)
        return self.live

    def _examples(self, position: int):
        while True:
            usable = False
            for index in self.indices[position:]:
                if self.done:
                    example = self.tally.transform.map(self.source[index])
                else:
                    example = self.tally.add(index, self.source[index])
                    self.bar.update()
                usable |= "error" not in example
                yield example
            self.empty |= not self.done and not usable
            self.done, position = True, 0
            if not usable:
                return

    def drain(self) -> None:
        """Reads the rest of the first pass when the batcher stopped early (a shard with no usable record)."""
        live = self.live if self.live is not None else self.open(0)
        while not self.done and next(live, None) is not None:
            pass


def pack(source, tally: Tally, layout, progress: bool = True) -> dict:
    """Every record through `tally` and the examples through the training's batcher until each batch shard has read
    its records once → {"batches", "efficiency" (real / padded tokens), "vision_efficiency" (real / padded vision
    rows), "shapes": distinct (L, V) batch shapes, the token and row totals}."""
    from tqdm import tqdm

    from data_pipeline.batching import BatchIterator

    totals = dict.fromkeys(("real_tokens", "padded_tokens", "real_vision_rows", "padded_vision_rows"), 0)
    batches, shapes = 0, set()
    quiet = logging.getLogger("data_pipeline.batching")
    level, quiet.level = quiet.level, logging.ERROR  # the report lists the skipped samples itself
    try:
        with tqdm(total=len(source), desc="checking records", unit="rec", disable=not progress) as bar:
            shards = [_ShardRecords(range(s, len(source), layout.shards), source, tally, bar)
                      for s in range(layout.shards)]
            for batch in BatchIterator(shards, layout, tuple(range(layout.shards))):
                batches += 1
                shapes.add((batch["input_ids"].shape[1], batch["vision_pixels"].shape[1]
                            if "vision_pixels" in batch else 0))
                for key in totals:
                    totals[key] += int(batch["stats"][key])
                if all(shard.done for shard in shards):
                    break
            for shard in shards:
                shard.drain()
    finally:
        quiet.level = level
    return {"batches": batches, "efficiency": totals["real_tokens"] / max(totals["padded_tokens"], 1),
            "vision_efficiency": totals["real_vision_rows"] / max(totals["padded_vision_rows"], 1),
            "shapes": sorted(shapes), "empty_shards": [s for s, shard in enumerate(shards) if shard.empty],
            **totals}


def plan_memory(config, model_config, mesh: dict) -> dict:
    """The train step compiled (sharding.plan) for config.chip on the config's mesh with the batch's largest shapes
    → {"planned", "compiler", "peak_per_device", "hbm", "fits", "verdict", ...}; {"planned": False, "why"} when no
    chip is set or the plan cannot be made here."""
    from sharding.plan import HBM, plan
    from sharding.topology import choose_compiler, cpu_warning

    chip = config.get("chip", "")
    if not chip:
        return {"planned": False, "why": f"no chip named: set --config.chip ({', '.join(sorted(HBM))}) for the "
                                         "per-chip memory of the compiled step"}
    if chip not in HBM:
        raise preflight.PreflightError(f"chip={chip!r} is not a TPU this planner knows; use one of "
                                       f"{', '.join(sorted(HBM))} (or '' for no memory plan)")
    compiler = choose_compiler(chip, None, "auto", mesh["per_slice"])
    data = config.data
    shape = {"batch": data.batch_size, "seq": max(data.length_buckets),
             "patches_per_sample": -(-max(data.vision_buckets) // data.batch_size)}
    fractions = tuple(data.get("loss_fractions", ()))
    head_fraction = int(1 / max(fractions)) if fractions else 0  # the largest rung: the head on most positions
    out = {"planned": False, "chip": chip, "hbm": HBM[chip], "compiler": compiler.label,
           "compiler_reason": compiler.reason, **shape}
    if compiler.name == "XLA:CPU":
        out["warning"] = cpu_warning(compiler.reason)
        import jax
        if jax.device_count() != mesh["devices"]:
            return out | {"why": f"XLA:CPU plans on this process's devices, {jax.device_count()} here but the mesh "
                                 f"has {mesh['devices']}; install libtpu (pip install -e '.[tpu-plan]') for an "
                                 "XLA:TPU plan, or run --check in a fresh process (it sets the fake CPU devices)"}
    spec = ",".join(f"{k}={v}" for k, v in mesh["ici"].items() if v > 1) or "fsdp=1"
    try:
        result = plan(config.model.get("preset", "custom"), spec, remat=model_config.remat,
                      dtype=model_config.dtype, param_dtype=model_config.param_dtype,
                      dcn=config.get("dcn_mesh") or None, attention=model_config.attention, config=model_config,
                      head_fraction=head_fraction, chip=chip, topology=compiler.topology, **shape)
    except Exception as error:  # anything but XLA:TPU's refusal over HBM (plan reports that): say why
        return out | {"why": f"the planner failed: {type(error).__name__}: {str(error)[:400]}"}
    if result.get("refused"):
        peak = result["peak_per_device"]
        return out | {"planned": True, "peak_per_device": peak, "fits": False,
                      "verdict": f"does not fit: {compiler.name} refused to compile it, {peak / 1e9:.2f} GB needed "
                                 f"per chip > {HBM[chip] / 1e9:.0f} GB HBM of {chip}"}
    peak, fits = result["peak_per_device"], result["peak_per_device"] <= HBM[chip]
    return out | {"planned": True, "peak_per_device": peak, "fits": fits, "mesh": result["mesh"],
                  "params_per_device": result["params_per_device"],
                  "opt_state_per_device": result["opt_state_per_device"],
                  "verdict": f"{'fits' if fits else 'does not fit'}: peak {peak / 1e9:.2f} GB per chip of "
                             f"{HBM[chip] / 1e9:.0f} GB HBM on {chip} ({100 * peak / HBM[chip]:.0f} %)"}


def problems(report: dict) -> list[str]:
    """What makes the check fail (exit 1), one line each, with what to do."""
    out = []
    if report["failed"]["count"]:
        out.append(f"{report['failed']['count']} records fail: fix them (file and line above) or remove them")
    if report["dropped"]["count"]:
        out.append(f"{report['dropped']['count']} samples are dropped: raise the ladders' top rungs "
                   "(data.length_buckets, data.vision_buckets), lower data.max_pixels, or shorten them")
    empty = report["packing"]["empty_shards"]
    if empty:
        out.append(f"batch shards {empty} of {report['config']['mesh']['batch_shards']} (each reads every "
                   f"{report['config']['mesh']['batch_shards']}th record) have no usable record: training would stop "
                   "(NoUsableRecords); fix the records or use fewer batch shards")
    if report["memory"].get("fits") is False:
        out.append(f"the step does not fit on {report['memory']['chip']}: lower data.batch_size or the top rungs, "
                   "shard more (config.mesh), or use a chip with more HBM")
    return out


def format_report(report: dict) -> str:
    """The report as text for a person."""
    c, lines = report["config"], []
    lines.append(f"records: {report['records']} in {c['data.train']}; {report['examples']} become examples")
    for name, title in (("failed", "fail"), ("dropped", "are dropped")):
        part = report[name]
        lines.append(f"{part['count']} {title}" + "".join(f"; {n} {r}" for r, n in part["by_reason"].items()))
        lines += [f"  {e['where']}: {e['error']}" for e in part["first"]]
    t = report["truncated"]
    lines.append(f"{t['count']} truncated to {max(c['length_buckets'])} tokens ({t['vision_items_left_out']} "
                 "images/videos left out whole at the cut, never cut inside)")
    lines += [f"  {e['where']}: {e['tokens']} → {e['kept']} tokens" for e in t["first"]]
    for key, title in (("length", "tokens per sample (before truncation) by length rung"),
                       ("vision_rows", "vision patch rows per sample by per-shard vision rung")):
        h = report[key]
        cells = "  ".join(f"≤{r}: {n}" for r, n in zip(h["rungs"], h["samples"]))
        lines.append(f"{title}: {cells}  over: {h['over']}" + (f"  text-only: {h['text_only']}"
                                                               if "text_only" in h else ""))
    for key in ("text_tokens", "vision_tokens"):
        s = report[key]
        lines.append(f"{key.replace('_', ' ')} per sample: min {s['min']}, median {s['median']:g}, "
                     f"p90 {s['p90']:g}, max {s['max']}")
    p = report["packing"]
    lines.append(f"packing ({'packed' if c['pack'] else 'one example per row'}, {c['mesh']['batch_shards']} batch "
                 f"shards, file order, repeated until each shard read its records): {p['batches']} batches, "
                 f"{100 * p['efficiency']:.1f} % of padded tokens real, {100 * p['vision_efficiency']:.1f} % of "
                 "vision rows")
    m = report["memory"]
    if "compiler" in m:
        lines.append(f"memory plan: {m['compiler']} ({m['compiler_reason']}), batch {m['batch']} × {m['seq']} "
                     f"tokens + {m['patches_per_sample']} patches per sample, mesh {c['mesh']['ici']}")
        if m.get("warning"):
            lines.append(f"  !!! {m['warning']}")
    lines.append(f"memory: {m['verdict'] if m['planned'] else 'not planned: ' + m['why']}")
    lines.append("check passed" if report["ok"] else "check FAILED:\n  " + "\n  ".join(report["problems"]))
    return "\n".join(lines)


def _plain(value):
    """JSON for numpy scalars and tuples in the report."""
    return value.item() if hasattr(value, "item") else str(value)
