"""The TFT encoder: hourly resampling by hand, causality, contract behaviour."""

from __future__ import annotations

import pytest
import torch

from clinfuse.datasets.spec import DataSpec
from clinfuse.encoders import create_encoder, list_encoders
from clinfuse.encoders.tft import TFTEncoder, hourly_grid

C, HOURS, D = 3, 6, 5


@pytest.fixture(scope="module")
def enc() -> TFTEncoder:
    torch.manual_seed(0)
    spec = DataSpec(channels=["hr", "sbp", "lactate"])
    model = create_encoder("tft", spec=spec, hours=HOURS, hidden=8, var_dim=4, heads=2, embed_dim=D)
    return model.eval()


def _batch(lengths: list[int], t_max: int, seed: int = 0) -> dict:
    """Random irregular steps within the last 8 h; padded steps hold garbage."""
    g = torch.Generator().manual_seed(seed)
    b = len(lengths)
    mask = (torch.rand(b, t_max, C, generator=g) < 0.5).float()
    values = torch.randn(b, t_max, C, generator=g) * mask
    time = torch.sort(torch.rand(b, t_max, generator=g) * 8, 1, descending=True).values
    length = torch.tensor(lengths, dtype=torch.int64)
    pad = torch.arange(t_max).unsqueeze(0) >= length.unsqueeze(1)
    values[pad], mask[pad], time[pad] = 99.0, 1.0, 0.0
    return dict(
        ts_values=values,
        ts_mask=mask,
        ts_delta=torch.zeros_like(values),
        ts_time=time,
        ts_length=length,
        ts_present=length > 0,
    )


def test_hourly_grid_hand_example():
    # ages (h before prediction) of 6 valid steps, then one padded step of garbage
    time = torch.tensor([[5.5, 3.2, 2.9, 2.1, 1.0, 0.4, 0.1]])
    nan = 0.0
    values = torch.tensor(
        [[[1.0, nan, nan], [nan, -1.0, nan], [2.0, nan, nan], [3.0, nan, nan],
          [nan, nan, 7.0], [nan, 4.0, nan], [99.0, 99.0, 99.0]]]
    )  # fmt: skip
    mask = (values != 0).float()
    grid, grid_mask, seen, ages = hourly_grid(values, mask, time, torch.tensor([6]), hours=4)
    # bins: [3,4) [2,3) [1,2) [0,1) hours before prediction time
    assert ages[0].tolist() == [3.0, 2.0, 1.0, 0.0]
    assert grid[0, :, 0].tolist() == [1.0, 3.0, 3.0, 3.0]  # 5.5 h carried in; 2.1 h latest
    assert grid_mask[0, :, 0].tolist() == [0.0, 1.0, 0.0, 0.0]
    assert grid[0, :, 1].tolist() == [-1.0, -1.0, -1.0, 4.0]
    assert grid_mask[0, :, 1].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert grid[0, :, 2].tolist() == [0.0, 0.0, 7.0, 7.0]  # age 1.0 falls in [1, 2)
    assert grid_mask[0, :, 2].tolist() == [0.0, 0.0, 1.0, 0.0]
    assert seen[0, :, 2].tolist() == [False, False, True, True]


def test_hourly_grid_empty_sample_and_bad_order():
    values = torch.ones(1, 2, C)
    mask = torch.ones(1, 2, C)
    grid, grid_mask, seen, _ = hourly_grid(
        values, mask, torch.tensor([[3.0, 1.0]]), torch.tensor([0]), 4
    )
    assert not grid.any() and not grid_mask.any() and not seen.any()
    with pytest.raises(ValueError, match="sample 0 goes from 1.000 at step 0 to 3.000"):
        hourly_grid(values, mask, torch.tensor([[1.0, 3.0]]), torch.tensor([2]), 4)


def test_registered_shapes_and_finite(enc):
    assert "tft" in list_encoders() and enc.embed_dim == D
    batch = _batch([5, 0, 3, 7], t_max=7)
    emb, present = enc(batch)
    tokens, mask, age = enc.forward_tokens(batch)
    assert emb.shape == (4, D) and present.tolist() == [True, False, True, True]
    assert tokens.shape == (4, HOURS, D) and mask.shape == age.shape == (4, HOURS)
    assert torch.isfinite(emb).all() and torch.isfinite(tokens).all()
    assert not mask[1].any() and mask[:, -1].tolist() == [True, False, True, True]
    assert age[0].tolist() == [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]
    weights = enc.variable_weights(batch)
    assert torch.allclose(weights.sum(-1), torch.ones(4, HOURS), atol=1e-5)


def test_missing_modality_is_finite(enc):
    emb, present = enc(_batch([0, 0], t_max=3))
    assert torch.isfinite(emb).all() and not present.any()
    emb, present = enc(_batch([0], t_max=0))
    assert emb.shape == (1, D) and torch.isfinite(emb).all()


def test_padding_invariance(enc):
    short = _batch([4, 2], t_max=4, seed=1)
    long = _batch([4, 2], t_max=9, seed=2)
    for key in ("ts_values", "ts_mask", "ts_time"):
        long[key][:, :4] = short[key]
    with torch.no_grad():
        assert torch.allclose(enc(short)[0], enc(long)[0], atol=1e-6)


def test_no_look_ahead_between_bins(enc):
    """Changing the newest observation leaves the tokens of every earlier bin unchanged."""
    batch = _batch([6], t_max=6, seed=3)
    batch["ts_time"][0] = torch.tensor([5.5, 4.5, 3.5, 2.5, 1.5, 0.5])
    batch["ts_mask"][0, -1] = 1.0
    changed = {k: v.clone() for k, v in batch.items()}
    changed["ts_values"][0, -1] += 3.0
    with torch.no_grad():
        before, _, _ = enc.forward_tokens(batch)
        after, _, _ = enc.forward_tokens(changed)
    assert torch.allclose(before[:, :-1], after[:, :-1], atol=1e-6)
    assert not torch.allclose(before[:, -1], after[:, -1], atol=1e-4)
    with torch.no_grad():  # the embedding is the newest bin's output, so it sees the change
        assert torch.equal(enc(batch)[0], before[:, -1])
        assert not torch.allclose(enc(changed)[0], enc(batch)[0], atol=1e-4)


def test_gradient_reaches_every_parameter(enc):
    enc.train()
    try:
        batch = _batch([7, 3, 0, 5], t_max=7, seed=4)
        emb, _ = enc(batch)
        tokens, mask, _ = enc.forward_tokens(batch)
        enc.zero_grad()
        (emb.pow(2).sum() + tokens[mask].sum()).backward()
        for name, p in enc.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    finally:
        enc.eval()
