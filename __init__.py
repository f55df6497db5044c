"""clinfuse: clinical risk prediction from DICOM images, irregular ICU vitals and
labs, and genetic markers, fused with cross-modal attention and audited for
scanner-site and ancestry confounding."""

from __future__ import annotations

from clinfuse._compat import ensure_torchvision_importable

ensure_torchvision_importable()

__version__ = "0.1.0"
