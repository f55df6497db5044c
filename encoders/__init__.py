"""Per-modality encoders. Importing this package registers every encoder."""

from __future__ import annotations

import clinfuse  # noqa: F401  (torchvision compat before timm)
from clinfuse.encoders.base import (
    ModalityEncoder,
    create_encoder,
    list_encoders,
    register_encoder,
)
from clinfuse.encoders import gru_d  # noqa: F401
from clinfuse.encoders import tft  # noqa: F401
from clinfuse.encoders import image  # noqa: F401
from clinfuse.encoders import genomics  # noqa: F401
from clinfuse.encoders import pathway_gnn  # noqa: F401

__all__ = ["ModalityEncoder", "create_encoder", "list_encoders", "register_encoder"]
