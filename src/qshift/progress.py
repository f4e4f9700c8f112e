"""One progress bar helper (rich), used by every long loop."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class _NullBar:
    def advance(self, n: int = 1) -> None:  # noqa: D401 - trivial
        pass


class _Bar:
    def __init__(self, progress: Progress, task: int) -> None:
        self._progress, self._task = progress, task

    def advance(self, n: int = 1) -> None:
        self._progress.advance(self._task, n)


@contextmanager
def progress_bar(description: str, total: int, enabled: bool = True) -> Iterator[_Bar | _NullBar]:
    """A rich progress bar on stderr; a no-op when disabled."""
    if not enabled:
        yield _NullBar()
        return
    from rich.console import Console

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(file=sys.stderr),
        transient=False,
    )
    with progress:
        yield _Bar(progress, progress.add_task(description, total=total))
