"""Finding every object of a module tree, with its path: what ``tt.Model``, ``tt.sequence_mode`` and ``tt.checkpoint`` walk."""

from __future__ import annotations

import gc
import types
import weakref
from typing import Iterator, Tuple

import torch
from torch import nn

# nn.Module's own bookkeeping attributes: walked through ``_modules`` only.
_MODULE_INTERNALS = frozenset(vars(nn.Module()))
_ATOMIC = (torch.Tensor, str, bytes, int, float, complex, bool, type(None))
# Objects with a __dict__ that never hold a model's layers: not walked.
_OPAQUE = (type, types.ModuleType, types.FunctionType, types.MethodType, types.BuiltinFunctionType)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


_CONTAINERS = (list, tuple, set, frozenset, dict)
# Containers at least this long that hold only atomic items are remembered (see _PlainData).
_REMEMBER_FROM = 1024


class _PlainData:
    """The large plain containers of one tree found holding only atomic items (no layer can be inside).

    Finding the layers runs at every ``model.scan``, ``tt.sequence_mode`` and
    ``tt.checkpoint`` call, and walking a vocabulary of a million entries in
    Python costs half a second or more. Such a container is remembered with a shallow
    copy of its items, and skipped while it still holds equal items: one
    comparison in C (about 2 ms per million list entries), which never calls
    the container's own ``__iter__``. Any change (an item appended, replaced
    or removed) makes it walked again. An exact ``dict`` or ``tuple`` that the
    garbage collector does not track holds no tracked object, hence no
    module or object that could hold one: skipped at once, nothing kept.

    Items compare by equality, which is identity or equal atomic values for
    every atomic type; an object that claims to equal the number or string it
    replaced is taken as holding no layer.
    """

    def __init__(self, known: dict):
        self.known = known  # id(container) -> (container, snapshot); the container kept alive, so its id stays its own
        self.used = {}  # what this walk found or confirmed: the next walk's known

    @staticmethod
    def untracked(container) -> bool:
        return type(container) in (dict, tuple) and not gc.is_tracked(container)

    def unchanged(self, container) -> bool:
        entry = self.known.get(id(container))
        if entry is None or entry[0] is not container:
            return False
        snapshot = entry[1]
        try:
            if isinstance(container, list):
                same = list.__eq__(snapshot, container)
            elif isinstance(container, dict):
                same = len(container) == len(snapshot) and list.__eq__(snapshot, list(dict.values(container)))
            elif isinstance(container, set):
                same = frozenset.__eq__(snapshot, container)
            else:  # a tuple or frozenset: immutable, and its atomic items too
                same = True
        except Exception:  # an item's __eq__ that does not answer (a tensor of several elements): changed
            return False
        if same is True:
            self.used[id(container)] = entry
        return same is True

    @staticmethod
    def items(container):
        """``(key, item)`` pairs of ``container`` as it is now, and the snapshot to remember them by."""
        if isinstance(container, dict):
            pairs = list(dict.items(container))
            return pairs, [item for _, item in pairs]
        if isinstance(container, list):
            snapshot = list.copy(container)
        elif isinstance(container, (set, frozenset)):
            snapshot = frozenset(container)
        else:
            snapshot = container
        return enumerate(snapshot), snapshot

    def remember(self, container, snapshot) -> None:
        self.used[id(container)] = (container, snapshot)


# walk root -> what its last complete walk found of _PlainData
_PLAIN_DATA: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _walk(root) -> Iterator[Tuple[str, object]]:
    """Every object reachable from ``root`` once, with its path.

    Follows registered submodules, then plain Python containers and objects
    kept as attributes (a list of layers on a module, a dict of them, a helper
    object holding some), so layers outside ``nn.ModuleList`` are found too.
    Large containers of atomic items are skipped while unchanged (see ``_PlainData``).
    """
    seen = set()
    try:
        plain = _PlainData(_PLAIN_DATA.get(root, {}))
    except TypeError:  # a root that takes no weak reference: nothing remembered
        plain = None

    def visit(obj, path):
        if id(obj) in seen or isinstance(obj, _ATOMIC):
            return
        seen.add(id(obj))
        yield path, obj
        if isinstance(obj, _CONTAINERS):
            if _PlainData.untracked(obj):
                return
            large = plain is not None and len(obj) >= _REMEMBER_FROM
            if large and plain.unchanged(obj):
                return
            if large:  # walk a copy, so that what is remembered is what was walked
                items, snapshot = plain.items(obj)
            else:
                items, snapshot = (obj.items() if isinstance(obj, dict) else enumerate(obj)), None
            only_atomic = True
            for key, item in items:
                if isinstance(item, _ATOMIC):
                    continue
                only_atomic = False
                yield from visit(item, f"{path}[{key}]")
            if large and only_atomic:
                plain.remember(obj, snapshot)
            return
        is_module = isinstance(obj, nn.Module)
        if is_module:
            for name, child in obj._modules.items():
                if child is not None:
                    yield from visit(child, _join(path, name))
        for name, value in getattr(obj, "__dict__", {}).items():
            if is_module and name in _MODULE_INTERNALS:
                continue
            if isinstance(value, _CONTAINERS) or (hasattr(value, "__dict__") and not isinstance(value, _OPAQUE)):
                yield from visit(value, _join(path, name))

    yield from visit(root, "")
    if plain is not None:
        _PLAIN_DATA[root] = plain.used  # containers no longer in the tree are let go
