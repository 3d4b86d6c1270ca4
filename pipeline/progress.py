"""Progress display for long work (rich on a terminal; silent when disabled).

A task may carry a ``unit`` ("560/560 tiles, 12.5 tiles/s") and a ``detail`` ("chunks 3/40") as fields.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

__all__ = ["progress_bar", "console"]

console = Console(stderr=True)

_LOG_WIDTH = 120
"""Columns of the display when stderr is no terminal (a log file): wide enough for every column."""


class _Silent:
    def add_task(self, *args, **kwargs) -> int:
        return 0

    def advance(self, *args, **kwargs) -> None:
        pass

    def update(self, *args, **kwargs) -> None:
        pass


class _CountColumn(ProgressColumn):
    """"560/1200 tiles 12.5 tiles/s": the count, and the rate over rich's recent samples once there is one."""

    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit", "")
        total = "?" if task.total is None else f"{task.total:.0f}"
        text = f"{task.completed:.0f}/{total}" + (f" {unit}" if unit else "")
        speed = task.finished_speed or task.speed
        if unit and speed is not None:
            text += f" {speed:.3g} {unit}/s"
        return Text(text, style="progress.download")


class _DetailColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(str(task.fields.get("detail", "")), style="progress.description")


@contextmanager
def progress_bar(enabled: bool = True) -> Iterator[Progress | _Silent]:
    """A progress display on stderr, or a silent stand-in when ``enabled`` is False."""
    if not enabled:
        yield _Silent()
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(bar_width=24),
        _CountColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        _DetailColumn(),
    )
    shown = console if console.is_terminal else Console(stderr=True, width=_LOG_WIDTH)
    with Progress(*columns, console=shown, transient=False) as progress:
        yield progress
