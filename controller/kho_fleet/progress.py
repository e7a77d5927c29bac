"""Live rollout progress in the terminal (rich): one bar per stage, one line per host."""

from __future__ import annotations

import threading
from typing import Optional

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from .statedb import HAPPY_PATH

_STEPS = {s: i for i, s in enumerate(HAPPY_PATH)}
_DONE = ("reported", "failed", "skipped")


class RolloutProgress:
    """Feeds a rich Progress from the engine's (host, state, detail) notifications."""

    def __init__(self, stages: list[tuple[str, list[str]]],
                 console: Optional[Console] = None) -> None:
        self.console = console or Console(stderr=True)
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                 TextColumn("{task.fields[state]}"), TimeElapsedColumn(),
                                 console=self.console, transient=False)
        self._lock = threading.Lock()
        self.stage_of: dict[str, TaskID] = {}
        self.host_task: dict[str, TaskID] = {}
        for name, hosts in stages:
            st = self.progress.add_task(f"[bold]{name}[/]", total=len(hosts) or 1, state="")
            for h in hosts:
                self.stage_of[h] = st
                self.host_task[h] = self.progress.add_task(f"  {h}", total=len(HAPPY_PATH) - 1,
                                                           state="pending")

    def __call__(self, host: str, state: str, detail: str = "") -> None:
        with self._lock:
            t = self.host_task.get(host)
            if t is None:
                return
            colour = {"reported": "green", "failed": "red"}.get(state, "cyan")
            text = f"[{colour}]{state}[/]" + (f" {detail[:60]}" if detail else "")
            done = state in _DONE
            self.progress.update(t, completed=len(HAPPY_PATH) - 1 if done else _STEPS.get(state, 0),
                                 state=text)
            if done:
                self.progress.advance(self.stage_of[host])

    def __enter__(self) -> RolloutProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()
