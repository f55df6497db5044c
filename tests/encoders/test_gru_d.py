"""GRU-D against the equations of Che et al. 2018 and the encoder contract."""

from __future__ import annotations

import math

import pytest
import torch

from clinfuse.datasets.spec import DataSpec
from clinfuse.encoders import create_encoder, list_encoders
from clinfuse.encoders.gru_d import GRUD, first_observed, last_observed, window_summaries
from clinfuse.encoders.gru_d_recurrence import grud_recurrence

C, H, D = 3, 8, 5


def _encoder(**kw) -> GRUD:
    torch.manual_seed(0)
    spec = DataSpec(channels=[f"ch{i}" for i in range(C)])
    return create_encoder("gru_d", spec=spec, hidden=H, embed_dim=D, **kw)


def _batch(lengths: list[int], t_max: int, p_obs: float = 0.5, seed: int = 0) -> dict:
    """A random irregular batch; padded steps hold garbage to catch any leak."""
    g = torch.Generator().manual_seed(seed)
    b = len(lengths)
    mask = (torch.rand(b, t_max, C, generator=g) < p_obs).float()
    values = torch.randn(b, t_max, C, generator=g) * mask
    delta = torch.rand(b, t_max, C, generator=g) * 6
    length = torch.tensor(lengths, dtype=torch.int64)
    pad = torch.arange(t_max).unsqueeze(0) >= length.unsqueeze(1)  # (B, T)
    values[pad] = 99.0
    mask[pad] = 1.0
    time = torch.linspace(48, 0, t_max).expand(b, t_max).clone()
    return dict(
        ts_values=values,
        ts_mask=mask,
        ts_delta=delta,
        ts_time=time,
        ts_length=length,
        ts_present=length > 0,
    )


def test_registered_and_shapes():
    assert "gru_d" in list_encoders()
    enc = _encoder()
    batch = _batch([4, 0, 2], t_max=5)
    emb, present = enc(batch)
    tokens, mask, age = enc.forward_tokens(batch)
    assert enc.embed_dim == D and enc.modality == "timeseries"
    assert emb.shape == (3, D) and present.tolist() == [True, False, True]
    assert tokens.shape == (3, 5, D) and age.shape == (3, 5)
    assert mask.sum(1).tolist() == [4, 0, 2]
    assert torch.equal(age, batch["ts_time"])


def test_last_observed_hand_example():
    x = torch.tensor([[[1.0], [0.0], [3.0], [0.0]]])  # (1, 4, 1)
    m = torch.tensor([[[0.0], [0.0], [1.0], [0.0]]])
    x[0, 0, 0] = 5.0  # a value at an unobserved step must be ignored
    x_last, seen = last_observed(x, m)
    assert seen.flatten().tolist() == [False, False, True, True]
    assert x_last.flatten().tolist() == [0.0, 0.0, 3.0, 3.0]


def _impute_one(enc: GRUD, x_prev: float, gap: float) -> torch.Tensor:
    """x_hat of channel 0 at step 1: observed x_prev at step 0, missing at step 1."""
    x = torch.zeros(1, 2, C)
    m = torch.zeros(1, 2, C)
    x[0, 0, 0], m[0, 0, 0] = x_prev, 1.0
    delta = torch.zeros(1, 2, C)
    delta[0, 1, :] = gap
    return enc.impute(x, m, delta)[0, 1, 0]


def test_input_decay_zero_gap_gives_last_observation():
    enc = _encoder()
    assert _impute_one(enc, 1.7, gap=0.0).item() == pytest.approx(1.7, abs=1e-7)
    # small gap: |x_hat - x_last| = (1 - gamma) |x_last| <= w * gap * |x_last|
    w = enc.decay_x_weight[0].item()
    gap = 1e-3
    assert abs(_impute_one(enc, 1.7, gap).item() - 1.7) <= w * gap * 1.7 + 1e-6


def test_input_decay_infinite_gap_gives_mean():
    enc = _encoder()
    # rates start >= 0.02/h, so a 10^4 h gap leaves gamma <= exp(-200)
    assert _impute_one(enc, 1.7, gap=1e4).item() == pytest.approx(0.0, abs=1e-6)
    learned = _encoder(learn_mean=True)
    with torch.no_grad():
        learned.x_mean.fill_(-0.4)
    assert _impute_one(learned, 1.7, gap=1e4).item() == pytest.approx(-0.4, abs=1e-6)


