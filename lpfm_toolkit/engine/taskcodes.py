"""Integer codes for tasks, shared by networks (embeddings), training and inference.

Pure Python on purpose: the registry and CLI read it without importing torch.
"""

from __future__ import annotations

from lpfm_toolkit.prompts import Task, TaskKind

#: code → short name; codes index the task embeddings of every network, so never renumber
TASK_NAMES: tuple[str, ...] = ("sr2", "sr4", "sr8", "deblur", "denoise", "restore", "virtual_stain", "stain_normalize")
NUM_TASKS = len(TASK_NAMES)


def task_code(task: Task) -> int:
    """The embedding index of ``task``."""
    if task.kind is TaskKind.SUPER_RESOLUTION:
        return TASK_NAMES.index(f"sr{task.scale}")
    return TASK_NAMES.index(task.kind.value)


def task_from_name(name: str) -> Task:
    """The :class:`Task` a code name stands for (``"sr4"`` → super-resolution ×4)."""
    if name.startswith("sr") and name[2:].isdigit():
        return Task(TaskKind.SUPER_RESOLUTION, scale=int(name[2:]))
    if name not in TASK_NAMES:
        raise ValueError(f"unknown task name {name!r}; known: {', '.join(TASK_NAMES)}")
    return Task(TaskKind(name))
