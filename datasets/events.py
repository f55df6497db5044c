"""Irregular vitals and labs -> padded GRU-D tensors, vectorized end to end.

One time step per distinct event timestamp of a sample (within its window, at
or before its prediction time); the last ``max_steps`` steps are kept. No
per-subject Python loop: polars joins, filters and sorts; numpy numbers the steps
(a cumulative sum over "new step" flags), scatters values with flat indices and
carries the last-observed time forward with a running maximum.

GRU-D's time since last observation (Che et al., 2018, eq. 2), per channel d:
``delta_t = s_t - s_{t-1} + delta_{t-1}`` if ``m_{t-1} = 0`` else ``s_t - s_{t-1}``,
which unrolls to ``delta_t = s_t - (time of the last observation before t)``; a
channel not yet observed counts from the window start (so the first delta is the
hours since the window start). Observations in steps dropped by ``max_steps``
still count as earlier observations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import torch
from torch import Tensor

from clinfuse.datasets.samples import US_PER_HOUR, window_events
from clinfuse.datasets.spec import DataSpec


@dataclass
class _Observations:
    """Observed (sample, time, channel) cells, sorted by sample, time, channel.

    Attributes:
        sample: row index into the samples table (N,).
        hours_before: hours between the event and its prediction time (N,), >= 0.
        new_step: True where a new (sample, timestamp) step starts (N,).
        channel: channel index into ``spec.channels`` (N,).
        value: value normalized with the spec's mean and std (N,).
    """

    sample: np.ndarray
    hours_before: np.ndarray
    new_step: np.ndarray
    channel: np.ndarray
    value: np.ndarray


def events_to_tensors(
    events: pl.LazyFrame | pl.DataFrame, samples: pl.DataFrame, spec: DataSpec
) -> dict[str, Tensor]:
    """The ``ts_*`` keys of the batch contract for every row of ``samples``.

    Args:
        events: MEDS events (subject_id, time, code, numeric_value); codes that are
            not channels of ``spec`` and null/NaN values are ignored.
        samples: subject_id and prediction_time, one row per sample (B).
        spec: channels, their train-split mean/std, ``max_steps``, ``window_hours``.

    Returns:
        ``ts_values``, ``ts_mask``, ``ts_delta``, ``ts_time``, ``ts_length``,
        ``ts_present``, with T the longest kept sequence (at least 1).

    Shapes:
        ts_values, ts_mask, ts_delta: (B, T, C); ts_time: (B, T);
        ts_length, ts_present: (B,).
    """
    obs = channel_observations(window_events(events, samples, spec.window_hours), spec)
    return pad_observations(obs, samples.height, spec)


def channel_observations(windowed: pl.LazyFrame, spec: DataSpec) -> _Observations:
    """Collects the windowed events of known channels, normalized and sorted.

    Sorting is the costly step, so (sample, time, channel) is packed into one
    int64 key when the bits fit (always, short of ~2M samples for a 72 h window)
    and sorted with numpy; otherwise a lexicographic sort on three columns.
    """
    window_us = int(round(spec.window_hours * US_PER_HOUR))
    frame = (
        windowed.with_columns(
            channel=pl.col("code")
            .cast(pl.Enum(spec.channels), strict=False)  # unknown codes -> null
            .to_physical()
            .cast(pl.Int64),
            rel=window_us - (pl.col("prediction_time") - pl.col("time")).dt.total_microseconds(),
        )
        .filter(
            pl.col("channel").is_not_null()
            & pl.col("numeric_value").is_not_null()
            & pl.col("numeric_value").is_finite()  # NaN and +-inf are not measurements
        )
        .select("sample", "rel", "channel", "numeric_value")
        .collect()
    )
    sample, rel, channel = (frame[c].to_numpy() for c in ("sample", "rel", "channel"))
    order = _sort_order(sample, rel, channel, window_us, spec.n_channels)
    sample, rel, channel = sample[order], rel[order], channel[order]
    mean = np.asarray(spec.channel_mean, dtype=np.float64)
    std = np.asarray(spec.channel_std, dtype=np.float64)
    value = (frame["numeric_value"].to_numpy()[order] - mean[channel]) / std[channel]
    return _to_observations(sample, (window_us - rel) / US_PER_HOUR, rel, channel, value)


def _sort_order(
    sample: np.ndarray, rel: np.ndarray, channel: np.ndarray, window_us: int, n_channels: int
) -> np.ndarray:
    """Argsort by (sample, time, channel); ``rel`` grows with time, in [0, window_us]."""
    time_bits, ch_bits = int(window_us).bit_length(), max(1, int(n_channels).bit_length())
    max_sample = int(sample.max(initial=0))
    if max_sample.bit_length() + time_bits + ch_bits <= 62:
        key = (sample << (time_bits + ch_bits)) | (rel << ch_bits) | channel
        # Stable: events arrive nearly sorted (timsort finds the runs), and repeated
        # cells keep their input order, so their mean is summed in a fixed order.
        return np.argsort(key, kind="stable")
    return np.lexsort((channel, rel, sample))


def _to_observations(
    sample: np.ndarray,
    hours_before: np.ndarray,
    rel: np.ndarray,
    channel: np.ndarray,
    value: np.ndarray,
) -> _Observations:
    new_step = np.ones(len(sample), dtype=bool)
    new_step[1:] = (sample[1:] != sample[:-1]) | (rel[1:] != rel[:-1])
    return _Observations(
        sample=sample,
        hours_before=hours_before,
        new_step=new_step,
        channel=channel,
        value=value.astype(np.float32),
    )


def pad_observations(obs: _Observations, n_samples: int, spec: DataSpec) -> dict[str, Tensor]:
    """Scatters sorted observations into padded (B, T, C) tensors and computes delta."""
    step, n_steps = _step_index(obs, n_samples, spec.max_steps)
    length = np.minimum(n_steps, spec.max_steps)
    n_time = max(1, int(length.max(initial=0)))
    keep = step >= 0
    ts_time = _step_times(obs, step, keep, n_samples, n_time)  # (B, T)
    values, mask = _scatter_values(obs, step, keep, n_samples, n_time, spec.n_channels)
    start = _delta_start(obs, keep, n_samples, spec)  # (B, C)
    delta = _gru_d_delta(-ts_time, mask, start, length)  # (B, T, C)
    return {
        "ts_values": torch.from_numpy(values),
        "ts_mask": torch.from_numpy(mask),
        "ts_delta": torch.from_numpy(delta),
        "ts_time": torch.from_numpy(ts_time),
        "ts_length": torch.from_numpy(length.astype(np.int64)),
        "ts_present": torch.from_numpy(length > 0),
    }


def _step_index(
    obs: _Observations, n_samples: int, max_steps: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-event step index within its sample, counted so the LAST max_steps are 0..T-1.

    Returns:
        step (N,) with negative values for dropped early steps; n_steps (B,) before cropping.
    """
    global_step = np.cumsum(obs.new_step) - 1  # dense rank of (sample, time) overall
    n_steps = np.bincount(obs.sample[obs.new_step], minlength=n_samples)
    first = np.cumsum(n_steps) - n_steps  # global index of each sample's first step
    dropped = np.maximum(n_steps - max_steps, 0)
    return global_step - first[obs.sample] - dropped[obs.sample], n_steps