def test_input_decay_matches_paper_formula():
    enc = _encoder(learn_mean=True)
    with torch.no_grad():
        enc.decay_x_weight.fill_(0.5)
        enc.decay_x_bias.fill_(0.25)
        enc.x_mean.fill_(0.3)
    gamma = math.exp(-(0.5 * 2.0 + 0.25))
    expected = gamma * 1.7 + (1 - gamma) * 0.3
    assert _impute_one(enc, 1.7, gap=2.0).item() == pytest.approx(expected, abs=1e-6)
    with torch.no_grad():  # a negative pre-activation is clipped: gamma = exp(-0) = 1
        enc.decay_x_weight.fill_(-1.0)
    assert _impute_one(enc, 1.7, gap=2.0).item() == pytest.approx(1.7, abs=1e-6)


def test_observed_values_pass_through_and_unseen_channels_take_the_mean():
    enc = _encoder()
    batch = _batch([6], t_max=6, seed=3)
    x, m, delta = batch["ts_values"], batch["ts_mask"], batch["ts_delta"]
    x_hat = enc.impute(x, m, delta)
    assert torch.equal(x_hat[m > 0], x[m > 0])
    m0 = torch.zeros_like(m)
    assert torch.equal(enc.impute(x, m0, delta), torch.zeros_like(x))


def test_hidden_decay_is_one_for_zero_gap_and_vanishes_for_long_gaps():
    enc = _encoder()
    with torch.no_grad():
        enc.decay_h.bias.fill_(-0.5)
    zero = torch.zeros(2, 4, C)
    assert torch.equal(enc.hidden_decay(zero), torch.ones(2, 4, H))
    with torch.no_grad():
        enc.decay_h.weight.fill_(0.1)
    gamma = enc.hidden_decay(torch.full((1, 1, C), 2.0))
    expected = math.exp(-(0.1 * 2.0 * C - 0.5))
    assert torch.allclose(gamma, torch.full_like(gamma, expected), atol=1e-6)


def test_long_gap_forgets_the_past():
    """With h decayed to 0, the state after a long gap equals a fresh start."""
    enc = _encoder()
    with torch.no_grad():
        enc.decay_h.weight.fill_(0.05)
        enc.decay_h.bias.zero_()
    full = _batch([3], t_max=3, p_obs=1.0, seed=5)
    full["ts_delta"][0, 2] = 1e4
    fresh = {k: v[:, 2:] if v.dim() >= 2 else v for k, v in full.items()}
    fresh["ts_length"] = torch.tensor([1])
    tok_full, _, _ = enc.forward_tokens(full)
    tok_fresh, _, _ = enc.forward_tokens(fresh)
    assert torch.allclose(tok_full[0, 2], tok_fresh[0, 0], atol=1e-6)


def test_fully_observed_reduces_to_gru_cell():
    """m = 1 and gamma_h = 1 (delta = 0, bias <= 0): GRU-D is a GRU over [x, m]."""
    enc = _encoder()
    with torch.no_grad():
        enc.decay_h.bias.fill_(-1.0)
    lengths = [5, 2, 4, 1]
    batch = _batch(lengths, t_max=5, p_obs=1.0, seed=1)
    batch["ts_delta"].zero_()
    cell = torch.nn.GRUCell(2 * C, H)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(cell, name).copy_(getattr(enc, name))
    emb, _ = enc(batch)
    tokens, _, _ = enc.forward_tokens(batch)
    for i, n in enumerate(lengths):
        h = torch.zeros(1, H)
        for t in range(n):
            x = batch["ts_values"][i, t : t + 1]
            h = cell(torch.cat([x, torch.ones_like(x)], -1), h)
            assert torch.allclose(tokens[i, t], enc.proj(h)[0], atol=1e-6)
        assert torch.allclose(emb[i], enc.proj(h)[0], atol=1e-6)


@pytest.mark.parametrize("time_inputs", [False, True])
def test_padding_invariance(time_inputs):
    enc = _encoder(time_inputs=time_inputs, summary_inputs=time_inputs)
    short = _batch([3, 1, 0], t_max=3, seed=2)
    long = _batch([3, 1, 0], t_max=7, seed=9)  # different garbage in the padding
    for key in ("ts_values", "ts_mask", "ts_delta", "ts_time"):
        long[key][:, :3] = short[key]
    emb_s, _ = enc(short)
    emb_l, _ = enc(long)
    assert torch.allclose(emb_s, emb_l, atol=1e-6)
    tok_s, _, _ = enc.forward_tokens(short)
    tok_l, mask_l, _ = enc.forward_tokens(long)
    assert torch.allclose(tok_s[:, :3][mask_l[:, :3]], tok_l[:, :3][mask_l[:, :3]], atol=1e-6)


