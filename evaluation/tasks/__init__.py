"""Benchmark tasks by name: `get_task("docvqa")` → the Task (see base.py for the contract).

    docvqa infovqa chartqa textvqa vqav2 vqa exact    short answers (short_answer.py)
    ocrbench                                          OCR (ocrbench.py)
    mmmu mmbench realworldqa                          image multiple choice (choice.py)
    mathvista                                         multiple choice / free form (mathvista.py)
    refcoco refcoco+ refcocog                         grounding (refcoco.py)
    mvbench videomme                                  video multiple choice (video.py)
"""
from __future__ import annotations

from evaluation.tasks import choice, mathvista, ocrbench, refcoco, short_answer, video
from evaluation.tasks.base import Task, complete_turns  # noqa: F401

TASKS: dict[str, Task] = {task.name: task for module in (short_answer, ocrbench, choice, mathvista, refcoco, video)
                          for task in module.TASKS}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}: choose one of {', '.join(sorted(TASKS))}") from None
