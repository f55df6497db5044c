"""Import-time compatibility shims. Imported first by the package and by tests.

timm imports torchvision, but only its Python parts. The torchvision wheel that
pairs with a CPU build of torch on PyPI is a CUDA build whose compiled library
cannot load beside CPU torch; torchvision then fails at import with
``operator torchvision::nms does not exist`` because its fake-kernel
registrations refer to op schemas that the library would have defined.

When, and only when, the compiled library fails to load, we define the two op
schemas it registers fakes for. When it loads, we do nothing: defining them a
second time would clash with the library's own definitions.
"""

from __future__ import annotations

import importlib.util
import os

_LIBRARY = None  # keeps the torch.library.Library alive for the process


def _torchvision_library_path() -> str | None:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        for name in os.listdir(folder):
            if name.startswith("_C.") and name.endswith((".so", ".pyd")):
                return os.path.join(folder, name)
    return None


def ensure_torchvision_importable() -> bool:
    """Make ``import torchvision`` (and so ``import timm``) work on CPU torch.

    Returns:
        True when the op schemas had to be defined here.
    """
    global _LIBRARY
    if _LIBRARY is not None:
        return True
    import sys

    if "torchvision" in sys.modules:
        return False
    path = _torchvision_library_path()
    if path is None:
        return False
    import torch

    try:
        torch.ops.load_library(path)
        return False
    except (OSError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "DEF")  # noqa: TID251
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARY = lib
    return True
