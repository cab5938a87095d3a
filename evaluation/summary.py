"""The evaluation summary, printed and written: one task's table (`print_table`), and for a multi-task run one row
per task in DIR/summary.md (markdown, then the settings behind the numbers: those all tasks share, then each task's
own) and DIR/summary.json (the summaries as a list, each with its "settings").

    | task | metric | value | samples | scored | errors | samples/s | compiles |
"""
from __future__ import annotations

import json
import os

from evaluation.settings import settings_markdown

MODEL_PROGRAMS = ("prefill", "decode")  # generation's programs; anything else compiled is counted as "other"
COLUMNS = ("task", "metric", "value", "samples", "scored", "errors", "samples/s", "compiles")


def compiles_text(counts: dict) -> str:
    text = ", ".join(f"{k} {counts.get(k, 0)}" for k in MODEL_PROGRAMS)
    return text + f", other {sum(v for k, v in counts.items() if k not in MODEL_PROGRAMS)}"


def row(summary: dict) -> dict:
    """The table's cells for one task's summary."""
    rate, value = summary.get("samples_per_s"), summary.get("value")
    return {"task": summary["task"], "metric": summary["metric"], "value": "—" if value is None else f"{value:.4f}",
            "samples": f"{summary['samples']} of {summary['of']}", "scored": summary["scored"],
            "errors": summary["errors"], "samples/s": "—" if rate is None else f"{rate:.2f}",
            "compiles": compiles_text(summary.get("compiles", {}))}


def print_table(summary: dict) -> None:
    for name, value in row(summary).items():
        print(f"{name:10s} {value}")


def markdown(summaries: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(row(s)[c]) for c in COLUMNS) + " |" for s in summaries]
    return "\n".join(lines) + "\n" + settings_markdown(summaries)


def write_tables(folder: str, summaries: list[dict], write) -> None:
    """summary.md and summary.json in `folder`, each written whole through `write(path, text)`."""
    write(os.path.join(folder, "summary.md"), markdown(summaries))
    write(os.path.join(folder, "summary.json"), json.dumps(summaries, indent=2))
