"""``ChunkScorer``: one loaded artifact scoring chunks of samples into output rows.

A chunk's inputs are read (``scoring.inputs``) and fingerprinted
(``scoring.fingerprints``), the model runs once per mini-batch with every modality
left out in turn (``predict``), and the rows follow ``scoring.plan.OUTPUT_SCHEMA``.
A chunk that fails is narrowed down subject by subject; a subject that still fails
gets error rows carrying the reason, so the scorer never raises on bad input.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import Tensor

from clinfuse.datasets.batch import MODALITIES
from clinfuse.datasets.events import channel_observations, pad_observations
from clinfuse.datasets.images import ImageLoader
from clinfuse.datasets.samples import (
    genotype_tensors,
    latest_images,
    sample_tensors,
    scan_events,
    window_events,
)
from clinfuse.datasets.schema import EVENTS, GENOTYPES, IMAGES, has_table, scan
from clinfuse.errors import InputError
from clinfuse.scoring.failures import CohortUnreadable, ScoredChunk, is_input_fault
from clinfuse.scoring.fingerprints import (
    Header,
    HeaderStore,
    decoded_image_header,
    events_digests,
    image_header,
)
from clinfuse.scoring.inputs import (
    ChunkInputs,
    event_flags,
    file_feature_store,
    image_age,
    image_columns,
    naming_file,
    path_identity,
    sample_features,
    set_embedding_cache,
)
from clinfuse.scoring.ood import MahalanobisOOD
from clinfuse.scoring.plan import OUTPUT_SCHEMA
from clinfuse.training.artifact import ModelArtifact
from clinfuse.training.calibration import prior_shift_logit


@dataclass
class _Prepared:
    """A chunk's inputs and batch, or the error that building them raised."""

    inputs: ChunkInputs | None = None
    batch: dict[str, Any] | None = None
    error: BaseException | None = None


def _submit_next(pool: Any, scorer: ChunkScorer, queue: Iterator[tuple[int, pl.DataFrame]]):
    """(index, samples, future of ``scorer.prepare``) for the next chunk, or None at the end."""
    nxt = next(queue, None)
    if nxt is None:
        return None
    return nxt[0], nxt[1], pool.submit(scorer.prepare, nxt[1])


