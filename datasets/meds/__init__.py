"""MEDS: read a MEDS root in place as a cohort, validate it with the ``meds`` schemas,
write our cohorts and predictions in MEDS, and extract task labels with ACES."""

from clinfuse.datasets.meds.options import MedsOptions
from clinfuse.datasets.meds.source import MedsSource, is_meds_root, open_cohort

__all__ = ["MedsOptions", "MedsSource", "is_meds_root", "open_cohort"]
