"""Where a step's time goes: wall time per phase (forward, loss, backward, optimizer, ...).

CUDA runs asynchronously, so host timestamps alone would charge a phase's kernels to whichever
later phase first waits for them; with ``sync`` the timer synchronises the device at each phase
end (a few synchronisations per step, measured in ``benchmarks/monitoring_overhead.py``).
"""

from __future__ import annotations

import time

import torch


class PhaseTimer:
    def __init__(self, device: torch.device | None = None, sync: bool = True, enabled: bool = True) -> None:
        self.sync = sync and device is not None and device.type == "cuda"
        self.device, self.enabled = device, enabled
        self.phases: dict[str, float] = {}
        self.start = time.perf_counter()

    def mark(self, phase: str) -> None:
        """Charge the time since the previous mark to ``phase`` (adds up over repeated marks)."""
        if not self.enabled:
            return
        if self.sync:
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self.start
        self.start = now


NO_TIMER = PhaseTimer(enabled=False)
