"""Tasks as plug-ins (:mod:`potstill.tasks.registry`). Importing this package registers the built-in
tasks, so every recipe can name them; a plug-in registers its own with :func:`register_task`."""

from potstill.tasks import chain, classification, condense_config, lm, lm_xtok  # noqa: F401  (registers the built-in tasks)
from potstill.tasks.registry import TASKS, Task, TaskBase, load_recipe, make_task, register_task, validate_recipe

__all__ = ["TASKS", "Task", "TaskBase", "load_recipe", "make_task", "register_task", "validate_recipe"]
