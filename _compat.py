"""Import-time compatibility shims. Imported first by the package and by tests.

timm imports torchvision, but only its Python parts. The torchvision wheel that
pairs with a CPU build of torch on PyPI is a CUDA build whose compiled library
cannot load beside CPU torch; torchvision then fails at import with
``operator torchvision::nms does not exist`` because its fake-kernel
registrations refer to op schemas that the library would have defined.

When, and only when, the compiled library fails to load, we define the two op
schemas it registers fakes for. When it loads, we do nothing: defining them a
second time would clash with the library's own definitions.

``import clinfuse`` does not run the check (it needs torch, which would make the
package import slow); ``install_torchvision_hook`` arranges for it to run just before
the first ``import torchvision``, whoever imports it (timm, grad-cam, a user).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

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
    _remove_hook()  # find_spec("torchvision") below must not re-enter the hook
    if _LIBRARY is not None:
        return True
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


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    """Runs ``ensure_torchvision_importable`` when ``torchvision`` is first imported,
    then lets the regular finders import it."""

    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001
        if fullname == "torchvision":
            ensure_torchvision_importable()
        return None


_HOOK = _BeforeTorchvision()


def install_torchvision_hook() -> None:
    """Defers ``ensure_torchvision_importable`` to the first ``import torchvision``."""
    if "torchvision" not in sys.modules and _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)


def _remove_hook() -> None:
    if _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)
