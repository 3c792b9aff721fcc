r"""Algorithm 1 with the full Jacobian (the trace's own derivative Q kept), for the ablation.

The library's ``trace="hessian"`` drops the last block-row and block-column of the paper's
``G_t`` (2×2) or also ``∂y/∂x`` (L). Keeping them needs third derivatives of the loss in
general. For SGD base, SGD meta and one step size on a least-squares stream
``f_t(w) = ½(aᵀw - b)²``, the Hessian ``A = aaᵀ`` does not depend on ``w``, so the full ``G_t``
is cheap and exact. This module runs that case; it is the "full G" column of the ablation in
docs/results.md.

With ``B_t = γY_t + (1-γ)`` held constant within a step (the paper's eq. 47), the trace map is
``X' = -α g B + γ(I - αA)X`` and eq. (14) with every block gives

.. math::
    Y' &= B - ηγ\, XᵀAX - ηγ\, gᵀQ\\
    X' &= -α g B + γ(I - αA)X\\
    Q' &= (-α g B - γα AX)\,B - γαB\, AX + γ^2 (I - αA)Q

``include_q=False`` drops ``Q`` and is then the 2×2 approximation, step for step
(``tests/test_hessian_trace.py`` checks both against autograd).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["full_trace_sgd_sgd"]


def full_trace_sgd_sgd(
    inputs: Tensor,
    targets: Tensor,
    w0: Tensor,
    alpha0: float,
    meta_lr: float,
    gamma: float,
    include_q: bool = True,
) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor, Tensor]]:
    """Run SGD/SGD MetaOptimize with the full trace on ``f_t(w) = ½(a_tᵀw - b_t)²``.

    Args:
        inputs: ``a_t`` for every step, shape (steps, n).
        targets: ``b_t``, shape (steps,).
        w0: initial weights, shape (n,).
        alpha0: initial step size.
        meta_lr: meta step size ``η``.
        gamma: trace discount ``γ``.
        include_q: keep the trace's own derivative Q (False gives the 2×2 approximation).

    Returns:
        ``(losses, log step sizes before every step, final weights, final (Y, X, Q))``.
    """
    steps = len(targets)
    w = w0.clone()
    beta = torch.tensor(math.log(alpha0), dtype=w.dtype)
    y_trace = torch.ones((), dtype=w.dtype)
    x_trace = torch.zeros_like(w)
    q_trace = torch.zeros_like(w)
    losses = torch.empty(steps, dtype=w.dtype)
    betas = torch.empty(steps, dtype=w.dtype)
    for t in range(steps):
        a, b = inputs[t], targets[t]
        error = a @ w - b
        losses[t] = 0.5 * error * error
        betas[t] = beta
        g = error * a
        alpha = beta.exp()
        z = x_trace @ g
        mix = gamma * y_trace + (1.0 - gamma)
        ax = a * (a @ x_trace)
        new_y = mix - meta_lr * gamma * (x_trace @ ax)
        new_x = -alpha * g * mix + gamma * (x_trace - alpha * ax)
        if include_q:
            new_y = new_y - meta_lr * gamma * (g @ q_trace)
            aq = a * (a @ q_trace)
            by_beta = -alpha * g * mix - gamma * alpha * ax
            q_trace = by_beta * mix - gamma * alpha * mix * ax + gamma**2 * (q_trace - alpha * aq)
        y_trace, x_trace = new_y, new_x
        w = w - alpha * g
        beta = beta - meta_lr * z
    return losses, betas, w, (y_trace, x_trace, q_trace)