class ChunkScorer:
    """Scores chunks of samples with one loaded artifact; never raises on bad subjects.

    Args:
        artifact: the loaded model artifact (its model is in eval mode).
        cohort_dir: the cohort to read.
        target_prevalence: deployment base rate for prior-shift recalibration (None = off).
        batch_size: samples per forward pass (bounds activation memory).
        image_cache: decoded-pixel cache folder of ``ImageLoader`` (None = memory, per chunk).
        embedding_cache: frozen-backbone feature cache folder for the timm image encoder.
        device: torch device for the forward passes.
        threads: torch intra-op threads for this process (None = leave as is). One is
            fastest for these small matrices on a shared machine; scale out with
            processes or Ray actors instead.
    """

    def __init__(
        self,
        artifact: ModelArtifact,
        cohort_dir: str | Path,
        target_prevalence: float | None = None,
        batch_size: int = 256,
        image_cache: str | Path | None = None,
        embedding_cache: str | Path | None = None,
        device: str | torch.device = "cpu",
        threads: int | None = 1,
    ) -> None:
        if threads is not None:
            if threads < 1:
                raise InputError(f"threads must be >= 1, got {threads}")
            torch.set_num_threads(int(threads))
        self.artifact = artifact
        self.cohort_dir = Path(cohort_dir)
        self.spec = artifact.spec
        self.target_prevalence = target_prevalence
        self.batch_size = int(batch_size)
        self.image_cache = image_cache
        self.device = torch.device(device)
        self.model = artifact.model.to(self.device).eval()
        self.ood = MahalanobisOOD(**artifact.ood) if artifact.ood else None
        self.has_genotypes = has_table(self.cohort_dir, GENOTYPES)
        set_embedding_cache(self.model, embedding_cache)
        self.features = file_feature_store(self.model, embedding_cache)
        self.headers = HeaderStore(None if image_cache is None else Path(image_cache) / "headers")

    def score(self, samples: pl.DataFrame) -> pl.DataFrame:
        """One output row per row of ``samples``, in order (see ``OUTPUT_SCHEMA``).

        A failing chunk is retried subject by subject; a subject that still fails
        gets error rows (risk null) carrying the reason.
        """
        return self.score_chunk(samples).rows

    def score_chunk(self, samples: pl.DataFrame) -> ScoredChunk:
        """``score``, with the count of rows that failed for a reason other than their
        input (``scoring.failures``): a chunk with any is not done."""
        return self.finish_chunk(samples, self.prepare(samples))

    def score_strict(self, samples: pl.DataFrame) -> pl.DataFrame:
        """Scores ``samples``; raises on the first subject whose inputs cannot be built."""
        inputs, batch = self._prepare_strict(samples)
        return self._forward_rows(samples, inputs, batch)

    def prepare(self, samples: pl.DataFrame) -> _Prepared:
        """Reads a chunk and builds its batch (the I/O half of ``score``); never raises.

        Safe to run in a second thread while ``finish`` runs the model on the
        previous chunk (see ``score_chunks``).
        """
        try:
            with torch.no_grad():
                return _Prepared(*self._prepare_strict(samples))
        except Exception as err:  # noqa: BLE001 - finish retries subject by subject
            return _Prepared(error=err)

    def finish(self, samples: pl.DataFrame, prepared: _Prepared) -> pl.DataFrame:
        """The model half of ``score``: forward passes and output rows of a prepared chunk."""
        return self.finish_chunk(samples, prepared).rows

    def finish_chunk(self, samples: pl.DataFrame, prepared: _Prepared) -> ScoredChunk:
        """``finish`` with its failed-row count (see ``score_chunk``).

        A cohort file that cannot be read fails every row of the chunk at once; any
        other error is narrowed down subject by subject.
        """
        try:
            if prepared.error is not None:
                raise prepared.error
            return ScoredChunk(self._forward_rows(samples, prepared.inputs, prepared.batch))
        except Exception as err:  # noqa: BLE001 - isolate the bad subject(s), keep going
            if isinstance(err, CohortUnreadable) or samples["subject_id"].n_unique() <= 1:
                return self._error_chunk(samples, err)
            groups = samples.partition_by("subject_id", maintain_order=True)
            return ScoredChunk.concat([self.score_chunk(group) for group in groups])

    def _error_chunk(self, samples: pl.DataFrame, err: BaseException) -> ScoredChunk:
        rows = error_rows(samples, err, self.artifact.model_id)
        if is_input_fault(err):
            return ScoredChunk(rows)
        return ScoredChunk(rows, rows.height, rows["error"][0] if rows.height else None)

    def score_chunks(
        self, chunks: Iterable[tuple[int, pl.DataFrame]], prefetch: bool = True
    ) -> Iterator[tuple[int, pl.DataFrame]]:
        """Scores ``(index, samples)`` chunks in order, yielding ``(index, rows)``
        (``scored_chunks`` without the failed-row counts)."""
        return ((index, scored.rows) for index, scored in self.scored_chunks(chunks, prefetch))

    def scored_chunks(
        self, chunks: Iterable[tuple[int, pl.DataFrame]], prefetch: bool = True
    ) -> Iterator[tuple[int, ScoredChunk]]:
        """Scores ``(index, samples)`` chunks in order, yielding ``(index, ScoredChunk)``.

        With ``prefetch``, one helper thread reads and builds chunk i + 1 (polars,
        numpy, DICOM decoding: mostly outside the GIL) while this thread runs the
        model on chunk i, so a second core is used when there is one. Rows are the
        same as with ``score``.
        """
        if not prefetch:
            yield from ((index, self.score_chunk(samples)) for index, samples in chunks)
            return
        from concurrent.futures import ThreadPoolExecutor

        queue = iter(chunks)
        with ThreadPoolExecutor(1, thread_name_prefix="clinfuse-prefetch") as pool:
            ahead = _submit_next(pool, self, queue)
            while ahead is not None:
                index, samples, future = ahead
                prepared = future.result()
                ahead = _submit_next(pool, self, queue)
                yield index, self.finish_chunk(samples, prepared)

    def _prepare_strict(self, samples: pl.DataFrame) -> tuple[ChunkInputs, dict[str, Any]]:
        """Inputs, batch, and the fingerprints and flags that need no model output."""
        inputs = self._read_inputs(samples)
        batch = self._batch(samples, inputs)
        inputs.headers = self._headers(inputs)
        inputs.columns = {
            "events_sha256": events_digests(inputs.windowed, samples.height),
            **image_columns(inputs),
        }
        inputs.marks = self._input_marks(samples, inputs, batch)
        return inputs, batch

    def _forward_rows(
        self, samples: pl.DataFrame, inputs: ChunkInputs, batch: dict[str, Any]
    ) -> pl.DataFrame:
        outputs = predict(self.model, batch, self.batch_size, self.device)
        return self._rows(samples, inputs, batch, outputs)

    def _read_inputs(self, samples: pl.DataFrame) -> ChunkInputs:
        with naming_file(self.cohort_dir, EVENTS):
            events = scan_events(self.cohort_dir, samples["subject_id"]).collect()
        windowed = window_events(events, samples, self.spec.window_hours).collect()
        with naming_file(self.cohort_dir, IMAGES):
            images = latest_images(self.cohort_dir, samples)
        paths = images["path"].drop_nulls().unique(maintain_order=True).to_list()
        ids = {p: path_identity(p) for p in paths}  # one stat and resolve per file
        loader = ImageLoader(self.spec.image_size)
        keys = {p: loader.key(p, i) if i else None for p, i in ids.items()}
        return ChunkInputs(windowed, images, ids, keys)

    def _headers(self, inputs: ChunkInputs) -> dict[str, Header]:
        """(SOPInstanceUID, sha256) per image file: from the header store, from the
        parse that decoded the file for this chunk, or read (``image_header``)."""
        ids = {p: i for p, i in inputs.ids.items() if i is not None}
        known = self.headers.lookup(list(ids.values()))
        found: dict[str, Header] = {}  # identity -> header, read for this chunk
        for path, identity in ids.items():
            key = inputs.keys[path]
            if identity in known:
                continue
            if key in inputs.decoded:
                found[identity] = decoded_image_header(path, inputs.decoded[key])
            else:
                found[identity] = image_header(path)
        self.headers.put(found)
        known |= found
        return {p: known[i] if i is not None else (None, None) for p, i in inputs.ids.items()}

    def _batch(self, samples: pl.DataFrame, inputs: ChunkInputs) -> dict[str, Any]:
        obs = channel_observations(inputs.windowed.lazy(), self.spec)
        batch: dict[str, Any] = pad_observations(obs, samples.height, self.spec)
        genotypes = scan(self.cohort_dir, GENOTYPES) if self.has_genotypes else None
        with naming_file(self.cohort_dir, GENOTYPES):
            batch.update(genotype_tensors(genotypes, samples, self.spec.markers))
        batch.update(sample_tensors(samples, self.spec.sites, self.spec.ancestries))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unreadable images become flags
            batch.update(self._images(inputs))
        batch["image_age"] = image_age(inputs.images, batch["image_present"])
        return batch

    def _images(self, inputs: ChunkInputs) -> dict[str, Tensor]:
        """Pixels, or the frozen backbone's stored features when the store is on.

        Shapes:
            -> image (B, 1, S, S) | image_pooled (B, F) and image_tokens (B, N, F);
            image_present (B,)
        """
        paths = inputs.images["path"].to_list()
        keys = [inputs.keys[p] if p else None for p in paths]
        loader = ImageLoader(self.spec.image_size, self.image_cache)
        inputs.decoded = loader.decoded_uids  # filled as files are decoded
        if self.features is None:
            image, present = loader.load_many(paths, keys)
            return {"image": image, "image_present": present}
        return self._stored_features(loader, inputs.keys, keys)

    def _stored_features(
        self, loader: ImageLoader, by_path: dict[str, str | None], keys: list[str | None]
    ) -> dict[str, Tensor]:
        """Per-sample features from the file-keyed store; missing files are decoded,
        encoded (through the content-hash cache) and stored first."""
        tokens = bool(self.model.fusion.uses_tokens)
        unique = list(dict.fromkeys(k for k in keys if k is not None))
        found = self.features.contains(unique, tokens)
        missing = [k for k, hit in zip(unique, found, strict=True) if not hit]
        if missing:
            paths = {k: p for p, k in by_path.items() if k is not None}
            self._store_features(loader, [paths[k] for k in missing], missing, tokens)
        present, pooled, toks = self.features.lookup(keys, tokens)  # one row per sample
        features = self._image_encoder().num_features
        return sample_features(features, torch.from_numpy(present), pooled, toks, tokens)

    def _store_features(
        self, loader: ImageLoader, paths: list[str], keys: list[str], tokens: bool
    ) -> None:
        encoder = self._image_encoder()
        for lo in range(0, len(paths), self.batch_size):
            part = slice(lo, lo + self.batch_size)
            images, present = loader.load_many(paths[part], keys[part])  # (b, 1, S, S)
            ok = present.nonzero().squeeze(1).tolist()  # unreadable files are not stored
            if not ok:
                continue
            pooled, toks = encoder.frozen_features(images[ok].to(self.device), tokens)
            self.features.put(
                [keys[part][i] for i in ok],
                pooled.cpu().numpy(),
                None if toks is None else toks.cpu().numpy(),
            )

    def _image_encoder(self) -> Any:
        return self.model.encoders["image"]

    def _rows(
        self,
        samples: pl.DataFrame,
        inputs: ChunkInputs,
        batch: dict[str, Any],
        outputs: dict[str, np.ndarray],
    ) -> pl.DataFrame:
        logit = outputs["logit"].astype(np.float64)
        top, top_delta = _top_modality(outputs)
        columns = {
            "subject_id": samples["subject_id"],
            "prediction_time": samples["prediction_time"],
            "risk": self._calibrated(logit),
            "risk_raw": _sigmoid(logit),
            **{f"{m}_present": outputs[f"present_{m}"] for m in MODALITIES},
            **self._ood_columns(outputs["fused"]),
            "top_modality": top,
            "top_modality_delta": top_delta,
            "model_id": pl.repeat(self.artifact.model_id, samples.height, eager=True),
            **inputs.columns,
            "flags": _flags(inputs.marks, outputs),
            "error": pl.repeat(None, samples.height, dtype=pl.String, eager=True),
        }
        return pl.DataFrame(columns, schema=OUTPUT_SCHEMA)

    def _calibrated(self, logit: np.ndarray) -> np.ndarray:
        z = self.artifact.calibrated_logit(logit)
        if self.target_prevalence is not None:
            z = prior_shift_logit(z, self.artifact.train_prevalence, self.target_prevalence)
        return _sigmoid(z)

    def _ood_columns(self, fused: np.ndarray) -> dict[str, Any]:
        if self.ood is None:
            return {"ood_score": [None] * len(fused), "ood_flag": [None] * len(fused)}
        score = self.ood.score(fused)
        return {"ood_score": score, "ood_flag": score > self.ood.threshold}

    def _input_marks(
        self, samples: pl.DataFrame, inputs: ChunkInputs, batch: dict[str, Any]
    ) -> dict[str, np.ndarray]:
        """The (B,) flags known before the forward pass, in output order."""
        has_path = inputs.images["path"].is_not_null().to_numpy()
        marks = event_flags(inputs.windowed, self.spec.channels, samples.height)
        marks["image_unreadable"] = has_path & ~batch["image_present"].numpy()
        marks["unknown_subject"] = ~samples["known_subject"].to_numpy()
        return marks


