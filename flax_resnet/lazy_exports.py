"""PEP 562 module attributes that import their module on first use."""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any, Callable


def attach(package: str, package_globals: dict[str, Any],
           exports: dict[str, str]) -> tuple[Callable[[str], Any],
                                            Callable[[], list[str]]]:
  """`__getattr__, __dir__` for `package`: exports[name] is name's module.

  A name that is not exported but is a submodule imports it, as an eager
  `__init__` importing its submodules made them attributes.
  """

  def __getattr__(name: str) -> Any:  # pylint: disable=invalid-name
    if name in exports:
      value = getattr(importlib.import_module(exports[name]), name)
      package_globals[name] = value  # once: later lookups skip this hook
      return value
    if importlib.util.find_spec(f'{package}.{name}') is not None:
      return importlib.import_module(f'{package}.{name}')
    raise AttributeError(f'module {package!r} has no attribute {name!r}')

  def __dir__() -> list[str]:  # pylint: disable=invalid-name
    return sorted({*package_globals, *package_globals.get('__all__', ())})

  return __getattr__, __dir__
