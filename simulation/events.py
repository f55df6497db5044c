"""Simulated ICU vitals and labs: irregular, informative, trending.

Each subject has a latent ``physio_severity`` s. A channel's value at time t is

    v(t) = base_i + trend_c * s * (0.25 + 0.75 f(t)) + post_c * r(t) + noise,

with ``f(t) = (t - admission) / (prediction_time - admission)`` (capped at
1.5) and ``r(t)`` a 6-hour ramp from the deterioration time (positive subjects
only, always after prediction_time). Labs with skewed distributions live on the
log scale. Sicker subjects are charted more often (vitals every 15 min to 4 h,
labs every 4 to 24 h), and some subjects never have some channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from clinfuse.datasets.schema import TIME

HOUR_US = 3_600_000_000
ADMISSION_CODE = "ICU_ADMISSION"


@dataclass(frozen=True)
class Channel:
    """One vital sign or lab.

    Attributes:
        code: MEDS code.
        unit: unit string.
        mean: population median (log channels) or mean.
        between_sd: between-subject s.d. of the baseline (log units for log channels).
        noise_sd: within-subject measurement noise s.d.
        trend: change per unit severity over the stay up to prediction_time.
        post: shift after deterioration (after prediction_time, positive subjects).
        lo: physiological lower clip.
        hi: physiological upper clip.
        decimals: rounding of charted values.
        log: whether the channel is simulated on the log scale.
        p_subject: probability that a subject has the channel at all.
        p_draw: probability that a charting round (or blood draw) includes it.
    """

    code: str
    unit: str
    mean: float
    between_sd: float
    noise_sd: float
    trend: float
    post: float
    lo: float
    hi: float
    decimals: int
    log: bool
    p_subject: float
    p_draw: float


VITALS = (
    Channel("VITAL//HR", "bpm", 84.0, 10.0, 5.0, 14.0, 30.0, 30, 220, 0, False, 0.99, 0.97),
    Channel("VITAL//SBP", "mmHg", 122.0, 14.0, 8.0, -12.0, -35.0, 50, 240, 0, False, 0.97, 0.93),
    Channel("VITAL//DBP", "mmHg", 70.0, 9.0, 6.0, -6.0, -18.0, 25, 140, 0, False, 0.97, 0.93),
    Channel("VITAL//RR", "breaths/min", 18.0, 3.0, 2.0, 4.0, 10.0, 6, 60, 0, False, 0.95, 0.85),
    Channel("VITAL//SPO2", "%", 96.5, 1.2, 1.0, -1.5, -7.0, 60, 100, 0, False, 0.97, 0.9),
    Channel("VITAL//TEMP", "degC", 37.0, 0.35, 0.25, 0.5, 1.0, 34, 42, 1, False, 0.85, 0.5),
)
LABS = (
    Channel("LAB//LACTATE", "mmol/L", 1.3, 0.3, 0.12, 0.55, 0.9, 0.3, 20, 1, True, 0.8, 0.75),
    Channel("LAB//CREATININE", "mg/dL", 0.95, 0.3, 0.07, 0.45, 0.6, 0.2, 15, 2, True, 0.97, 0.95),
    Channel("LAB//WBC", "10^9/L", 8.5, 0.3, 0.1, 0.25, 0.4, 0.5, 60, 1, True, 0.97, 0.95),
    Channel(
        "LAB//PLATELETS", "10^9/L", 230.0, 0.3, 0.08, -0.25, -0.45, 5, 900, 0, True, 0.97, 0.95
    ),
    Channel("LAB//BILIRUBIN", "mg/dL", 0.8, 0.4, 0.12, 0.3, 0.5, 0.1, 30, 1, True, 0.7, 0.5),
    Channel("LAB//POTASSIUM", "mmol/L", 4.1, 0.35, 0.25, 0.2, 0.5, 2.0, 8.0, 1, False, 0.95, 0.9),
)


@dataclass(frozen=True)
class Stays:
    """Per-subject stay timing and latents used to chart events.

    Attributes:
        subject_id: (N,) int64.
        admission: (N,) int64 microseconds since the epoch.
        prediction: (N,) int64 microseconds.
        end: (N,) int64 microseconds, end of charting.
        deterioration: (N,) int64 microseconds, or -1 when the outcome is negative.
        severity: (N,) float physio_severity.
    """

    subject_id: np.ndarray
    admission: np.ndarray
    prediction: np.ndarray
    end: np.ndarray
    deterioration: np.ndarray
    severity: np.ndarray


def simulate_events(rng: np.random.Generator, stays: Stays) -> pl.DataFrame:
    """``events.parquet``: admission events, vitals and labs, sorted by subject and time."""
    frames = [_admission_frame(stays)]
    vit_gap = np.clip(2.0 * np.exp(-0.6 * stays.severity), 0.25, 4.0)
    frames.append(_chart(rng, stays, VITALS, vit_gap, 0.25, 4.0))
    lab_gap = 8.0 * np.exp(-0.5 * stays.severity)
    frames.append(_chart(rng, stays, LABS, lab_gap, 4.0, 24.0))
    return pl.concat(frames).sort("subject_id", "time", "code", maintain_order=True)


def _admission_frame(stays: Stays) -> pl.DataFrame:
    n = stays.subject_id.size
    return _frame(
        stays.subject_id,
        stays.admission,
        np.full(n, ADMISSION_CODE, dtype=object),
        np.full(n, np.nan),
        np.full(n, None, dtype=object),
    )


def _chart(
    rng: np.random.Generator,
    stays: Stays,
    channels: tuple[Channel, ...],
    mean_gap_h: np.ndarray,
    min_gap_h: float,
    max_gap_h: float,
) -> pl.DataFrame:
    """Charting rounds at irregular times; each round records a random subset of channels."""
    idx, t = _round_times(rng, stays, mean_gap_h, min_gap_h, max_gap_h)
    has = rng.random((stays.subject_id.size, len(channels))) < [c.p_subject for c in channels]
    base_z = rng.standard_normal((stays.subject_id.size, len(channels)))
    parts = []
    for c, ch in enumerate(channels):
        keep = has[idx, c] & (rng.random(idx.size) < ch.p_draw)
        i, tc = idx[keep], t[keep]
        value = _values(rng, ch, stays, i, tc, base_z[i, c])
        parts.append((i, tc, np.full(i.size, ch.code, dtype=object), value, ch.unit))
    return pl.concat(
        [
            _frame(stays.subject_id[i], tc, code, v, np.full(i.size, unit, dtype=object))
            for i, tc, code, v, unit in parts
        ]
    )


def _round_times(
    rng: np.random.Generator,
    stays: Stays,
    mean_gap_h: np.ndarray,
    min_gap_h: float,
    max_gap_h: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Irregular times in [admission, end): exponential gaps clipped to [min, max] hours.

    Shapes:
        mean_gap_h: (N,).
        returns: (R,) subject index and (R,) int64 microseconds, one per round.
    """
    span_h = (stays.end - stays.admission) / HOUR_US
    k = int(np.ceil(span_h.max() / min_gap_h)) + 1
    gaps = rng.exponential(mean_gap_h[:, None], size=(span_h.size, k))
    gaps = np.clip(gaps + min_gap_h * 0.5, min_gap_h, max_gap_h)  # (N, K)
    gaps[:, 0] = rng.uniform(0.0, min_gap_h, size=span_h.size)
    offset_h = np.cumsum(gaps, axis=1)
    valid = offset_h < span_h[:, None]
    idx = np.nonzero(valid)[0]
    minutes = np.round(offset_h[valid] * 60.0).astype(np.int64)
    return idx, stays.admission[idx] + minutes * 60_000_000


