"""Tasks: what a kind of data means for models, the teacher cache and evaluation.

`TASKS` maps `DataSplits.task` to its `Task`; the run and the engine ask the task and never
compare a task name. Adding a task: one file here, one line in `TASKS`, its data source in
`kdistill.data` and a recipe.
"""

from kdistill.errors import ConfigError
from kdistill.tasks.base import Evaluated, Evaluation, Rows, Task
from kdistill.tasks.causal_lm import CausalLM
from kdistill.tasks.classification import Classification
from kdistill.tasks.embedding import Embedding
from kdistill.tasks.seq2seq import Seq2Seq
from kdistill.types import DataSplits

TASKS: dict[str, Task] = {
    task.name: task for task in (Classification(), CausalLM(), Seq2Seq(), Embedding())
}


def task_of(splits: DataSplits) -> Task:
    """The task of this data (`splits.task`)."""
    if splits.task not in TASKS:
        raise ConfigError("data", f"unknown task {splits.task!r} of data '{splits.name}'; "
                                  f"expected one of: {', '.join(TASKS)}")
    return TASKS[splits.task]


__all__ = ["TASKS", "Evaluated", "Evaluation", "Rows", "Task", "task_of"]
