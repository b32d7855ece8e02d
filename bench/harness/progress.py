"""Live progress of a grid: one tqdm bar of finished cells (ETA from tqdm's rate), with done / failed / running, and
the running cells' log lines above it as they arrive."""

from __future__ import annotations

import sys


class GridProgress:
    def __init__(self, total: int, desc: str, enabled: bool = True):
        from tqdm.auto import tqdm

        self.done = self.failed = self.running = 0
        tty = sys.stderr.isatty()
        # in a CI log (no terminal) print a line every 30 s instead of redrawing twice a second
        self.bar = tqdm(total=total, desc=desc, unit="cell", disable=not enabled, file=sys.stderr,
                        dynamic_ncols=True, mininterval=0.5 if tty else 30.0)
        self._refresh()

    def _refresh(self):
        self.bar.set_postfix_str(f"done={self.done} failed={self.failed} running={self.running}", refresh=False)
        self.bar.update(0)  # redraws at most every mininterval

    def tick(self):
        """Keep the elapsed time and ETA moving while cells run."""
        self.bar.update(0)

    def started(self):
        self.running += 1
        self._refresh()

    def requeued(self):
        self.running -= 1
        self._refresh()

    def finished(self, ok: bool, label: str = "", error: str = ""):
        self.running = max(self.running - 1, 0)
        if ok:
            self.done += 1
        else:
            self.failed += 1
            self.bar.write(f"failed: {label}: {error}", file=sys.stderr)
        self.bar.update(1)
        self._refresh()

    def skipped(self, ok: bool, label: str = "", error: str = ""):
        """A cell decided without running (fail-fast of an unavailable model)."""
        self.running += 1
        self.finished(ok, label, error)

    def cell_line(self, label: str, line: str):
        """A log line of a running cell (bench.harness.worker.LogSink), printed above the bar as it arrives. On
        stdout, with the run's other output: stderr stays for the bar and the one-line errors."""
        self.bar.write(f"[{label}] {line}", file=sys.stdout)

    def close(self):
        self.bar.close()
