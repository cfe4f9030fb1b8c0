"""The training progress bar (Rich): steps, loss, images/s, elapsed time and ETA; shown by the main process only."""

from __future__ import annotations


class ProgressBar:
    """A Rich progress bar with loss, images/s and ETA; a no-op object when disabled."""

    def __new__(cls, enabled: bool, total: int, done: int):
        if not enabled:
            return None
        return super().__new__(cls)

    def __init__(self, enabled: bool, total: int, done: int):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self.progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} img/s"),
                                 TimeElapsedColumn(), TimeRemainingColumn(), transient=False)
        self.progress.start()
        self.task = self.progress.add_task("train", total=total, completed=done, loss="-", rate="-")

    def advance(self) -> None:
        self.progress.update(self.task, advance=1)

    def update(self, loss: float, images_per_s: float) -> None:
        self.progress.update(self.task, loss=f"{loss:.3f}", rate=f"{images_per_s:.0f}")

    def close(self) -> None:
        self.progress.stop()
