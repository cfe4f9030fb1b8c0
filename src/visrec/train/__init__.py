"""One Trainer for every task. Importing this package registers the built-in tasks."""

from visrec.train.task import TASKS, RunContext, Task  # noqa: F401

# One import line per task file: importing runs its @TASKS.register decorator.
from visrec.train import faces_task, landmarks_task, products_task, video_task  # noqa: F401,E402
from visrec.train import distill_task  # noqa: F401,E402
