"""Terminal output shared by the verbs: a rich console that stays readable in logs."""

from __future__ import annotations

import sys

from rich.console import Console


def console() -> Console:
    """A rich console; wide when stdout is not a terminal so piped tables are not squeezed."""
    return Console(width=None if sys.stdout.isatty() else 160)
