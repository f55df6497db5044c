from __future__ import annotations

import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import clinfuse._compat as _compat  # noqa: E402

_compat.ensure_torchvision_importable()


# --- Tiny DataSpec / batch / test-only encoders shared by fusion and contract tests ---

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from clinfuse.datasets.spec import DataSpec  # noqa: E402
from clinfuse.encoders.base import ModalityEncoder  # noqa: E402

TINY_B, TINY_T, TINY_PX = 4, 6, 32


@pytest.fixture
def tiny_spec() -> DataSpec:
    """4 channels, 12 markers in 3 groups, 32 px images, 3 sites, 2 ancestries."""
    return DataSpec(
        channels=["hr", "sbp", "spo2", "lactate"],
        channel_mean=[80.0, 120.0, 97.0, 1.5],
        channel_std=[12.0, 15.0, 2.0, 0.8],
        markers=[f"rs{i}" for i in range(12)],
        marker_groups=[i // 4 for i in range(12)],
        groups=["g0", "g1", "g2"],
        marker_mean=[0.6] * 12,
        image_size=TINY_PX,
        sites=["a", "b", "c"],
        ancestries=["x", "y"],
        max_steps=TINY_T,
        window_hours=72.0,
        pos_weight=3.0,
    )


def make_tiny_batch(spec: DataSpec, batch_size: int = TINY_B, seed: int = 0) -> dict:
    """A batch in the contract of ``datasets/batch.py``; sample i (i = 1, 2, 3) lacks one modality."""
    g = torch.Generator().manual_seed(seed)
    b, t, c, m = batch_size, spec.max_steps, spec.n_channels, spec.n_markers
    batch = {"image": torch.rand(b, 1, spec.image_size, spec.image_size, generator=g)}
    batch["image_present"] = torch.ones(b, dtype=torch.bool)
    batch["image_age"] = torch.rand(b, generator=g) * 48
    length = torch.randint(2, t + 1, (b,), generator=g)
    steps = torch.arange(t).unsqueeze(0) < length.unsqueeze(1)  # (B, T)
    mask = (torch.rand(b, t, c, generator=g) < 0.6).float() * steps.unsqueeze(-1)
    batch["ts_values"] = torch.randn(b, t, c, generator=g) * mask
    batch["ts_mask"] = mask
    batch["ts_delta"] = torch.rand(b, t, c, generator=g) * 4
    gaps = torch.rand(b, t, generator=g) * 5
    batch["ts_time"] = (gaps.flip(1).cumsum(1).flip(1) - gaps[:, -1:]) * steps  # decreasing
    batch["ts_length"] = length
    batch["ts_present"] = length > 0
    batch["genotype"] = torch.randint(0, 3, (b, m), generator=g).float()
    batch["genotype_mask"] = (torch.rand(b, m, generator=g) < 0.9).float()
    batch["genotype"] *= batch["genotype_mask"]
    batch["genotype_present"] = torch.ones(b, dtype=torch.bool)
    batch["label"] = torch.tensor([1.0, 0.0, 1.0, 0.0]).repeat(b)[:b]
    batch["confounds"] = {
        "site": torch.arange(b) % len(spec.sites),
        "ancestry": torch.arange(b) % len(spec.ancestries),
    }
    batch["subject_id"] = torch.arange(100, 100 + b)
    batch["prediction_time"] = torch.full((b,), 1_700_000_000_000_000)
    for i, modality in zip((1, 2, 3), ("image", "timeseries", "genomics"), strict=False):
        if i < b:
            _blank(batch, modality, torch.arange(b) == i)
    return batch


def mask_out(batch: dict, modality: str) -> dict:
    """A copy of ``batch`` with ``modality`` missing for every sample."""
    out = {k: (v.clone() if torch.is_tensor(v) else dict(v)) for k, v in batch.items()}
    _blank(out, modality, torch.ones(out["label"].shape[0], dtype=torch.bool))
    return out


def _blank(batch: dict, modality: str, rows: torch.Tensor) -> None:
    """Marks ``modality`` missing for ``rows`` the way the data pipeline does."""
    if modality == "image":
        batch["image"][rows] = 0.0
        batch["image_present"][rows] = False
        batch["image_age"][rows] = 0.0
    elif modality == "timeseries":
        for key in ("ts_values", "ts_mask", "ts_delta", "ts_time"):
            batch[key][rows] = 0.0
        batch["ts_length"][rows] = 0
        batch["ts_present"][rows] = False
    else:
        batch["genotype"][rows] = 0.0
        batch["genotype_mask"][rows] = 0.0
        batch["genotype_present"][rows] = False


@pytest.fixture
def tiny_batch(tiny_spec: DataSpec) -> dict:
    return make_tiny_batch(tiny_spec)


class ToyImageEncoder(ModalityEncoder):
    """Test-only: a strided conv; patch tokens (width 8) and a pooled embedding (width 6)."""

    modality = "image"

    def __init__(self, embed_dim: int = 6, token_dim: int = 8) -> None:
        super().__init__()
        self.embed_dim, self.token_dim = embed_dim, token_dim
        self.conv = nn.Conv2d(1, token_dim, kernel_size=4, stride=4)
        self.proj = nn.Linear(token_dim, embed_dim)

    def forward_tokens(self, batch: dict):
        feats = torch.relu(self.conv(batch["image"])).flatten(2).transpose(1, 2)  # (B, P, 8)
        present = batch["image_present"]
        mask = present.unsqueeze(1).expand(-1, feats.shape[1])
        age = batch["image_age"].unsqueeze(1).expand(-1, feats.shape[1])
        return feats, mask, age

    def forward(self, batch: dict):
        feats, _, _ = self.forward_tokens(batch)
        return self.proj(feats.mean(dim=1)), batch["image_present"]


class ToyTimeSeriesEncoder(ModalityEncoder):
    """Test-only: per-step linear tokens of [values, mask], mean over valid steps."""

    modality = "timeseries"

    def __init__(self, n_channels: int, embed_dim: int = 5) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.step = nn.Linear(2 * n_channels, embed_dim)

    def forward_tokens(self, batch: dict):
        x = torch.cat([batch["ts_values"], batch["ts_mask"]], dim=-1)  # (B, T, 2C)
        t = batch["ts_values"].shape[1]
        mask = torch.arange(t).unsqueeze(0) < batch["ts_length"].unsqueeze(1)  # (B, T)
        return torch.tanh(self.step(x)), mask, batch["ts_time"]

    def forward(self, batch: dict):
        tokens, mask, _ = self.forward_tokens(batch)
        w = mask.float().unsqueeze(-1)
        emb = (tokens * w).sum(1) / w.sum(1).clamp_min(1.0)
        return emb, batch["ts_length"] > 0


class ToyGenomicsEncoder(ModalityEncoder):
    """Test-only: a linear layer over [dosage, call mask]; pooled only (no tokens)."""

    modality = "genomics"

    def __init__(self, n_markers: int, embed_dim: int = 7) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.lin = nn.Linear(2 * n_markers, embed_dim)

    def forward(self, batch: dict):
        x = torch.cat([batch["genotype"], batch["genotype_mask"]], dim=-1)
        return torch.tanh(self.lin(x)), batch["genotype_present"]


def make_toy_encoders(spec: DataSpec) -> dict[str, ModalityEncoder]:
    return {
        "image": ToyImageEncoder(),
        "timeseries": ToyTimeSeriesEncoder(spec.n_channels),
        "genomics": ToyGenomicsEncoder(spec.n_markers),
    }


@pytest.fixture
def toy_encoders(tiny_spec: DataSpec) -> dict[str, ModalityEncoder]:
    """Fresh test-only encoders, one per modality (seeded)."""
    torch.manual_seed(0)
    return make_toy_encoders(tiny_spec)


@pytest.fixture
def batch_factory():
    """``make_tiny_batch(spec, batch_size=4, seed=0)``: more tiny batches."""
    return make_tiny_batch


@pytest.fixture
def mask_modality():
    """``mask_out(batch, modality)``: a copy with the modality missing for every sample."""
    return mask_out


@pytest.fixture
def toy_encoder_factory():
    """``make_toy_encoders(spec)``: fresh test-only encoders, one per modality."""
    return make_toy_encoders


# --- A tiny end-to-end run configuration shared by training, scoring, reliability and
# model-card tests: the demo preset shrunk to 32 px films, 16-wide encoders, one epoch.

TINY_RUN_OVERRIDES = (
    "data.image_size=32", "data.batch_size=32", "data.max_steps=32", "optim.max_epochs=1",
    "optim.progress_bar=false", "model.encoders.timm_image.embed_dim=16",
    "model.encoders.gru_d.hidden=16", "model.encoders.gru_d.embed_dim=16",
    "model.encoders.sgl_mlp.hidden=[16]", "model.encoders.sgl_mlp.embed_dim=16",
    "model.fusion.cfg.dim=16", "model.fusion.cfg.heads=2",
    # 120-subject cohorts are too small to choose genes on (the demo preset's path keeps
    # none there): the tiny runs train the fixed-penalty genotype encoder, and the path
    # has its own tests (tests/encoders/test_sgl_*.py, test_run.py's genes_chosen).
    "model.encoders.sgl_mlp.select=fixed", "model.encoders.sgl_mlp.lambda_=0.005",
    # The gene x environment term reads the genes the path kept for their interaction,
    # so it goes with the path (tests/fusion/test_gene_environment.py, test_run.py).
    "model.gene_environment=null",
)  # fmt: skip


def _tiny_run_config(cohort, *extra: str):
    from clinfuse.training.config import load_run_config
    from clinfuse.training.demo import DEMO_CONFIG

    return load_run_config(DEMO_CONFIG, [*TINY_RUN_OVERRIDES, f"cohort={cohort}", *extra])


@pytest.fixture(scope="session")
def tiny_run_config():
    """Builds the tiny demo RunConfig for a cohort, with extra ``key=value`` overrides."""
    return _tiny_run_config
