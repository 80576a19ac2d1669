"""Optimisers over a batch of images, each item an independent problem.

The engine calls ``step(x, grad)`` once per loss evaluation, so ``iterations``
counts the same thing (forward + backward passes) for both optimisers.

* :class:`BatchedLBFGS`: L-BFGS (Nocedal & Wright, Algorithm 7.4, the
  two-loop recursion) with a fixed step and no line search: the variant of
  torch7's ``optim.lbfgs`` that the classic implementations use. Every batch
  item keeps its own curvature history, scaling and step, so an item gets the
  same result in a batch as alone.
* :class:`BatchedAdam`: ``torch.optim.Adam``, which is elementwise and hence
  already independent per item.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Curvature pairs kept per item (torch.optim.LBFGS's default).
LBFGS_HISTORY = 100
# A pair (s, y) with y.s below this carries no usable curvature and is skipped.
_CURVATURE_EPS = 1e-10


class BatchedLBFGS:
    """Fixed-step L-BFGS with a separate history per batch item.

    The history is a ring buffer of ``(s, y, rho)`` slots shared in layout but
    not in content: an item whose new pair is rejected stores ``rho = 0`` in
    its slot, which makes the slot a no-op in the two-loop recursion for that
    item only.
    """

    def __init__(
        self,
        batch: int,
        *,
        lr: float = 1.0,
        history: int = LBFGS_HISTORY,
        clamp: tuple[float, float] | None = None,
        device: torch.device | str = "cpu",
    ):
        self.lr = lr
        self.clamp = clamp
        self.history = history
        self._s: list[Tensor] = []
        self._y: list[Tensor] = []
        self._rho: list[Tensor] = []
        self._h_diag = torch.ones(batch, device=device)
        self._prev_grad: Tensor | None = None
        self._prev_step: Tensor | None = None  # t * d of the last step, [B, D]

    @torch.no_grad()
    def step(self, x: Tensor, grad: Tensor) -> None:
        """Move ``x`` (``[B, ...]``) in place along the L-BFGS direction for ``grad``."""
        b = x.shape[0]
        g = grad.reshape(b, -1).float()
        if self._prev_grad is not None and self._prev_step is not None:
            self._remember(self._prev_step, g - self._prev_grad)
        direction = self._direction(g)
        # First step (or after a reset): scale so the first move is at most lr in L1 (torch7's choice).
        first = g.abs().sum(1).clamp_min(1e-30).reciprocal().clamp(max=1.0) * self.lr
        fresh = torch.full((b,), not self._s, dtype=torch.bool, device=g.device)
        # An item whose direction is not a descent direction falls back to steepest descent.
        not_descent = (g * direction).sum(1) > -1e-30
        fresh = fresh | not_descent
        direction = torch.where(not_descent[:, None], -g, direction)
        t = torch.where(fresh, first, torch.full_like(first, self.lr))
        before = x.detach().reshape(b, -1).float().clone()
        x.add_((direction * t[:, None]).view_as(x).to(x.dtype))
        if self.clamp is not None:
            x.clamp_(*self.clamp)
        self._prev_grad = g.clone()
        # s = the move actually made (after clamping), so (s, y) stays a true secant pair.
        self._prev_step = x.detach().reshape(b, -1).float() - before

    def _remember(self, s: Tensor, y: Tensor) -> None:
        ys = (y * s).sum(1)
        accepted = ys > _CURVATURE_EPS
        rho = torch.where(accepted, ys.clamp_min(_CURVATURE_EPS).reciprocal(), torch.zeros_like(ys))
        yy = (y * y).sum(1).clamp_min(1e-30)
        self._h_diag = torch.where(accepted, ys / yy, self._h_diag)
        if len(self._s) == self.history:
            self._s.pop(0), self._y.pop(0), self._rho.pop(0)
        self._s.append(s)
        self._y.append(y)
        self._rho.append(rho)

    def _direction(self, g: Tensor) -> Tensor:
        """-H g by the two-loop recursion, per item."""
        q = -g
        alphas: list[Tensor] = []
        for s, y, rho in zip(reversed(self._s), reversed(self._y), reversed(self._rho)):
            alpha = rho * (s * q).sum(1)
            q = q - alpha[:, None] * y
            alphas.append(alpha)
        r = q * self._h_diag[:, None]
        for (s, y, rho), alpha in zip(zip(self._s, self._y, self._rho), reversed(alphas)):
            beta = rho * (y * r).sum(1)
            r = r + s * (alpha - beta)[:, None]
        return r


class BatchedAdam:
    """Adam on the pixels (elementwise, so per-item independent by construction)."""

    def __init__(self, x: Tensor, *, lr: float, clamp: tuple[float, float] | None = None):
        self._adam = torch.optim.Adam([x], lr=lr)
        self.clamp = clamp

    def step(self, x: Tensor, grad: Tensor) -> None:
        x.grad = grad
        self._adam.step()
        x.grad = None
        if self.clamp is not None:
            with torch.no_grad():
                x.clamp_(*self.clamp)


def make_optimizer(name: str, x: Tensor, lr: float, clamp: tuple[float, float] | None = (0.0, 1.0)) -> BatchedLBFGS | BatchedAdam:
    """The optimiser named by ``StyleParams.optimizer`` for the pixel batch ``x``.

    Pixels are kept in ``clamp`` after every step (projected descent): an image
    is only ever judged, saved or fed to the network within its valid range.
    """
    if name == "lbfgs":
        return BatchedLBFGS(x.shape[0], lr=lr, clamp=clamp, device=x.device)
    if name == "adam":
        return BatchedAdam(x, lr=lr, clamp=clamp)
    raise ValueError(f"unknown optimizer {name!r}")
