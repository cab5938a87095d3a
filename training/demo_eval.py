"""The demo's held-out evaluation: accuracy per question type beside the text-only baseline, as JSON and a figure.

An answer counts as right when greedy decoding would produce it exactly: every answer token and the closing
<|im_end|> is the argmax given the tokens before it (teacher forcing gives the same verdict as generating, without a
decode loop). The text-only baseline answers each question with its most frequent answer in the training split —
the best any model that ignores the image can do on this data."""
from __future__ import annotations

import collections
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from data_pipeline.pipeline import training_batches
from data_pipeline.sources import open_source, question_text
from qwen2vl_jax.model import Qwen2VL
from training.metrics import read_metrics
from training.step import IGNORE


def question_of(record: dict) -> str:
    """The first user turn's text."""
    return question_text(record["messages"][:1])


def text_only_baseline(train_source) -> dict[str, str]:
    """question text → its most frequent answer in the training records."""
    answers = collections.defaultdict(collections.Counter)
    for i in range(len(train_source)):
        record = train_source[i]
        answers[question_of(record)][record["answer"]] += 1
    return {q: c.most_common(1)[0][0] for q, c in answers.items()}


def answer_correct(config, params, batch) -> np.ndarray:
    """bool[B]: every labelled token of the row is the argmax of the logits before it."""
    logits = Qwen2VL(config).apply({"params": params}, batch["input_ids"], batch["prepared"],
                                   batch.get("vision_pixels"), method=Qwen2VL.forward)
    targets = batch["labels"][:, 1:]
    hit = (jnp.argmax(logits[:, :-1], -1) == targets) | (targets == IGNORE)
    return hit.all(-1) & (targets != IGNORE).any(-1)


def evaluate_demo(config, workdir: str, model_config, processor, state) -> dict:
    from training.train import HOST_KEYS, data_folder

    data_dir = data_folder(config, workdir)
    test, train = (open_source(s, data_dir=data_dir) for s in (config.data.eval, config.data.train))
    records = {r["id"]: r for r in (test[i] for i in range(len(test)))}
    data = config.data.copy_and_resolve_references()
    with data.unlocked():
        data.update(pack=False, shuffle=False, num_epochs=1)
    correct_fn = jax.jit(answer_correct, static_argnums=0)
    right = collections.defaultdict(list)
    for batch in training_batches(test, processor, model_config, data, seed=0):
        device_batch = {k: v for k, v in batch.items() if k not in HOST_KEYS}
        for ids, ok in zip(batch["example_ids"], np.asarray(correct_fn(model_config, state.params, device_batch))):
            if ids:
                right[records[ids[0]]["question_type"]].append(bool(ok))
    majority = text_only_baseline(train)
    baseline = collections.defaultdict(list)
    for record in records.values():
        baseline[record["question_type"]].append(majority.get(question_of(record)) == record["answer"])
    mean = lambda xs: float(np.mean(xs)) if xs else 0.0
    result = {"accuracy": {t: mean(v) for t, v in sorted(right.items())},
              "baseline": {t: mean(v) for t, v in sorted(baseline.items())},
              "overall": mean([x for v in right.values() for x in v]),
              "baseline_overall": mean([x for v in baseline.values() for x in v]),
              "examples": {t: len(v) for t, v in sorted(right.items())}}
    with open(os.path.join(workdir, "demo_eval.json"), "w") as f:
        json.dump(result, f, indent=2)
    draw(result, read_metrics(workdir), os.path.join(workdir, "demo.png"))
    return result


def draw(result: dict, metrics: dict[int, dict], path: str) -> None:
    """The loss curve and per-type accuracy beside the baseline → a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    steps = sorted(metrics)
    left.plot(steps, [metrics[s]["loss"] for s in steps])
    left.set(title="training loss", xlabel="step", ylabel="cross-entropy (answer tokens)", yscale="log")
    types = list(result["accuracy"])
    x = np.arange(len(types) + 1)
    model = [result["accuracy"][t] for t in types] + [result["overall"]]
    base = [result["baseline"][t] for t in types] + [result["baseline_overall"]]
    right.bar(x - 0.2, model, 0.4, label="model (image + text)")
    right.bar(x + 0.2, base, 0.4, label="text-only baseline")
    right.set_xticks(x, types + ["overall"])
    right.set(title="held-out accuracy", ylim=(0, 1))
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
