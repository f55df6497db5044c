"""``clinfuse simulate`` and ``clinfuse validate``."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    pass
