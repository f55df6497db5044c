"""The GRU-D recurrence with a hand-written backward pass through time.

The recurrent part of GRU-D (``encoders.gru_d``) is a loop of small (N, H) steps;
recorded by autograd, each step leaves about fifteen nodes (slices, elementwise ops,
one matmul) whose bookkeeping, not arithmetic, dominates its cost on a CPU. Here the
forward pass runs without a graph and keeps only the decayed states ``d``; the
backward pass recomputes the gates for all steps at once from them, walks the steps
in reverse with the GRU's derivative written out, and computes the gradients that do
not depend on the order of steps (``W_hh``, ``b_hh``, the hidden decays) as one
matmul or product over all steps after the loop. Both loops are TorchScript, which
dispatches their small ops at about half the cost of the Python interpreter.

Per step (``torch.nn.GRUCell`` "reset after" equations, decayed state ``d``)::

    d = gamma_t * h_{t-1}
    [g_r, g_z, g_n] = W_hh d + b_hh
    r = sigmoid(i_r + g_r);  z = sigmoid(i_z + g_z);  n = tanh(i_n + r * g_n)
    h_t = n + z * (d - n)

Sequences are sorted by decreasing length and ``active[t]`` of them run at step
``t``; a sequence that has ended keeps its last state, so ``states[-1]`` holds every
sequence's last valid state.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def grud_recurrence(
    gi: Tensor, gamma_h: Tensor, weight_hh: Tensor, bias_hh: Tensor, active: list[int]
) -> Tensor:
    """Runs the recurrence; states after each step, carried past each sequence's end.

    Args:
        gi: input-side gate pre-activations ``W_ih [x_hat, m] + b_ih``, time-major.
        gamma_h: hidden decays, time-major.
        weight_hh, bias_hh: the recurrent weights, ``nn.GRUCell`` layout (r, z, n).
        active: sequences still running at each step (non-increasing; rows sorted
            by decreasing length).

    Shapes:
        - gi: (T, B, 3H); gamma_h: (T, B, H); weight_hh: (3H, H); bias_hh: (3H,)
        - output: (T, B, H)
    """
    if torch.is_grad_enabled() and any(t.requires_grad for t in (gi, gamma_h, weight_hh, bias_hh)):
        return _Recurrence.apply(gi, gamma_h, weight_hh, bias_hh, tuple(active))
    return _forward(gi, gamma_h, weight_hh, bias_hh, active)[0]


class _Recurrence(torch.autograd.Function):
    """``grud_recurrence`` as one autograd node (see the module docstring)."""

    @staticmethod
    def forward(
        ctx: Any,
        gi: Tensor,
        gamma_h: Tensor,
        weight_hh: Tensor,
        bias_hh: Tensor,
        active: tuple[int, ...],
    ) -> Tensor:
        states, decayed = _forward(gi, gamma_h, weight_hh, bias_hh, active)
        ctx.active = active
        ctx.save_for_backward(gi, gamma_h, weight_hh, bias_hh, states, decayed)
        return states

    @staticmethod
    def backward(ctx: Any, grad_states: Tensor) -> tuple[Tensor | None, ...]:
        gi, gamma_h, weight_hh, bias_hh, states, decayed = ctx.saved_tensors
        hidden = weight_hh.shape[1]
        # The gates again, for all steps at once: one (T*B, H) x (H, 3H) matmul.
        gh = torch.addmm(bias_hh, decayed.reshape(-1, hidden), weight_hh.t()).view_as(gi)
        r, z = torch.sigmoid(gi[..., : 2 * hidden] + gh[..., : 2 * hidden]).chunk(2, -1)
        n = torch.tanh(torch.addcmul(gi[..., 2 * hidden :], r, gh[..., 2 * hidden :]))
        # Per-step factors of the chain rule that do not depend on the incoming gradient.
        factors = (
            (1 - z) * (1 - n * n),  # d h / d(i_n + r g_n)
            r,
            gh[..., 2 * hidden :] * r * (1 - r),  # d(r g_n) / d(i_r + g_r)
            (decayed - n) * z * (1 - z),  # d h / d(i_z + g_z)
            z,  # d h / d d, the direct path
        )
        grad_gh, grad_pre_n, grad_decayed = _backward(
            grad_states, gamma_h, weight_hh, factors, ctx.active
        )
        # The r and z parts are shared with gh; i_n is not scaled by the reset gate.
        grad_gi = torch.cat([grad_gh[..., : 2 * hidden], grad_pre_n], -1)  # (T, B, 3H)
        prev = torch.cat([states.new_zeros(1, *states.shape[1:]), states[:-1]])  # h_{t-1}
        flat_gh = grad_gh.reshape(-1, grad_gh.shape[-1])  # (T*B, 3H)
        return (
            grad_gi,
            grad_decayed * prev,  # (T, B, H)
            flat_gh.t().mm(decayed.reshape(-1, hidden)),  # (3H, H)
            flat_gh.sum(0),  # (3H,)
            None,
        )


def _forward(
    gi: Tensor,
    gamma_h: Tensor,
    weight_hh: Tensor,
    bias_hh: Tensor,
    active: list[int],
) -> tuple[Tensor, Tensor]:
    """The forward loop without a graph.

    Returns:
        states and the decayed states ``d`` (zero where a row had ended), both (T, B, H).
    """
    with torch.no_grad():
        return _forward_loop(gi, gamma_h, weight_hh, bias_hh, list(active))


@torch.jit.script
def _forward_loop(
    gi: Tensor, gamma_h: Tensor, weight_hh: Tensor, bias_hh: Tensor, active: list[int]
) -> tuple[Tensor, Tensor]:
    # Scripted: the loop is ~10 small ops per step, and TorchScript dispatches them at
    # about half the cost of the Python interpreter.
    t_max, batch = gi.shape[0], gi.shape[1]
    hidden = weight_hh.shape[1]
    states = gi.new_empty(t_max, batch, hidden)
    decayed = gi.new_zeros(t_max, batch, hidden)
    h = gi.new_zeros(batch, hidden)
    w_t = weight_hh.t()
    for t in range(t_max):
        rows = active[t]
        if rows > 0:
            d = torch.mul(gamma_h[t, :rows], h[:rows], out=decayed[t, :rows])  # (N, H)
            gh = torch.addmm(bias_hh, d, w_t)  # (N, 3H)
            rz = torch.sigmoid(gi[t, :rows, : 2 * hidden] + gh[:, : 2 * hidden])
            r, z = rz[:, :hidden], rz[:, hidden:]
            n = torch.tanh(torch.addcmul(gi[t, :rows, 2 * hidden :], r, gh[:, 2 * hidden :]))
            torch.addcmul(n, z, d - n, out=states[t, :rows])
        states[t, rows:] = h[rows:]  # ended rows keep their last state
        h = states[t]
    return states, decayed


def _backward(
    grad_states: Tensor,
    gamma_h: Tensor,
    weight_hh: Tensor,
    factors: tuple[Tensor, Tensor, Tensor, Tensor, Tensor],
    active: tuple[int, ...],
) -> tuple[Tensor, Tensor, Tensor]:
    """Back-propagation through time.

    Args:
        factors: per step ``((1 - z)(1 - n^2), r, g_n r (1 - r), (d - n) z (1 - z), z)``.

    Returns:
        d loss / d gh, the recurrent gate pre-activations ``W_hh d + b_hh`` (its r and
        z parts are also d loss / d gi's), d loss / d i_n (= d loss / d(i_n + r g_n))
        and d loss / d d, the decayed states.

    Shapes:
        - grad_states, gamma_h: (T, B, H); factors: five (T, B, H)
        - output: (T, B, 3H), (T, B, H), (T, B, H)
    """
    return _backward_loop(grad_states.contiguous(), gamma_h, weight_hh, *factors, list(active))


@torch.jit.script
def _backward_loop(
    grad_states: Tensor,
    gamma_h: Tensor,
    weight_hh: Tensor,
    through_n: Tensor,
    r: Tensor,
    r_gate: Tensor,
    z_gate: Tensor,
    z: Tensor,
    active: list[int],
) -> tuple[Tensor, Tensor, Tensor]:
    t_max, batch, hidden = grad_states.shape[0], grad_states.shape[1], grad_states.shape[2]
    grad_gh = grad_states.new_zeros(t_max, batch, 3 * hidden)
    grad_pre_n, grad_decayed = torch.zeros_like(grad_states), torch.zeros_like(grad_states)
    grad_h = grad_states.new_zeros(batch, hidden)  # d loss / d h_t, carried backward
    for t in range(t_max - 1, -1, -1):
        grad_h += grad_states[t]
        rows = active[t]
        if rows > 0:
            dh = grad_h[:rows]
            out = grad_gh[t, :rows]  # (N, 3H), written in place
            pre_n = torch.mul(dh, through_n[t, :rows], out=grad_pre_n[t, :rows])
            torch.mul(pre_n, r_gate[t, :rows], out=out[:, :hidden])
            torch.mul(dh, z_gate[t, :rows], out=out[:, hidden : 2 * hidden])
            torch.mul(pre_n, r[t, :rows], out=out[:, 2 * hidden :])
            d_dec = torch.addmm(dh * z[t, :rows], out, weight_hh, out=grad_decayed[t, :rows])
            torch.mul(d_dec, gamma_h[t, :rows], out=dh)
    return grad_gh, grad_pre_n, grad_decayed
