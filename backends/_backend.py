"""The base of the tiny backend classes: the defaults a library overrides where it differs."""

from __future__ import annotations

__all__ = ["Backend"]


class Backend:
    """How to make, move and synchronise one library's arrays (see ``backends/_layer.py``).

    A subclass names ``name``, ``xp``, ``array_types`` and ``default_dtype``,
    and defines ``dtype``, ``asarray``, ``to_numpy`` and ``draws``.
    """

    def finish(self, arrays) -> None:
        """Make a step's results usable (eager libraries: nothing to do)."""

    def synchronize(self) -> None:
        """Wait for queued work (libraries that do not queue: nothing to do)."""
