"""Array-library backends for the state-space layers (NumPy, CuPy, MLX).

``available()`` names the libraries usable on this machine. A backend module
is imported only when asked for, so importing ``backends`` imports no array
library.
"""

__all__ = ["available"]


def available() -> dict:
    """``{name: None}`` for each usable backend, ``{name: reason}`` for each unusable one."""
    return {}
