"""Between IR levels: the torch front end and the ONNX Runtime / TensorRT back ends.

Importing this package registers the back ends. torch and tensorrt are imported lazily, inside
the functions that need them, with an error that names the extra to install.
"""

from __future__ import annotations

import importlib

for _module in ("ort", "tensorrt"):
    try:
        importlib.import_module(f"{__name__}.{_module}")
    except ModuleNotFoundError as _error:
        # A back-end module not written yet must not break the rest of the package.
        if _error.name != f"{__name__}.{_module}":
            raise
