"""Optional parts of graft (ONNX export, the server) and the clear error when one is missing.

The heavy libraries of an optional part are imported only by its own module, so `import graft`
stays fast; `require_extra` is called first there so that a missing one names the extra to install.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from graft.errors import GraftError


class MissingExtraError(GraftError, ImportError):
    """An optional part of graft is used but its libraries are not installed."""


def require_extra(extra: str, *modules: str) -> list[ModuleType]:
    """Import `modules` or raise `MissingExtraError` naming `pip install "graft[extra]"`.

    >>> onnx, onnxruntime = require_extra("export", "onnx", "onnxruntime")
    """
    imported: list[ModuleType] = []
    for name in modules:
        try:
            imported.append(importlib.import_module(name))
        except ImportError as exc:
            raise MissingExtraError(
                f"this needs the {name!r} package, which is not installed ({exc}); "
                f'install the extra with: pip install "graft[{extra}]"'
            ) from None
    return imported