@pytest.mark.parametrize("time_inputs", [False, True])
def test_batch_order_does_not_matter(time_inputs):
    enc = _encoder(time_inputs=time_inputs)
    batch = _batch([2, 5, 0, 4, 5], t_max=5, seed=4)
    perm = torch.tensor([3, 0, 4, 2, 1])
    permuted = {k: v[perm] for k, v in batch.items()}
    emb, _ = enc(batch)
    emb_p, _ = enc(permuted)
    assert torch.allclose(emb[perm], emb_p, atol=1e-6)


@pytest.mark.parametrize("extra", [False, True])
def test_gradient_reaches_every_parameter(extra):
    enc = _encoder(
        learn_mean=True,
        time_inputs=extra,
        delta_inputs=extra,
        baseline_inputs=extra,
        summary_inputs=extra,
    )
    batch = _batch([6, 4, 0, 6], t_max=6, p_obs=0.4, seed=6)
    emb, _ = enc(batch)
    tokens, mask, _ = enc.forward_tokens(batch)
    (emb.pow(2).sum() + tokens[mask].sum()).backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_empty_samples_are_finite():
    enc = _encoder()
    batch = _batch([0, 0], t_max=4)
    emb, present = enc(batch)
    tokens, mask, _ = enc.forward_tokens(batch)
    assert torch.isfinite(emb).all() and torch.isfinite(tokens).all()
    assert not present.any() and not mask.any()
    # an empty sample's embedding is the zero-state projection, whatever its neighbours
    mixed, _ = enc(_batch([0, 4], t_max=4, seed=8))
    assert torch.allclose(mixed[0], emb[0]) and torch.allclose(emb[0], enc.proj.bias)
    no_steps, _ = enc(_batch([0], t_max=0))
    assert no_steps.shape == (1, D) and torch.isfinite(no_steps).all()


def test_wrong_channel_count_names_the_tensor():
    enc = _encoder()
    batch = _batch([2], t_max=2)
    batch["ts_values"] = batch["ts_values"][..., :2]
    with pytest.raises(ValueError, match="ts_values"):
        enc(batch)


def test_time_inputs_tell_when_the_same_values_were_charted():
    batch = _batch([5, 5], t_max=5, p_obs=1.0, seed=3)
    later = dict(batch, ts_time=batch["ts_time"] - 12.0)  # same values, 12 h closer to pt
    plain = _encoder().eval()
    torch.testing.assert_close(plain(batch)[0], plain(later)[0])  # GRU-D alone cannot tell
    timed = _encoder(time_inputs=True).eval()
    assert not torch.allclose(timed(batch)[0], timed(later)[0], atol=1e-4)


def test_zero_time_weights_reduce_to_plain_gru_d():
    plain = _encoder().eval()
    timed = _encoder(time_inputs=True).eval()
    state = dict(plain.state_dict(), weight_it=torch.zeros_like(timed.weight_it))
    timed.load_state_dict(state)
    batch = _batch([4, 2, 0], t_max=4, seed=5)
    torch.testing.assert_close(timed(batch)[0], plain(batch)[0])


