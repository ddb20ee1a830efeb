"""Progress bars for the demo's stages: one tqdm bar per stage on stderr, with rate and ETA.

Bars are drawn only when enabled and the stream is a terminal (tqdm's own test), so logs, pipes and tests stay
clean; `run_demo(quiet=True)` disables them.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator, TextIO


class Progress:
    """`with progress.stage("pretraining", total, "step") as tick: ... tick(n)` draws one bar per stage.

    enabled: False draws nothing; True draws on `file` (default stderr) when it is a terminal."""

    def __init__(self, enabled: bool = True, file: TextIO | None = None):
        self.enabled, self.file = enabled, file

    @contextlib.contextmanager
    def stage(self, desc: str, total: int, unit: str = "it") -> Iterator[Callable[[int], None]]:
        """A bar of `total` `unit`s for the duration of the block; yields tick(n), which advances it by n."""
        from tqdm import tqdm

        # disable=None: tqdm draws only on a TTY; True: never
        bar = tqdm(total=total, desc=desc, unit=unit, file=self.file or sys.stderr, leave=True,
                   disable=None if self.enabled else True, dynamic_ncols=True, mininterval=0.5)
        try:
            yield bar.update
        finally:
            bar.close()


SILENT = Progress(enabled=False)
