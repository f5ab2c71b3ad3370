"""The perception tasks, one module each, behind one registry (`base.py` says what a task owns).

    from pr1_jax import tasks
    tasks.get("grounding").metrics(texts, examples)
    tasks.names()   # ['counting', 'detection', 'grounding', 'ocr']

A new task is one new module here (built as these are, imported below) plus a config.
"""

from pr1_jax.tasks import counting, detection, grounding, ocr  # noqa: F401  (each registers its task)
from pr1_jax.tasks.base import Task, get, names, register

__all__ = ["Task", "get", "names", "register"]
