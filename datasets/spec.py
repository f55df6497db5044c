"""What the model needs to know about the data to build itself.

A ``DataSpec`` is fitted on the training split by the DataModule and saved in
every run directory and model artifact, so scoring builds the same model and
applies the same normalization as training.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DataSpec:
    """Sizes, vocabularies and training-split statistics.

    Attributes:
        channels: time-series channel codes, in tensor order (C).
        channel_mean: per-channel mean of raw values on the train split (C).
        channel_std: per-channel std of raw values on the train split (C).
        markers: genotype marker names, in tensor order (M).
        marker_groups: group index of each marker (M), into ``groups``.
        groups: group (gene or pathway) names (G).
        marker_mean: mean dosage per marker on the train split (M), for imputation.
        marker_pcs: the top principal axes of the train split's standardized dosages
            (K lists of M loadings, unit norm), when ``data.genotype_pcs`` asks for
            them: the population-structure directions a genotype encoder can project
            out (``sgl_mlp.ancestry_pcs``).
        image_size: side of the square image tensor.
        sites: site names; the index is the code in ``confounds["site"]``.
        ancestries: ancestry names; the index is the code in ``confounds["ancestry"]``.
        max_steps: maximum number of time steps kept per sample (T).
        window_hours: how far before prediction_time events are kept.
        pos_weight: negatives / positives on the train split.
    """

    channels: list[str] = field(default_factory=list)
    channel_mean: list[float] = field(default_factory=list)
    channel_std: list[float] = field(default_factory=list)
    markers: list[str] = field(default_factory=list)
    marker_groups: list[int] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    marker_mean: list[float] = field(default_factory=list)
    marker_pcs: list[list[float]] = field(default_factory=list)
    image_size: int = 128
    sites: list[str] = field(default_factory=list)
    ancestries: list[str] = field(default_factory=list)
    max_steps: int = 256
    window_hours: float = 72.0
    pos_weight: float = 1.0

    @property
    def n_channels(self) -> int:
        return len(self.channels)

    @property
    def n_markers(self) -> int:
        return len(self.markers)

    @property
    def n_groups(self) -> int:
        return len(self.groups)
