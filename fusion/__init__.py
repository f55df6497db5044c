"""Fusion strategies, confound adversary, the full model and its training."""

from __future__ import annotations

from clinfuse.fusion import attention, early, gated, late  # noqa: F401  (registers strategies)
from clinfuse.fusion.base import FusionModule, create_fusion, list_fusions, register_fusion

__all__ = ["FusionModule", "create_fusion", "list_fusions", "register_fusion"]
