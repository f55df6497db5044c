"""Per-modality encoders. Importing this package registers every encoder.

Importing ``clinfuse.encoders`` imports the parent package first, which installs the
torchvision compatibility shim before timm is imported.
"""

from __future__ import annotations

from clinfuse.encoders import genomics, gru_d, image, pathway_gnn, tft  # noqa: F401  (registration)
from clinfuse.encoders.base import (
    ModalityEncoder,
    create_encoder,
    list_encoders,
    register_encoder,
)

__all__ = ["ModalityEncoder", "create_encoder", "list_encoders", "register_encoder"]