def _step_times(
    obs: _Observations, step: np.ndarray, keep: np.ndarray, n_samples: int, n_time: int
) -> np.ndarray:
    ts_time = np.zeros((n_samples, n_time), dtype=np.float32)
    first = keep & obs.new_step
    ts_time[obs.sample[first], step[first]] = obs.hours_before[first]
    return ts_time


def _scatter_values(
    obs: _Observations, step: np.ndarray, keep: np.ndarray, n_samples: int, n_time: int, n_ch: int
) -> tuple[np.ndarray, np.ndarray]:
    """Values and mask; repeated (sample, time, channel) cells hold their mean."""
    flat = (obs.sample[keep] * n_time + step[keep]) * n_ch + obs.channel[keep]  # sorted
    value = obs.value[keep]
    values = np.zeros(n_samples * n_time * n_ch, dtype=np.float32)
    mask = np.zeros(n_samples * n_time * n_ch, dtype=np.float32)
    if len(flat):
        starts = np.flatnonzero(np.r_[True, flat[1:] != flat[:-1]])
        counts = np.diff(np.r_[starts, len(flat)])
        values[flat[starts]] = np.add.reduceat(value, starts) / counts
        mask[flat[starts]] = 1.0
    shape = (n_samples, n_time, n_ch)
    return values.reshape(shape), mask.reshape(shape)


def _delta_start(
    obs: _Observations, keep: np.ndarray, n_samples: int, spec: DataSpec
) -> np.ndarray:
    """Time (hours, relative to prediction) each channel was last seen before the first kept step.

    The window start when the channel was not seen in a dropped step.
    """
    start = np.full((n_samples, spec.n_channels), -spec.window_hours, dtype=np.float32)
    drop = ~keep
    if drop.any():
        np.maximum.at(start, (obs.sample[drop], obs.channel[drop]), -obs.hours_before[drop])
    return start


def _gru_d_delta(
    s: np.ndarray, mask: np.ndarray, start: np.ndarray, length: np.ndarray
) -> np.ndarray:
    """GRU-D delta from step times ``s`` (B, T), observed ``mask`` (B, T, C), ``start`` (B, C).

    Shapes:
        s: (B, T); mask: (B, T, C); start: (B, C); length: (B,) -> (B, T, C).
    """
    last = np.empty(mask.shape, dtype=np.float32)  # (B, T, C) last seen strictly before t
    last[:, 0] = start
    last[:, 1:] = -np.inf
    np.copyto(
        last[:, 1:], np.broadcast_to(s[:, :-1, None], last[:, 1:].shape), where=mask[:, :-1] > 0
    )
    _running_max(last)  # times increase along T
    delta = s[:, :, None] - last
    valid = np.arange(s.shape[1])[None, :] < length[:, None]  # (B, T)
    delta *= valid[:, :, None]
    return delta


def _running_max(x: np.ndarray) -> None:
    """In place, the running maximum along axis 1 of (B, T, C).

    Step by step over T: ``np.maximum.accumulate`` along a middle axis is ~3x slower.
    """
    for t in range(1, x.shape[1]):
        np.maximum(x[:, t - 1], x[:, t], out=x[:, t])