def _flags(marks: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> pl.Series:
    used = np.stack([outputs[f"present_{m}"] for m in MODALITIES], axis=1)  # (B, 3)
    return flag_lists({**marks, "no_modalities": ~used.any(axis=1)})


def flag_lists(marks: dict[str, np.ndarray]) -> pl.Series:
    """Per row, the names whose (B,) bool array is True there, in ``marks`` order."""
    table = pl.DataFrame({name: np.asarray(hit, dtype=bool) for name, hit in marks.items()})
    named = [pl.when(pl.col(name)).then(pl.lit(name)) for name in marks]
    return table.select(pl.concat_list(named).list.drop_nulls().alias("flags")).to_series()


def _top_modality(outputs: dict[str, np.ndarray]) -> tuple[list[str | None], np.ndarray]:
    deltas = np.stack([outputs[f"delta_{m}"] for m in MODALITIES], axis=1)  # (B, 3)
    used = np.stack([outputs[f"present_{m}"] for m in MODALITIES], axis=1)  # (B, 3)
    best = np.where(used, np.abs(deltas), -1.0).argmax(axis=1)  # (B,)
    any_used = used.any(axis=1)
    names = [MODALITIES[i] if ok else None for i, ok in zip(best, any_used, strict=True)]
    value = np.where(any_used, deltas[np.arange(len(best)), best], np.nan)
    return names, value


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, np.float64)))  # overflow-free logistic