def _values(
    rng: np.random.Generator,
    ch: Channel,
    stays: Stays,
    i: np.ndarray,
    t: np.ndarray,
    z: np.ndarray,
) -> np.ndarray:
    """Charted values of one channel for rows (subject index ``i``, time ``t``)."""
    center = np.log(ch.mean) if ch.log else ch.mean
    frac = (t - stays.admission[i]) / (stays.prediction[i] - stays.admission[i])
    frac = np.clip(frac, 0.0, 1.5)
    v = center + ch.between_sd * z + ch.trend * stays.severity[i] * (0.25 + 0.75 * frac)
    v = v + ch.post * _deterioration_ramp(stays.deterioration[i], t)
    v = v + ch.noise_sd * rng.standard_normal(i.size)
    if ch.log:
        v = np.exp(v)
    return np.round(np.clip(v, ch.lo, ch.hi), ch.decimals)


def _deterioration_ramp(deterioration: np.ndarray, t: np.ndarray) -> np.ndarray:
    """0 before deterioration (or without it), rising linearly to 1 over 6 hours."""
    ramp = np.clip((t - deterioration) / (6.0 * HOUR_US), 0.0, 1.0)
    return np.where(deterioration >= 0, ramp, 0.0)


def _frame(
    subject_id: np.ndarray,
    time_us: np.ndarray,
    code: np.ndarray,
    value: np.ndarray,
    unit: np.ndarray,
) -> pl.DataFrame:
    return pl.DataFrame(
        [
            pl.Series("subject_id", subject_id, dtype=pl.Int64),
            pl.Series("time", time_us, dtype=pl.Int64).cast(TIME),
            pl.Series("code", code, dtype=pl.String),
            pl.Series("numeric_value", value, dtype=pl.Float32, nan_to_null=True),
            pl.Series("unit", unit, dtype=pl.String),
        ]
    )