def _reference(enc: GRUD, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """GRU-D one sample at a time through ATen's own ``gru_cell``, recorded by autograd.

    Returns the projected last states (B, D) and step states (B, T, D), zero past each
    sample's length.
    """
    x, m, delta = batch["ts_values"], batch["ts_mask"], batch["ts_delta"]
    x_hat = enc.impute(x, m, delta)  # (B, T, C)
    inputs, w_ih = torch.cat([x_hat, m], -1), enc.weight_ih
    if enc.weight_it is not None:
        t = batch["ts_time"]
        feats = torch.stack([t, (t[:, :1] - t).clamp_min(0.0)], -1) / 24.0
        inputs, w_ih = torch.cat([inputs, feats], -1), torch.cat([w_ih, enc.weight_it], 1)
    if enc.weight_id is not None:
        inputs = torch.cat([inputs, torch.log1p(delta)], -1)
        w_ih = torch.cat([w_ih, enc.weight_id], 1)
    if enc.weight_ib is not None:
        first = first_observed(x.transpose(0, 1), m.transpose(0, 1)).transpose(0, 1)
        inputs, w_ih = torch.cat([inputs, first], -1), torch.cat([w_ih, enc.weight_ib], 1)
    gamma = enc.hidden_decay(delta)  # (B, T, H)
    last, steps = [], torch.zeros(*x.shape[:2], enc.hidden, dtype=x.dtype)
    for i, n in enumerate(batch["ts_length"].tolist()):
        h = torch.zeros(1, enc.hidden, dtype=x.dtype)
        for t in range(n):
            h = torch.gru_cell(
                inputs[i, t : t + 1], gamma[i, t : t + 1] * h,
                w_ih, enc.weight_hh, enc.bias_ih, enc.bias_hh,
            )  # fmt: skip
            steps = steps.index_put((torch.tensor(i), torch.tensor(t)), h[0])
        last.append(h[0])
    return enc.proj(torch.stack(last)), enc.proj(steps)


@pytest.mark.parametrize("extra", [(), ("time_inputs",), ("time_inputs", "delta_inputs",
                                   "baseline_inputs")])  # fmt: skip
def test_outputs_and_gradients_match_step_by_step_gru_cell(extra):
    """The hand-written backward through time against autograd through ATen's GRU cell:
    same embedding, step tokens and gradient of every parameter (float64)."""
    enc = _encoder(learn_mean=True, **dict.fromkeys(extra, True)).double()
    batch = {k: v.double() if v.is_floating_point() else v for k, v in
             _batch([7, 3, 0, 7, 1, 5], t_max=8, p_obs=0.4, seed=11).items()}  # fmt: skip
    g = torch.Generator().manual_seed(12)
    w_emb = torch.randn(6, D, generator=g, dtype=torch.float64)
    w_tok = torch.randn(6, 8, D, generator=g, dtype=torch.float64)

    def grads(emb: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        mask = _step_lengths_mask(batch["ts_length"], 8).unsqueeze(-1)
        enc.zero_grad()
        ((emb * w_emb).sum() + (tokens * mask * w_tok).sum()).backward()
        return {n: p.grad.clone() for n, p in enc.named_parameters()}

    emb, _ = enc(batch)
    tokens, mask, _ = enc.forward_tokens(batch)
    ref_emb, ref_tokens = _reference(enc, batch)
    torch.testing.assert_close(emb, ref_emb, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(tokens[mask], ref_tokens[mask], rtol=1e-10, atol=1e-12)
    ours, ref = grads(emb, tokens), grads(ref_emb, ref_tokens)
    assert ours.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-8, atol=1e-10, msg=name)


def _step_lengths_mask(lengths: torch.Tensor, t_max: int) -> torch.Tensor:
    return torch.arange(t_max).unsqueeze(0) < lengths.unsqueeze(1)  # (B, T)


def test_recurrence_gradcheck():
    """Finite differences agree with the backward pass, ended rows included."""
    g = torch.Generator().manual_seed(3)
    t_max, b, h = 5, 4, 3
    active = [4, 3, 3, 1, 0]
    args = [
        torch.randn(t_max, b, 3 * h, generator=g, dtype=torch.float64),
        torch.rand(t_max, b, h, generator=g, dtype=torch.float64),
        torch.randn(3 * h, h, generator=g, dtype=torch.float64),
        torch.randn(3 * h, generator=g, dtype=torch.float64),
    ]
    for a in args:
        a.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda *a: grud_recurrence(*a, active), args)


# -- pooled readouts ---------------------------------------------------------------


@pytest.mark.parametrize("readout", ["mean", "attention", "recent"])
def test_pooled_readout_shapes_and_padding_invariance(readout):
    enc = _encoder(readout=readout)
    short = _batch([3, 1, 0], t_max=3, seed=2)
    long = _batch([3, 1, 0], t_max=7, seed=9)  # different garbage in the padding
    for key in ("ts_values", "ts_mask", "ts_delta", "ts_time"):
        long[key][:, :3] = short[key]
    emb_s, present = enc(short)
    emb_l, _ = enc(long)
    assert emb_s.shape == (3, D) and present.tolist() == [True, True, False]
    torch.testing.assert_close(emb_s, emb_l)  # padded steps contribute nothing
    # a sample without steps gets the zero-state projection, as with the last state
    torch.testing.assert_close(emb_s[2], enc.proj.bias)
    emb_t, _, _ = enc.forward_with_tokens(long)
    torch.testing.assert_close(emb_t, emb_l)  # the token path gives the same embedding


def test_mean_readout_is_the_mean_of_the_valid_step_states():
    """The projection is affine, so proj(mean of states) = mean of the step tokens,
    which match the step-by-step reference through ATen's GRU cell."""
    enc = _encoder(readout="mean").double()
    batch = {k: v.double() if v.is_floating_point() else v for k, v in
             _batch([6, 2, 5], t_max=6, p_obs=0.5, seed=13).items()}  # fmt: skip
    emb, _ = enc(batch)
    _, ref_tokens = _reference(enc, batch)  # (B, T, D)
    mask = _step_lengths_mask(batch["ts_length"], 6).unsqueeze(-1)  # (B, T, 1)
    ref = (ref_tokens * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(emb, ref, rtol=1e-10, atol=1e-12)
    last, _ = _encoder().double()(batch)
    assert not torch.allclose(emb, last)  # not the last state in disguise


def test_attention_readout_with_equal_scores_is_the_mean_and_weights_follow_scores():
    batch = _batch([5, 3], t_max=5, p_obs=0.6, seed=14)
    mean = _encoder(readout="mean").eval()
    attn = _encoder(readout="attention").eval()
    # Equal scores (a zero score vector): uniform weights over the valid steps.
    attn.load_state_dict(dict(mean.state_dict(), **{"attn_score.weight": torch.zeros(1, H)}))
    torch.testing.assert_close(attn(batch)[0], mean(batch)[0])
    with torch.no_grad():
        attn.attn_score.weight.normal_(generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(attn(batch)[0], mean(batch)[0], atol=1e-4)


@pytest.mark.parametrize("readout", ["mean", "attention", "recent"])
def test_pooled_readout_gradient_reaches_every_parameter(readout):
    enc = _encoder(learn_mean=True, readout=readout)
    emb, _ = enc(_batch([6, 4, 0, 6], t_max=6, p_obs=0.4, seed=6))
    emb.pow(2).sum().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_recent_readout_starts_as_an_exponentially_weighted_mean_of_the_step_tokens():
    """At w = 0 the weights are exp(-age / 12 h), normalized over the valid steps; the
    projection is affine, so the embedding is the same weighted mean of the tokens."""
    enc = _encoder(readout="recent").double().eval()
    batch = {k: v.double() if v.is_floating_point() else v for k, v in
             _batch([5, 3], t_max=5, p_obs=0.6, seed=17).items()}  # fmt: skip
    emb, _ = enc(batch)
    tokens, mask, age = enc.forward_tokens(batch)
    weight = torch.exp(-age / 12.0) * mask  # (B, T)
    ref = (weight.unsqueeze(-1) * tokens).sum(1) / weight.sum(1, keepdim=True)
    # tau is stored as a float32 log(12) before .double(): a 1e-7 relative difference
    torch.testing.assert_close(emb, ref, rtol=1e-6, atol=1e-8)
    mean, _ = _encoder(readout="mean").double().eval()(batch)
    assert not torch.allclose(emb, mean)  # the latest states weigh more


def test_unknown_readout_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="readout must be one of.*'max'"):
        _encoder(readout="max")


# -- the self-supervised forecast loss ---------------------------------------------


def test_forecast_loss_matches_hand_computation_and_ignores_padding():
    enc = _encoder(forecast_weight=0.5).double().train()
    short = {k: v.double() if v.is_floating_point() else v for k, v in
             _batch([4, 2, 0], t_max=4, p_obs=0.5, seed=15).items()}  # fmt: skip
    long = {k: v.double() if v.is_floating_point() else v for k, v in
            _batch([4, 2, 0], t_max=7, p_obs=0.5, seed=16).items()}  # fmt: skip
    for key in ("ts_values", "ts_mask", "ts_delta", "ts_time"):
        long[key][:, :4] = short[key]
    enc(short)
    loss = enc.regularization_loss()
    # By hand, one (sample, step) at a time, on the step states (checked against ATen's
    # GRU cell in test_outputs_and_gradients_match_step_by_step_gru_cell).
    _, all_states = enc._run(short, keep_states=True)  # (B, T, H)
    num, den = 0.0, 0.0
    for i, n in enumerate(short["ts_length"].tolist()):
        for t in range(n - 1):
            m = short["ts_mask"][i, t + 1]
            pred = enc.forecast(all_states[i, t])
            num += ((pred - short["ts_values"][i, t + 1]) ** 2 * m).sum()
            den += m.sum()
    torch.testing.assert_close(loss, 0.5 * num / den)
    enc(long)  # different garbage past each length: the same loss
    torch.testing.assert_close(enc.regularization_loss(), loss)
    assert enc.regularization_loss() == 0  # read once: a later step does not count it again


def test_forecast_loss_trains_the_recurrence_and_is_off_in_eval():
    enc = _encoder(forecast_weight=1.0).train()
    enc(_batch([6, 4, 0, 6], t_max=6, p_obs=0.4, seed=6))
    enc.regularization_loss().backward()
    for name, p in enc.named_parameters():
        if name.startswith("proj."):  # the embedding is not part of this loss
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    enc.eval()
    enc(_batch([3], t_max=3))
    assert enc.regularization_loss() == 0  # no loss from evaluation passes
    plain = _encoder()
    assert plain.forecast is None and plain.regularization_loss() == 0


def test_delta_inputs_tell_how_often_the_same_values_were_charted():
    batch = _batch([5, 5], t_max=5, p_obs=1.0, seed=3)
    sparser = dict(batch, ts_delta=batch["ts_delta"] + 2.0)  # same values, charted less often
    with torch.no_grad():
        plain = _encoder().eval()
        plain.decay_h.weight.zero_()  # no hidden decay and (all observed) no imputation:
        plain.decay_h.bias.zero_()  # plain GRU-D cannot see the gaps at all
        torch.testing.assert_close(plain(batch)[0], plain(sparser)[0])
        timed = _encoder(delta_inputs=True).eval()
        timed.load_state_dict(dict(timed.state_dict(), **plain.state_dict()))
        assert not torch.allclose(timed(batch)[0], timed(sparser)[0], atol=1e-4)


def test_first_observed_hand_example():
    x = torch.tensor([[0.0, 5.0], [2.0, 0.0], [3.0, 7.0], [0.0, 1.0]]).unsqueeze(1)  # (T, 1, 2)
    m = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]).unsqueeze(1)
    expected = torch.tensor([[0.0, 5.0], [2.0, 5.0], [2.0, 5.0], [2.0, 5.0]]).unsqueeze(1)
    torch.testing.assert_close(first_observed(x, m), expected)


