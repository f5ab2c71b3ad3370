"""The perception tasks, one module each, behind one registry (`base.py` says what a task owns).

    from pr1_jax import tasks
    tasks.get("grounding").metrics(texts, examples)
    tasks.names()   # ['counting', 'detection', 'grounding', 'ocr', 'pointing']

Every module of this package is imported here and registers its task, so a new task is one new
module (built as `pointing.py` is) plus a config; nothing else changes.
"""

import importlib
import pkgutil

from pr1_jax.tasks.base import Task, get, names, register

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Task", "get", "names", "register"]
