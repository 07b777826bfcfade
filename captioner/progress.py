"""Progress bars that stay out of log files."""

from __future__ import annotations


def bar_disabled(show: bool) -> bool | None:
    """tqdm's ``disable=``: off when not wanted, and (``None``) off when stderr is not a terminal.

    A background run's log then holds the one JSON line per epoch, not every redraw of every bar.
    """
    return True if not show else None
