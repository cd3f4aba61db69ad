"""CPU time a server spends on a level: its API process apart from the engine processes below it.

Both servers have the same shape: one API process (HTTP, request handling, vLLM's output
processor and detokenizer, and for glmserve rendering and parsing) with vLLM's engine core and
its workers as child processes. On a small machine every CPU second the API process spends is
taken from the engine, so "API CPU seconds per 1,000 output tokens" is the figure that says
whether glmserve's own per-token work costs more than vLLM's server.
"""

from __future__ import annotations

import psutil


def _seconds(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


class CpuMeter:
    """Snapshots of a process tree's CPU seconds; :meth:`since` gives the split since a snapshot."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)

    def snapshot(self) -> dict[int, float]:
        """CPU seconds per live process of the tree, the root under its own pid."""
        out = {self.root.pid: _seconds(self.root)}
        for child in self.root.children(recursive=True):
            try:
                out[child.pid] = _seconds(child)
            except psutil.NoSuchProcess:  # ended between listing and reading
                continue
        return out

    def since(self, before: dict[int, float]) -> dict[str, float]:
        """``{"api": s, "engine": s}`` spent since ``before`` (children that appeared count from zero)."""
        now = self.snapshot()
        api = now[self.root.pid] - before.get(self.root.pid, 0.0)
        engine = sum(v - before.get(pid, 0.0) for pid, v in now.items() if pid != self.root.pid)
        return {"api": round(api, 3), "engine": round(engine, 3)}
