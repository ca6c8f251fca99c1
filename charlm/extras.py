"""Optional packages that only some commands need, imported on demand with a one-line hint when absent."""

from __future__ import annotations

import importlib
from types import ModuleType

from charlm.errors import MissingExtraError


def import_extra(module: str, extra: str, purpose: str) -> ModuleType:
    """Import `module` for `purpose` (e.g. "charlm export --to onnx"); if it is missing, say which
    `pip install 'charlm[extra]'` brings it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(
            f"{purpose} needs {module.partition('.')[0]}, which is not installed: pip install 'charlm[{extra}]'"
        ) from None
