"""Lazy imports: optional dependencies and registered implementations are imported only when chosen."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from types import ModuleType


def require(module: str, install_hint: str, *, needed_for: str = "this stage") -> ModuleType:
    """Import an optional dependency or fail with the pip line that fixes it.

    `needed_for` names what needs it in the message ("this backend", "this embedder")."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{module} is needed for {needed_for}: {install_hint}") from exc


def registered_class(registry: Mapping[str, str], key: str, what: str) -> type:
    """The class `registry[key]` names as "module:Class", imported now (with its optional dependencies).

    An unknown key is a ValueError that lists the choices; `what` names the key ("scorer backend")."""
    try:
        target = registry[key]
    except KeyError:
        raise ValueError(f"unknown {what} {key!r}; choose from {sorted(registry)}") from None
    module_name, class_name = target.split(":")
    return getattr(importlib.import_module(module_name), class_name)
