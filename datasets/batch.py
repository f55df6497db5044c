"""The batch contract: what a DataLoader yields and every encoder reads.

``batch: dict[str, Tensor]`` (``confounds`` is a nested dict). B samples, one
per (subject, prediction_time); T padded time steps; C channels; M markers.

Image (the latest image with time <= prediction_time):
    image          (B, 1, H, W) float32, grayscale in [0, 1] after
                   rescale/VOI/MONOCHROME1 inversion. Encoders handle
                   channel replication or first-conv folding and normalization.
    image_present  (B,) bool
    image_age      (B,) float32 hours between the image and prediction_time (0 if absent)

Vitals and labs (events with time <= prediction_time, last ``window_hours``):
    ts_values      (B, T, C) float32 normalized with train-split mean/std, 0 where unobserved
    ts_mask        (B, T, C) float32 1 where observed
    ts_delta       (B, T, C) float32 hours since the channel was last observed
                   (GRU-D's delta; at the first step, hours since the window start)
    ts_time        (B, T) float32 hours before prediction_time (>= 0, decreasing along T)
    ts_length      (B,) int64 number of valid steps (0 = no events)
    ts_present     (B,) bool  ts_length > 0

Genotypes:
    genotype       (B, M) float32 dosage 0/1/2, 0 where missing
    genotype_mask  (B, M) float32 1 where called
    genotype_present (B,) bool

Targets and bookkeeping:
    label          (B,) float32 0/1
    confounds      {"site": (B,) int64, "ancestry": (B,) int64}, -1 when unknown
    subject_id     (B,) int64
    prediction_time (B,) int64 microseconds since the epoch
"""

from __future__ import annotations

IMAGE_KEYS = ("image", "image_present", "image_age")
TS_KEYS = ("ts_values", "ts_mask", "ts_delta", "ts_time", "ts_length", "ts_present")
GENOTYPE_KEYS = ("genotype", "genotype_mask", "genotype_present")
MODALITIES = ("image", "timeseries", "genomics")
PRESENT_KEY = {"image": "image_present", "timeseries": "ts_present", "genomics": "genotype_present"}
CONFOUNDS = ("site", "ancestry")
