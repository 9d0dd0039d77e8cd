"""``potstill store``: run a recipe's teacher once over its data and write the offline teacher store."""

from __future__ import annotations

from potstill.config import RecipeBase
from potstill.core.distributed import barrier, launched_world
from potstill.core.errors import UserError
from potstill.store.source import StoreSource
from potstill.tasks import make_task
from potstill.tasks.registry import task_class


def _silent(label: str, total: int):
    return lambda step, losses: None


def store_source(recipe: RecipeBase, on_step_factory=None) -> StoreSource:
    """Prepare ``recipe``'s task (data + teacher, as training would) and wrap it for the writer."""
    teacher = getattr(recipe, "teacher", None)
    if getattr(teacher, "store", None):
        raise UserError(f"teacher.store is set ({teacher.store}); `potstill store` needs the teacher itself: "
                        "drop teacher.store")
    task = make_task(task_class(recipe.task).store_recipe(recipe))
    # under torchrun rank 0 trains and keeps a teacher to train first; the others then load it
    if launched_world().is_main:
        task.prepare_teacher(on_step_factory or _silent)
    barrier()
    if not launched_world().is_main:
        task.prepare_teacher(_silent)
    return task.store_source()