def test_window_summaries_hand_example():
    # One subject, 4 valid steps of 5 (the fifth is padding with garbage), 2 channels.
    values = torch.tensor([[[1.0, 9.0], [2.0, 0.0], [0.0, 4.0], [6.0, 0.0], [99.0, 99.0]]])
    mask = torch.tensor([[[1.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]]])
    time = torch.tensor([[30.0, 20.0, 10.0, 2.0, 0.0]])  # hours before prediction_time
    batch = dict(
        ts_values=values,
        ts_mask=mask,
        ts_delta=torch.zeros_like(values),
        ts_time=time,
        ts_length=torch.tensor([4]),
    )
    got = window_summaries(batch, 2, recent_hours=12.0)
    # recent (<= 12 h): channel 0 saw 6 (at 2 h), channel 1 saw 4 (at 10 h);
    # first: 1 and 9; observations: 3 and 2.
    expected = torch.tensor([[6.0, 4.0, 1.0, 9.0, math.log(4.0), math.log(3.0)]])
    torch.testing.assert_close(got, expected)
    # A channel never charted in the recent window, or at all, summarizes to 0.
    late = dict(batch, ts_time=time + 100.0)
    torch.testing.assert_close(window_summaries(late, 2, 12.0)[:, :2], torch.zeros(1, 2))
    empty = dict(batch, ts_length=torch.tensor([0]))
    torch.testing.assert_close(window_summaries(empty, 2, 12.0), torch.zeros(1, 6))


def test_summary_inputs_add_a_linear_map_of_the_summaries_to_the_readout():
    batch = _batch([5, 3, 0], t_max=5, p_obs=0.6, seed=3)
    with torch.no_grad():
        plain = _encoder().eval()
        wide = _encoder(summary_inputs=True, summary_hours=20.0).eval()
        wide.load_state_dict(dict(wide.state_dict(), **plain.state_dict()))
        summaries = window_summaries(batch, C, recent_hours=20.0)  # (B, 3C)
        expected = plain(batch)[0] + summaries @ wide.summary_proj.weight.T
        torch.testing.assert_close(wide(batch)[0], expected)
        emb_tokens, _, _ = wide.forward_with_tokens(batch)
        torch.testing.assert_close(emb_tokens, expected)
        # The same stays with another baseline (first values) are told apart.
        shifted = dict(batch, ts_values=batch["ts_values"] - 3.0 * batch["ts_mask"])
        assert not torch.allclose(window_summaries(shifted, C, 20.0), summaries, atol=1e-3)
    with pytest.raises(ValueError, match="summary_hours"):
        _encoder(summary_inputs=True, summary_hours=0.0)
