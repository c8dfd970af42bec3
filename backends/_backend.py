"""The base of the tiny backend classes: the defaults a library overrides where it differs."""

from __future__ import annotations

__all__ = ["Backend"]


class Backend:
    """How to make, move and synchronise one library's arrays (see ``backends/_layer.py``).

    A subclass names ``name``, ``xp``, ``array_types`` and ``default_dtype``,
    and defines ``dtype``, ``asarray``, ``to_numpy`` and ``draws``.
    """

    lti_scan_method = "auto"  # S4/S5 sequences: in chunks of matrix products (steps where an input is not finite)
    selective_scan_method = "loop"  # S6/Mamba sequences: the blocked loop, fastest on CPUs

    def finish(self, arrays) -> None:
        """Make a step's results usable (eager libraries: nothing to do)."""

    def synchronize(self) -> None:
        """Wait for queued work (libraries that do not queue: nothing to do)."""
