"""Lazy package exports (PEP 562): a name is imported from its module the first time it is used."""

from importlib import import_module
from typing import Any, Callable


def lazy_getattr(package: str, exports: dict[str, str], namespace: dict[str, Any]) -> Callable[[str], Any]:
    """Returns a module-level ``__getattr__`` that resolves ``exports`` (name -> module) and caches in ``namespace``."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(exports[name]), name)
        namespace[name] = value
        return value

    return __getattr__