def error_rows(samples: pl.DataFrame, err: BaseException, model_id: str) -> pl.DataFrame:
    """Rows with risk null and ``error`` naming the subject and the reason."""
    n = samples.height
    subject = samples["subject_id"][0] if n else None
    reason = f"subject_id {subject}: {type(err).__name__}: {err}"
    filled = {"model_id": model_id, "flags": [], "error": reason}
    columns = {
        name: samples[name] if name in samples.columns else [filled.get(name)] * n
        for name in OUTPUT_SCHEMA
    }
    return pl.DataFrame(columns, schema=OUTPUT_SCHEMA)


# ---------------------------------------------------------------------------- forward


@torch.no_grad()
def predict(
    model: torch.nn.Module, batch: dict[str, Any], batch_size: int, device: torch.device
) -> dict[str, np.ndarray]:
    """Logit, fused embedding, used modalities and leave-one-out deltas per sample.

    The encoders run once per mini-batch; each modality is then left out by
    re-fusing (``FusionModel.fuse_variants``: one token build for all variants).

    Returns:
        ``logit (B,)``, ``fused (B, D)``, and per modality in ``MODALITIES``:
        ``present_m (B,)`` bool (False when the model has no encoder for it) and
        ``delta_m (B,)`` = logit(all) - logit(without m), NaN where not used.
    """
    n = int(batch["label"].shape[0])
    parts = [
        _predict_one(model, _to(_slice(batch, lo, min(lo + batch_size, n)), device))
        for lo in range(0, n, max(1, batch_size))
    ]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _predict_one(model: torch.nn.Module, batch: dict[str, Any]) -> dict[str, np.ndarray]:
    embeddings, tokens = model.encode(batch)
    used = [m for m in MODALITIES if m in embeddings]
    runs = model.fuse_variants(embeddings, tokens, [(), *[[m] for m in used]])
    logit = runs["logit"][:, 0]  # (B,) all modalities; column 1 + i leaves used[i] out
    b = logit.shape[0]
    out = {"logit": logit, "fused": runs["fused"][:, 0]}
    for m in MODALITIES:
        if m not in used:
            out[f"present_{m}"] = torch.zeros(b, dtype=torch.bool)
            out[f"delta_{m}"] = torch.full((b,), float("nan"))
            continue
        present = runs["embeddings"][m][1].bool()
        left_out = runs["logit"][:, 1 + used.index(m)]
        out[f"present_{m}"] = present
        out[f"delta_{m}"] = (logit - left_out).masked_fill(~present, float("nan"))
    return {k: v.detach().float().cpu().numpy() if v.is_floating_point() else v.cpu().numpy()
            for k, v in out.items()}  # fmt: skip


def _slice(batch: dict[str, Any], lo: int, hi: int) -> dict[str, Any]:
    out = {k: v[lo:hi] for k, v in batch.items() if k != "confounds"}
    out["confounds"] = {k: v[lo:hi] for k, v in batch["confounds"].items()}
    return out


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    if device.type == "cpu":
        return batch
    out = {k: v.to(device) for k, v in batch.items() if k != "confounds"}
    out["confounds"] = {k: v.to(device) for k, v in batch["confounds"].items()}
    return out
