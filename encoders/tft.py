"""A Temporal Fusion Transformer encoder over an hourly grid of vitals and labs.

Lim et al. 2021, "Temporal Fusion Transformers for interpretable multi-horizon
time series forecasting" (Int. J. Forecasting 37:1748). The irregular events of the
batch are resampled on the fly to the last ``hours`` hourly bins before
prediction time (last observation carried forward, plus a per-channel "observed in
this bin" mask). Then, per TFT:

    per-bin variable selection over channels ([value, mask] each)
    -> LSTM -> gate/add/norm -> GRN enrichment
    -> causal interpretable multi-head attention -> gate/add/norm -> GRN
    -> gate/add/norm with the LSTM output

The building blocks (``VariableSelectionNetwork``, ``GatedResidualNetwork``,
``GateAddNorm``, ``InterpretableMultiHeadAttention``) are pytorch-forecasting's own;
its full ``TemporalFusionTransformer`` is not used because it is bound to a
``TimeSeriesDataSet`` and a forecasting decoder, while here the batch tensors come
from the clinfuse DataModule and the output is an embedding, not a forecast.
pytorch-forecasting is imported when an encoder is built (importing it pulls in
Lightning and takes seconds), so registering this encoder stays cheap.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from clinfuse.datasets.spec import DataSpec
from clinfuse.encoders.base import ModalityEncoder, register_encoder


@dataclass
class TFTConfig:
    """TFT encoder hyper-parameters.

    Attributes:
        hours: length of the hourly grid (the last ``hours`` hours before prediction).
        hidden: TFT state width (``hidden_size``); divisible by ``heads`` is advised.
        var_dim: width each channel's [value, mask] is scaled to before variable
            selection (TFT's ``hidden_continuous_size``).
        heads: attention heads.
        embed_dim: D, the width of the embedding and the bin tokens.
        dropout: dropout inside the gated blocks and the attention.
    """

    hours: int = 48
    hidden: int = 32
    var_dim: int = 8
    heads: int = 4
    embed_dim: int = 64
    dropout: float = 0.1


@register_encoder("tft")
def tft(
    spec: DataSpec,
    hours: int = 48,
    hidden: int = 32,
    var_dim: int = 8,
    heads: int = 4,
    embed_dim: int = 64,
    dropout: float = 0.1,
) -> TFTEncoder:
    """Builds a TFT encoder for ``spec.n_channels`` channels."""
    cfg = TFTConfig(hours, hidden, var_dim, heads, embed_dim, dropout)
    return TFTEncoder(spec.n_channels, **asdict(cfg))


def hourly_grid(
    values: Tensor, mask: Tensor, time: Tensor, length: Tensor, hours: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Resamples irregular steps to ``hours`` hourly bins ending at prediction time.

    Bin k (k = 0 .. hours-1, oldest first) covers ages [g_k, g_k + 1) hours before
    prediction time, with g_k = hours - 1 - k. Its value is the channel's latest
    observation at age >= g_k (carried forward, including observations older than
    the grid); its mask is 1 if the channel was observed inside the bin.

    Args:
        values: normalized values, read only where ``mask`` is 1.
        mask: 1 where observed.
        time: age of each step in hours before prediction time, non-increasing
            over the valid steps.
        length: number of valid steps per sample.
        hours: number of bins.

    Returns:
        ``grid_values`` (0 before a channel's first observation), ``grid_mask``,
        ``seen`` (True once the channel has any value) and the bin ages g_k.

    Shapes:
        - values, mask: (B, T, C); time: (B, T); length: (B,)
        - output: (B, hours, C), (B, hours, C), (B, hours, C) bool, (B, hours)
    """
    valid = torch.arange(values.shape[1], device=values.device) < length.unsqueeze(1)  # (B, T)
    _check_time_order(time, valid)
    step_bin = (hours - 1 - torch.floor(time)).long().clamp(min=-1)  # (B, T), -1: older
    step_bin = torch.where(valid, step_bin, hours)  # padding sorts after every bin
    observed = (mask > 0) & valid.unsqueeze(-1)  # (B, T, C)
    last = _last_step_per_bin(observed, step_bin, hours)  # (B, hours, C)
    seen = last >= 0
    padded = torch.cat([values.new_zeros(values.shape[0], 1, values.shape[2]), values], 1)
    grid_values = torch.gather(padded, 1, last + 1)  # never seen -> the leading zero row
    grid_mask = _observed_in_bin(observed, step_bin, hours)
    ages = torch.arange(hours - 1, -1, -1, device=values.device, dtype=values.dtype)
    return grid_values, grid_mask, seen, ages.expand(values.shape[0], hours)


def _last_step_per_bin(observed: Tensor, step_bin: Tensor, hours: int) -> Tensor:
    """Index of the latest observed step at or before each bin's end, -1 if none.

    Shapes:
        - observed: (B, T, C) bool; step_bin: (B, T) non-decreasing
        - output: (B, hours, C) int64
    """
    b, t, c = observed.shape
    steps = torch.arange(t, device=observed.device).view(1, t, 1)
    last = torch.where(observed, steps, -1).cummax(dim=1).values  # (B, T, C)
    last = torch.cat([last.new_full((b, 1, c), -1), last], 1)  # (B, T+1, C)
    bins = torch.arange(hours, device=observed.device).expand(b, hours).contiguous()
    n_upto = torch.searchsorted(step_bin.contiguous(), bins, right=True)  # (B, hours)
    return torch.gather(last, 1, n_upto.unsqueeze(-1).expand(b, hours, c))


def _observed_in_bin(observed: Tensor, step_bin: Tensor, hours: int) -> Tensor:
    """1 where the channel has an observation inside the bin. (B, hours, C) float"""
    b, _, c = observed.shape
    index = torch.where(step_bin < 0, hours, step_bin).unsqueeze(-1).expand_as(observed)
    out = observed.new_zeros(b, hours + 1, c, dtype=torch.float32)  # last slot: outside
    out = out.scatter_reduce(1, index, observed.float(), reduce="amax")
    return out[:, :hours]


def _check_time_order(time: Tensor, valid: Tensor) -> None:
    """Raises if ``ts_time`` increases between consecutive valid steps."""
    both = valid[:, 1:] & valid[:, :-1]
    rising = (time[:, 1:] > time[:, :-1]) & both
    if rising.any():
        row, step = (int(i) for i in rising.nonzero()[0])
        raise ValueError(
            f"ts_time must be non-increasing (hours before prediction_time) along the "
            f"valid steps; sample {row} goes from {time[row, step].item():.3f} at step "
            f"{step} to {time[row, step + 1].item():.3f}"
        )


class TFTEncoder(ModalityEncoder):
    """TFT over hourly-resampled vitals; the embedding is the output at the last bin.

    Args:
        n_channels: C, number of vitals/lab channels.
        hours: number of hourly bins (tokens).
        hidden: TFT state width.
        var_dim: per-channel width before variable selection.
        heads: attention heads.
        embed_dim: D, output width.
        dropout: dropout in gated blocks and attention.

    Shapes:
        - batch ts_values, ts_mask: (B, T, C); ts_time: (B, T); ts_length: (B,)
        - forward -> embedding (B, D), present (B,) bool
        - forward_tokens -> tokens (B, hours, D), mask (B, hours) bool, age (B, hours)
    """

    modality = "timeseries"

    def __init__(
        self,
        n_channels: int,
        hours: int = 48,
        hidden: int = 32,
        var_dim: int = 8,
        heads: int = 4,
        embed_dim: int = 64,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        from pytorch_forecasting.models.temporal_fusion_transformer import sub_modules as pf

        if n_channels < 1 or hours < 1:
            raise ValueError(f"TFT needs n_channels >= 1 and hours >= 1, got {n_channels}, {hours}")
        self.n_channels, self.hours, self.embed_dim = n_channels, hours, embed_dim
        names = [f"ch{i}" for i in range(n_channels)]
        self.selection = pf.VariableSelectionNetwork(
            input_sizes=dict.fromkeys(names, var_dim),
            hidden_size=hidden,
            dropout=dropout,
            prescalers={n: nn.Linear(2, var_dim) for n in names},  # [value, mask] -> var_dim
        )
        self.lstm = nn.LSTM(hidden, hidden, batch_first=True)
        self.post_lstm = pf.GateAddNorm(hidden, dropout=dropout)
        self.enrichment = pf.GatedResidualNetwork(hidden, hidden, hidden, dropout)
        self.attention = pf.InterpretableMultiHeadAttention(heads, hidden, dropout=dropout)
        self.post_attention = pf.GateAddNorm(hidden, dropout=dropout)
        self.positionwise = pf.GatedResidualNetwork(hidden, hidden, hidden, dropout)
        self.pre_output = pf.GateAddNorm(hidden, dropout=None)
        self.proj = nn.Linear(hidden, embed_dim)
        self.names = names

    def forward(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """The projected output at the bin ending at prediction time.

        Shapes:
            - output: embedding (B, D), present (B,) bool
        """
        tokens, _, _ = self.forward_tokens(batch)  # (B, hours, D)
        return tokens[:, -1], _present(batch)

    def forward_tokens(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        """One token per hourly bin; bins before the first observation are masked.

        Shapes:
            - output: tokens (B, hours, D), mask (B, hours) bool, age (B, hours) hours
        """
        grid_values, grid_mask, seen, ages = self.resample(batch)
        started = seen.any(-1)  # (B, hours)
        out = self._temporal(grid_values, grid_mask, started)  # (B, hours, hidden)
        return self.proj(out), started, ages

    def resample(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The batch's ``ts_*`` tensors on this encoder's hourly grid (see ``hourly_grid``)."""
        values = batch["ts_values"]
        if values.dim() != 3 or values.shape[-1] != self.n_channels:
            raise ValueError(
                f"ts_values must be (B, T, {self.n_channels}) for this encoder, "
                f"got {tuple(values.shape)}"
            )
        length = batch["ts_length"].long().clamp(0, values.shape[1])
        return hourly_grid(values, batch["ts_mask"], batch["ts_time"], length, self.hours)

    def variable_weights(self, batch: dict[str, Any]) -> Tensor:
        """Variable-selection weight of each channel in each bin. (B, hours, C)"""
        grid_values, grid_mask, _, _ = self.resample(batch)
        _, weights = self.selection(self._channel_inputs(grid_values, grid_mask))
        return weights.squeeze(-2)

    def _temporal(self, grid_values: Tensor, grid_mask: Tensor, started: Tensor) -> Tensor:
        """The TFT stack over the grid. (B, hours, C) x2, (B, hours) -> (B, hours, hidden)"""
        selected, _ = self.selection(self._channel_inputs(grid_values, grid_mask))
        lstm_out, _ = self.lstm(selected)  # (B, hours, hidden)
        local = self.post_lstm(lstm_out, selected)
        enriched = self.enrichment(local)
        attended, _ = self.attention(enriched, enriched, enriched, mask=_attention_mask(started))
        out = self.positionwise(self.post_attention(attended, enriched))
        return self.pre_output(out, local)

    def _channel_inputs(self, grid_values: Tensor, grid_mask: Tensor) -> dict[str, Tensor]:
        """Per-channel [value, mask] pairs keyed for the variable selection network."""
        pairs = torch.stack([grid_values, grid_mask], -1)  # (B, hours, C, 2)
        return {name: pairs[:, :, i] for i, name in enumerate(self.names)}


def _attention_mask(started: Tensor) -> Tensor:
    """True where a query bin must not see a key bin: the future, or before any data.

    A query with no allowed key attends uniformly (finite), and its token is masked.

    Shapes:
        - started: (B, hours) bool
        - output: (B, hours, hours) bool
    """
    hours = started.shape[1]
    future = torch.ones(hours, hours, dtype=torch.bool, device=started.device).triu(1)
    return future.unsqueeze(0) | ~started.unsqueeze(1)


def _present(batch: dict[str, Any]) -> Tensor:
    """ts_present if given, else ts_length > 0. (B,) bool"""
    if "ts_present" in batch:
        return batch["ts_present"].bool()
    return batch["ts_length"] > 0
