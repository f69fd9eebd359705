"""Stopping cleanly on SIGINT/SIGTERM: finish the step, save, exit with the shell's status.

The first signal only sets ``stop_signal``; the training loop sees it at its next check, saves
``last.pt`` and returns. A second one of the same kind aborts without saving.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + signal number, as shells do


class StopOnSignal:
    """Signal handling for a trainer with ``stop_signal`` and ``dist`` attributes."""

    stop_signal: int | None
    dist: Any

    def _install_signal_handlers(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}
        for sig in EXIT_SIGNAL:
            previous[sig] = signal.signal(sig, self._on_signal)
        return previous

    def _restore_signal_handlers(self, previous: dict[int, Any]) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.stop_signal is not None:
            # Ctrl-C under torchrun reaches a worker twice (SIGINT from the terminal, SIGTERM
            # from torchrun): only a repeat of the same signal means "abort without saving".
            if self.dist.enabled and signum != self.stop_signal:
                return
            signal.signal(signum, signal.SIG_DFL)  # a second signal: stop now, without saving
            raise KeyboardInterrupt
        self.stop_signal = signum
        if self.dist.is_main:
            print(f"\n{signal.Signals(signum).name}: finishing this step, then saving last.pt "
                  "(send again to abort without saving)", file=sys.stderr, flush=True)
