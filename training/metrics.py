"""Training metrics out: a console progress bar, WORKDIR/metrics.jsonl and TensorBoard event files.

Only process 0 writes. JSONL and TensorBoard are appended to across restarts (a resumed run re-logs the steps after
its checkpoint; readers keep the last record of a step). TensorBoard files are written with tensorboard's own
TF-free EventFileWriter (local paths; for gs:// workdirs point `tensorboard --logdir` at a synced copy)."""
from __future__ import annotations

import json
import time

import jax
from etils import epath
from tqdm import tqdm


class MetricsWriter:
    def __init__(self, workdir: str, total_steps: int, first_step: int = 0, tensorboard: bool = True):
        self.active = jax.process_index() == 0
        if not self.active:
            return
        self.path = epath.Path(workdir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.events = None
        if tensorboard and not str(workdir).startswith("gs://"):
            from tensorboard.summary.writer.event_file_writer import EventFileWriter
            self.events = EventFileWriter(str(epath.Path(workdir) / "tensorboard"))
        self.bar = tqdm(total=total_steps, initial=first_step, desc="train", unit="step", dynamic_ncols=True)

    def write(self, step: int, metrics: dict) -> None:
        """One record: {"step": step, **metrics} (floats or None)."""
        if not self.active:
            return
        record = {"step": step, "time": round(time.time(), 3)} | metrics
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.events is not None:
            from tensorboard.compat.proto import event_pb2, summary_pb2
            values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in metrics.items()
                      if isinstance(v, (int, float)) and v is not None]
            self.events.add_event(event_pb2.Event(wall_time=time.time(), step=step,
                                                  summary=summary_pb2.Summary(value=values)))
        shown = {k: metrics[k] for k in ("loss", "grad_norm", "lr", "tokens_per_s") if metrics.get(k) is not None}
        self.bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()}, refresh=False)

    def advance(self, steps: int = 1) -> None:
        if self.active:
            self.bar.update(steps)

    def close(self) -> None:
        if self.active:
            self.bar.close()
            if self.events is not None:
                self.events.close()


def read_metrics(workdir: str) -> dict[int, dict]:
    """metrics.jsonl → {step: the last record written for it}."""
    out = {}
    path = epath.Path(workdir) / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                out[record["step"]] = record
    return out
