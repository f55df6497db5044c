from __future__ import annotations

import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import clinfuse._compat as _compat  # noqa: E402

_compat.ensure_torchvision_importable()
