"""Which codes of a MEDS root become model inputs: ``data.meds`` of a run config.

Kept apart from ``source`` so the data config imports no MEDS library.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl


@dataclass
class MedsOptions:
    """How a MEDS root becomes model inputs (``data.meds`` in a run config).

    Attributes:
        channels: codes that may become time-series channels: a code, or a prefix
            ending in ``//`` (``LAB//`` takes every ``LAB//...`` code). Empty: every
            code with numeric values, as for a cohort directory. Among these, the
            codes with numeric values in the training windows become channels.
        site: prefix of the static code giving the site (``SITE//A`` -> ``A``).
        ancestry: prefix of the static code giving the ancestry.
        sex: prefix of the static code giving the sex.
        age: static code whose ``numeric_value`` is the age.
    """

    channels: list[str] = field(default_factory=list)
    site: str = "SITE//"
    ancestry: str = "ANCESTRY//"
    sex: str = "SEX//"
    age: str = "AGE"

    def code_filter(self) -> pl.Expr:
        """True for the codes ``channels`` selects (every code when empty)."""
        if not self.channels:
            return pl.lit(True)
        exact = [c for c in self.channels if not c.endswith("//")]
        prefixes = [c for c in self.channels if c.endswith("//")]
        expr = pl.col("code").is_in(exact) if exact else pl.lit(False)
        for prefix in prefixes:
            expr = expr | pl.col("code").str.starts_with(prefix)
        return expr
