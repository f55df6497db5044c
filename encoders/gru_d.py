"""GRU-D: a GRU with trainable decays for irregular, partly observed vitals and labs.

Che et al. 2018, "Recurrent Neural Networks for Multivariate Time Series with
Missing Values" (Scientific Reports 8:6085). Two decays encode how stale the
information is:

    gamma_x = exp(-max(0, w_x * delta + b_x))           per channel (diagonal)
    x_hat   = m * x + (1 - m) * (gamma_x * x_last + (1 - gamma_x) * x_mean)
    gamma_h = exp(-max(0, W_h delta + b_h))             full (C -> H)
    h       = GRU([x_hat, m], gamma_h * h)

The GRU uses the "reset after" form of ``torch.nn.GRUCell`` (the reset gate
scales ``W_hn h + b_hn``), so the recurrent part is one (H, 3H) matmul per step.
Everything that does not depend on ``h`` (``x_last``, ``x_hat``, the input
projections of all three gates, ``gamma_h``) is computed for all steps at once.
The loop runs only over valid steps: samples are sorted by length and the active
batch shrinks as sequences end, so padded steps cost nothing and leave ``h``
unchanged. The loop itself is one autograd node with a hand-written backward pass
(``encoders.gru_d_recurrence``): per-step autograd bookkeeping cost more than the
step's arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clinfuse.datasets.spec import DataSpec
from clinfuse.encoders.base import ModalityEncoder, register_encoder
from clinfuse.encoders.gru_d_recurrence import grud_recurrence


@dataclass
class GRUDConfig:
    """GRU-D hyper-parameters.

    Attributes:
        hidden: H, the GRU state width.
        embed_dim: D, the width of the returned embedding and step tokens.
        dropout: dropout on the hidden states before the output projection.
        learn_mean: learn ``x_mean`` (the value a long gap decays to) instead of
            keeping the training mean, which is 0 in normalized space.
        time_inputs: also feed each step's position in time, ``[hours before
            prediction_time, hours since the first kept step] / 24``, to the GRU.
            GRU-D's own inputs only say how stale each channel is (``delta``), so the
            recurrence cannot tell an early value from a late one; a trend over the
            stay (the change from admission to now) needs both.
        delta_inputs: also feed ``log(1 + delta)``, each channel's hours since its
            last observation, to the GRU (as GRU-Simple does in Che et al. 2018).
            GRU-D uses ``delta`` only to decay the state and the imputed values, so how
            often a patient is charted, which the care team sets by how sick the
            patient looks, reaches the state only through those decays.
        baseline_inputs: also feed each channel's first observed value in the window
            (0, the mean, before it is seen) to the GRU, so each step can compare a
            value with the patient's own baseline; the decays make the state forget it.
        readout: what the embedding summarizes: ``"last"``, the state after the last
            valid step (GRU-D as published); ``"mean"``, the mean of the states over
            the valid steps; ``"attention"``, their softmax-weighted sum with weights
            ``softmax_t(w . h_t)`` over the valid steps; ``"recent"``, the same with a
            learned recency prior, ``softmax_t(w . h_t - age_t / tau)`` (``age_t`` hours
            before prediction_time, ``tau`` learned from 12 h): at ``w = 0`` an
            exponentially weighted mean of the latest states. A pooled readout hands
            the head several states, where the last one carries the last step's noise.
        forecast_weight: weight of a self-supervised loss added to the training loss
            (``regularization_loss``): each valid state ``h_t`` predicts the values
            observed at the next step, the mean over observed ``(t+1, c)`` of
            ``(x_{t+1,c} - (W_f h_t + b_f)_c)^2`` on standardized values. Every
            observation then trains the recurrence, not only each subject's one label.
            0 turns it off.
        summary_inputs: add a linear map of three window summaries per channel to the
            embedding, beside the recurrence's readout: the mean of the values observed
            in the last ``summary_hours`` before prediction_time (0 if none), the first
            value in the window (the patient's own baseline) and ``log(1 + n)`` of the
            number of observations (how often the care team charted it). The state
            decays what it saw early and averages nothing, so these reach the head
            straight (a wide-and-deep skip).
        summary_hours: the recent window of the first summary, in hours.
    """

    hidden: int = 64
    embed_dim: int = 64
    dropout: float = 0.0
    learn_mean: bool = False
    time_inputs: bool = False
    delta_inputs: bool = False
    baseline_inputs: bool = False
    readout: str = "last"
    forecast_weight: float = 0.0
    summary_inputs: bool = False
    summary_hours: float = 12.0


READOUTS = ("last", "mean", "attention", "recent")


@register_encoder("gru_d")
def gru_d(
    spec: DataSpec,
    hidden: int = 64,
    embed_dim: int = 64,
    dropout: float = 0.0,
    learn_mean: bool = False,
    time_inputs: bool = False,
    delta_inputs: bool = False,
    readout: str = "last",
    forecast_weight: float = 0.0,
    baseline_inputs: bool = False,
    summary_inputs: bool = False,
    summary_hours: float = 12.0,
) -> GRUD:
    """Builds a GRU-D encoder for ``spec.n_channels`` channels."""
    cfg = GRUDConfig(
        hidden,
        embed_dim,
        dropout,
        learn_mean,
        time_inputs,
        delta_inputs,
        baseline_inputs,
        readout,
        forecast_weight,
        summary_inputs,
        summary_hours,
    )
    return GRUD(spec.n_channels, **asdict(cfg))


class GRUD(ModalityEncoder):
    """GRU-D encoder over the ``ts_*`` keys of the batch.

    Args:
        n_channels: C, number of vitals/lab channels.
        hidden: H, GRU state width.
        embed_dim: D, output width.
        dropout: dropout on hidden states before the output projection.
        learn_mean: make ``x_mean`` a parameter (else a zero buffer).
        time_inputs: add ``W_it [t_before, t_since_first] / 24`` to the input gates
            (see ``GRUDConfig``).
        delta_inputs: add ``W_id log(1 + delta)`` to the input gates (see ``GRUDConfig``).
        baseline_inputs: add ``W_ib x_first`` to the input gates (see ``GRUDConfig``).
        readout: ``"last"``, ``"mean"`` or ``"attention"`` (see ``GRUDConfig``).
        forecast_weight: weight of the next-observation loss (see ``GRUDConfig``).
        summary_inputs: add ``W_s summaries`` to the embedding (see ``GRUDConfig``).
        summary_hours: the recent window of the summaries' mean, in hours.

    Shapes:
        - ts_values, ts_mask, ts_delta: (B, T, C)
        - ts_time: (B, T); ts_length, ts_present: (B,)
        - forward -> embedding (B, D), present (B,) bool
        - forward_tokens -> tokens (B, T, D), mask (B, T) bool, age (B, T)
    """

    modality = "timeseries"

    def __init__(
        self,
        n_channels: int,
        hidden: int = 64,
        embed_dim: int = 64,
        dropout: float = 0.0,
        learn_mean: bool = False,
        time_inputs: bool = False,
        delta_inputs: bool = False,
        baseline_inputs: bool = False,
        readout: str = "last",
        forecast_weight: float = 0.0,
        summary_inputs: bool = False,
        summary_hours: float = 12.0,
    ) -> None:
        super().__init__()
        if n_channels < 1:
            raise ValueError(f"GRU-D needs at least one channel, got n_channels={n_channels}")
        if readout not in READOUTS:
            raise ValueError(f"GRU-D readout must be one of {READOUTS}, got {readout!r}")
        if forecast_weight < 0:
            raise ValueError(f"GRU-D forecast_weight must be >= 0, got {forecast_weight}")
        if not summary_hours > 0:
            raise ValueError(f"GRU-D summary_hours must be > 0, got {summary_hours}")
        self.summary_hours = float(summary_hours)
        self.readout, self.forecast_weight = readout, forecast_weight
        self.n_channels, self.hidden, self.embed_dim = n_channels, hidden, embed_dim
        self.decay_x_weight = nn.Parameter(torch.empty(n_channels))  # diagonal W_gx
        self.decay_x_bias = nn.Parameter(torch.zeros(n_channels))
        self.decay_h = nn.Linear(n_channels, hidden)  # full W_gh, b_gh
        mean = torch.zeros(n_channels)
        if learn_mean:
            self.x_mean = nn.Parameter(mean)
        else:
            self.register_buffer("x_mean", mean)
        # GRU over [x_hat, m]: torch.nn.GRUCell layout, gates ordered (r, z, n).
        self.weight_ih = nn.Parameter(torch.empty(3 * hidden, 2 * n_channels))
        self.weight_hh = nn.Parameter(torch.empty(3 * hidden, hidden))
        self.bias_ih = nn.Parameter(torch.empty(3 * hidden))
        self.bias_hh = nn.Parameter(torch.empty(3 * hidden))
        # Separate from weight_ih so models without time inputs keep their weights.
        self.weight_it = nn.Parameter(torch.empty(3 * hidden, 2)) if time_inputs else None
        self.weight_id = nn.Parameter(torch.empty(3 * hidden, n_channels)) if delta_inputs else None
        self.weight_ib = (
            nn.Parameter(torch.empty(3 * hidden, n_channels)) if baseline_inputs else None
        )
        # One score per step state for the attention readout: softmax_t(w . h_t).
        scored = readout in ("attention", "recent")
        self.attn_score = nn.Linear(hidden, 1, bias=False) if scored else None
        # log tau of the "recent" readout's prior, in hours.
        self.log_tau = nn.Parameter(torch.tensor(math.log(12.0))) if readout == "recent" else None
        # W_f, b_f: the next step's values from the state (forecast_weight > 0).
        self.forecast = nn.Linear(hidden, n_channels) if forecast_weight > 0 else None
        self._forecast_loss: Tensor | None = None  # this training step's, until read
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(hidden, embed_dim)
        # W_s: the window summaries (3 per channel) straight into the embedding.
        self.summary_proj = (
            nn.Linear(3 * n_channels, embed_dim, bias=False) if summary_inputs else None
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GRU weights as ``nn.GRUCell``; input decay rates between 1/50 h and 1/5 h."""
        bound = 1.0 / math.sqrt(self.hidden)
        params = (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        for p in (*params, self.weight_it, self.weight_id, self.weight_ib):
            if p is not None:
                nn.init.uniform_(p, -bound, bound)
        if self.log_tau is not None:  # "recent" starts as an exponentially weighted mean
            nn.init.zeros_(self.attn_score.weight)
            nn.init.constant_(self.log_tau, math.log(12.0))
        # Positive rates so every channel decays (and gets gradient) from the start.
        nn.init.uniform_(self.decay_x_weight, 0.02, 0.2)
        nn.init.zeros_(self.decay_x_bias)

    def forward(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """Returns the projected readout (the last valid state, or the pooled states)
        and ``ts_present``.

        Shapes:
            - output: embedding (B, D), present (B,) bool
        """
        forecasting = self.forecast is not None and self.training
        keep = self.readout != "last" or forecasting
        h_last, states = self._run(batch, keep_states=keep)  # (B, H), (B, T, H) or None
        if forecasting:
            self._forecast_loss = self.forecast_loss(batch, states)
        summary = self._readout(batch, h_last, states)  # (B, H)
        return self._embed(batch, summary), _present(batch)

    def _embed(self, batch: dict[str, Any], summary: Tensor) -> Tensor:
        """The projected readout, plus the window summaries' map when configured. (B, D)"""
        emb = self.proj(self.dropout(summary))
        if self.summary_proj is not None:
            emb = emb + self.summary_proj(
                window_summaries(batch, self.n_channels, self.summary_hours)
            )
        return emb

    def forecast_loss(self, batch: dict[str, Any], states: Tensor) -> Tensor:
        """Mean squared error of ``W_f h_t + b_f`` against the values observed at t+1.

        Shapes:
            - states: (B, T, H), zero at padded steps
            - output: () scalar, 0 when no step has an observed successor
        """
        x, m, _, _ = _inputs(batch, self.n_channels)
        t = states.shape[1]
        valid = _step_mask(batch, t)[:, 1:].unsqueeze(-1)  # (B, T-1, 1): t+1 is a real step
        target_mask = m[:, 1:t] * valid  # (B, T-1, C)
        pred = self.forecast(states[:, :-1])  # (B, T-1, C)
        err = (pred - x[:, 1:t]).pow(2) * target_mask  # garbage at padded steps is masked out
        return err.sum() / target_mask.sum().clamp_min(1.0)

    def regularization_loss(self) -> Tensor:
        """``forecast_weight`` x the forecast loss of the last training forward pass.

        Read once: the training step adds it after the forward pass.
        """
        loss, self._forecast_loss = self._forecast_loss, None
        if loss is None:
            return torch.zeros((), device=self.proj.weight.device)
        return self.forecast_weight * loss

    def forward_tokens(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        """One token per time step: the projected hidden state after that step.

        Tokens at padded steps are the projection of a zero state (masked out).

        Shapes:
            - output: tokens (B, T, D), mask (B, T) bool, age (B, T) hours
        """
        return self.forward_with_tokens(batch)[2]

    def forward_with_tokens(
        self, batch: dict[str, Any]
    ) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor]]:
        """The embedding and the step tokens from ONE pass of the recurrence.

        Shapes:
            - output: (B, D), (B,), ((B, T, D), (B, T), (B, T))
        """
        h_last, states = self._run(batch, keep_states=True)  # (B, H), (B, T, H)
        if self.forecast is not None and self.training:
            self._forecast_loss = self.forecast_loss(batch, states)
        emb = self._embed(batch, self._readout(batch, h_last, states))  # (B, D)
        tokens = self.proj(self.dropout(states))  # (B, T, D)
        mask = _step_mask(batch, tokens.shape[1])
        return emb, _present(batch), (tokens, mask, batch["ts_time"].to(tokens.dtype))

    def _readout(self, batch: dict[str, Any], h_last: Tensor, states: Tensor | None) -> Tensor:
        """The (B, H) summary of the stay; padded steps (zero states) get no weight.

        A sample without steps gets the zero state, as with the ``"last"`` readout.
        """
        if self.readout == "last":
            return h_last
        mask = _step_mask(batch, states.shape[1]).unsqueeze(-1)  # (B, T, 1)
        if self.readout == "mean":
            return states.sum(1) / mask.sum(1).clamp_min(1)  # (B, H)
        score = self.attn_score(states)  # (B, T, 1)
        if self.log_tau is not None:  # recency prior: older steps weigh exp(-age / tau) less
            age = batch["ts_time"].to(states.dtype).unsqueeze(-1)  # (B, T, 1) hours
            score = score - age * torch.exp(-self.log_tau)
        score = score.masked_fill(~mask, float("-inf"))
        weight = torch.softmax(score, dim=1).nan_to_num(0.0)  # all-padded rows -> 0
        return (weight * states).sum(1)  # (B, H)

    # -- the recurrence ------------------------------------------------------------

    def _run(self, batch: dict[str, Any], keep_states: bool) -> tuple[Tensor, Tensor | None]:
        """Runs GRU-D; returns the last valid state (B, H) and, if asked, every state (B, T, H)."""
        x, m, delta, lengths = _inputs(batch, self.n_channels)
        order = torch.argsort(lengths, descending=True, stable=True)
        unsort = torch.argsort(order)
        # Sorted and time-major BEFORE the input projections: the (T, B, C) inputs are
        # narrow to copy, and each step's rows of gi and gamma_h come out contiguous.
        x, m, delta = (_time_major(v, order) for v in (x, m, delta))  # (T, B, C)
        x_hat = self.impute(x.transpose(0, 1), m.transpose(0, 1), delta.transpose(0, 1))
        gi_t = F.linear(torch.cat([x_hat.transpose(0, 1), m], -1), self.weight_ih, self.bias_ih)
        if self.weight_it is not None:
            gi_t = gi_t + F.linear(_time_features(batch, order), self.weight_it)  # (T, B, 3H)
        if self.weight_id is not None:
            gi_t = gi_t + F.linear(torch.log1p(delta), self.weight_id)  # (T, B, 3H)
        if self.weight_ib is not None:
            gi_t = gi_t + F.linear(first_observed(x, m), self.weight_ib)  # (T, B, 3H)
        gamma_t = self.hidden_decay(delta)  # (T, B, H)
        active = _active_counts(lengths[order], x.shape[0])
        states = grud_recurrence(gi_t, gamma_t, self.weight_hh, self.bias_hh, active)
        if states.shape[0] == 0:  # no steps at all: every state stays zero
            return states.new_zeros(states.shape[1], self.hidden)[unsort], states.transpose(0, 1)
        h_last = states[-1][unsort]  # ended sequences carry their last state: (B, H)
        if not keep_states:
            return h_last, None
        states = states.transpose(0, 1)[unsort]  # (B, T, H)
        return h_last, states * _step_mask(batch, states.shape[1]).unsqueeze(-1)

    # -- the decays (public so tests can check them against the paper) -------------

    def input_decay(self, delta: Tensor) -> Tensor:
        """gamma_x = exp(-max(0, w_x * delta + b_x)), elementwise per channel. (B, T, C)"""
        return _decay(delta * self.decay_x_weight + self.decay_x_bias)

    def hidden_decay(self, delta: Tensor) -> Tensor:
        """gamma_h = exp(-max(0, W_h delta + b_h)). (B, T, C) -> (B, T, H)"""
        return _decay(self.decay_h(delta))

    def impute(self, x: Tensor, m: Tensor, delta: Tensor) -> Tensor:
        """x_hat: observed values kept, missing ones decay from x_last toward x_mean.

        Shapes:
            - x, m, delta: (B, T, C)
            - output: (B, T, C)
        """
        x_last, seen = last_observed(x, m)  # (B, T, C)
        x_last = torch.where(seen, x_last, self.x_mean)  # never seen -> the mean
        gamma = self.input_decay(delta)
        return m * x + (1 - m) * (gamma * x_last + (1 - gamma) * self.x_mean)


def _decay(z: Tensor) -> Tensor:
    """exp(-max(0, z)); in place on ``z`` (a fresh tensor) when no gradient is recorded."""
    if z.requires_grad:
        return torch.exp(-F.relu(z))
    return z.clamp_min_(0.0).neg_().exp_()  # same kernels, no temporaries (inference)


def last_observed(x: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
    """The latest observed value of each channel at or before each step.

    A forward fill, one step at a time: (B, C) selections cost less than a cummax
    of step indices over the whole (B, T, C) tensor followed by a gather.

    Args:
        x: values (B, T, C).
        m: observation mask (B, T, C), 1 where observed.

    Returns:
        ``x_last`` (B, T, C), 0 where nothing was seen yet, and ``seen`` (B, T, C) bool.
    """
    observed = m > 0  # (B, T, C)
    x_last, seen = torch.empty_like(x), torch.empty_like(observed)
    value = x.new_zeros(x.shape[0], x.shape[2])  # (B, C)
    any_seen = torch.zeros_like(value, dtype=torch.bool)
    for t in range(x.shape[1]):
        value = torch.where(observed[:, t], x[:, t], value)
        any_seen = any_seen | observed[:, t]
        x_last[:, t], seen[:, t] = value, any_seen
    return x_last, seen


def first_observed(x: Tensor, m: Tensor) -> Tensor:
    """Each channel's first observed value, from its first observation on; 0 before.

    Shapes:
        x, m: (T, B, C) time-major values and 0/1 mask -> (T, B, C)
    """
    first = m * (m.cumsum(0) == 1)  # 1 only at each channel's first observation
    return (x * first).cumsum(0)


def window_summaries(batch: dict[str, Any], n_channels: int, recent_hours: float) -> Tensor:
    """Per channel: the mean of the values observed in the last ``recent_hours`` (0 if
    none), the first observed value (0 if never), ``log(1 + observations)``.

    Only valid steps (``t < ts_length``) count.

    Shapes:
        batch ts_* (B, T, C), ts_time (B, T) hours before prediction_time -> (B, 3C),
        the three blocks in that order
    """
    x, m, _, _ = _inputs(batch, n_channels)
    m = m * _step_mask(batch, x.shape[1]).unsqueeze(-1).to(x.dtype)  # (B, T, C)
    recent = (batch["ts_time"].to(x.dtype) <= recent_hours).to(x.dtype).unsqueeze(-1)
    mr = m * recent
    recent_mean = (x * mr).sum(1) / mr.sum(1).clamp_min(1.0)  # (B, C)
    first = (x * m * (m.cumsum(1) == 1)).sum(1)  # (B, C)
    count = torch.log1p(m.sum(1))  # (B, C)
    return torch.cat([recent_mean, first, count], dim=-1)


def _inputs(batch: dict[str, Any], n_channels: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Reads and checks the time-series tensors of the batch."""
    x, m, delta = (
        batch["ts_values"],
        batch["ts_mask"].to(batch["ts_values"].dtype),
        batch["ts_delta"],
    )
    if x.dim() != 3 or x.shape[-1] != n_channels:
        raise ValueError(
            f"ts_values must be (B, T, {n_channels}) for this encoder, got {tuple(x.shape)}"
        )
    if m.shape != x.shape or delta.shape != x.shape:
        raise ValueError(
            f"ts_mask {tuple(m.shape)} and ts_delta {tuple(delta.shape)} must match "
            f"ts_values {tuple(x.shape)}"
        )
    lengths = batch["ts_length"].long().clamp(0, x.shape[1])
    return x, m, delta, lengths


def _time_features(batch: dict[str, Any], order: Tensor) -> Tensor:
    """Per step ``[hours before prediction_time, hours since the first kept step] / 24``.

    Shapes:
        batch["ts_time"]: (B, T) hours before prediction_time -> (T, B, 2), time-major
        in ``order``
    """
    t = batch["ts_time"].to(batch["ts_values"].dtype)  # (B, T)
    since_first = (t[:, :1] - t).clamp_min(0.0)  # the first step is the earliest
    feats = torch.stack([t, since_first], dim=-1) / 24.0  # (B, T, 2)
    return _time_major(feats, order)


def _time_major(x: Tensor, order: Tensor) -> Tensor:
    """Batch rows in ``order``, time first, contiguous. (B, T, C) -> (T, B, C)"""
    return x.index_select(0, order).transpose(0, 1).contiguous()


def _active_counts(sorted_lengths: Tensor, t_max: int) -> list[int]:
    """How many sequences (sorted by decreasing length) are still running at each step."""
    steps = torch.arange(t_max, device=sorted_lengths.device)
    return (sorted_lengths.unsqueeze(1) > steps).sum(0).tolist()


def _present(batch: dict[str, Any]) -> Tensor:
    """ts_present if given, else ts_length > 0. (B,) bool"""
    if "ts_present" in batch:
        return batch["ts_present"].bool()
    return batch["ts_length"] > 0


def _step_mask(batch: dict[str, Any], t: int) -> Tensor:
    """True at valid steps, t < ts_length. (B, T) bool"""
    steps = torch.arange(t, device=batch["ts_length"].device)
    return steps.unsqueeze(0) < batch["ts_length"].unsqueeze(1)
