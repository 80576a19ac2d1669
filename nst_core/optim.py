"""Optimisers over a batch of images, each item an independent problem.

The engine calls ``step(x, grad)`` once per loss evaluation, so ``iterations``
counts the same thing (forward + backward passes) for both optimisers.

* :class:`BatchedLBFGS`: L-BFGS (Nocedal & Wright, Algorithm 7.4, the
  two-loop recursion) with a fixed step and no line search: the variant of
  torch7's ``optim.lbfgs`` that the classic implementations use. Every batch
  item keeps its own curvature history, scaling and step, and
  :meth:`BatchedLBFGS.reset` forgets one item's history (and halves its step)
  without touching the others'. No state is shared between items, so an item
  follows the same arithmetic in a batch as alone; what can differ is the
  gradient it is given (float32 convolutions of a batch round differently
  in the last bits), see :func:`nst_core.engine.optimise`.
* :class:`BatchedAdam`: ``torch.optim.Adam``, which is elementwise and hence
  already independent per item (it has no ``reset``: its steps are bounded by
  ``lr`` per pixel).
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
    not in content: an item whose new pair is rejected (or whose history was
    :meth:`reset`) has ``rho = 0`` and zero ``s``, ``y`` in the slot, which
    makes the slot an exact no-op in the two-loop recursion for that item only.
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
        # Ring buffers, allocated at the first pair: s and y ``[history, B, D]``, rho ``[history, B]``
        # (one buffer each rather than a list of tensors: no allocation per step, and a slot is a view).
        self._s: Tensor | None = None
        self._y: Tensor | None = None
        self._rho: Tensor | None = None
        self._rows: list[int] = []  # the slots in use, oldest first
        self._h_diag = torch.ones(batch, device=device)
        self._fresh = torch.ones(batch, dtype=torch.bool, device=device)  # no usable history: take a first step
        self._step_scale = torch.ones(batch, device=device)  # per item, halved by every reset
        self._prev_grad: Tensor | None = None
        self._prev_step: Tensor | None = None  # t * d of the last step, [B, D]

    @property
    def step_scale(self) -> Tensor:
        """Each item's step as a fraction of ``lr`` (``[B]``; 1 until :meth:`reset` halves it)."""
        return self._step_scale

    @torch.no_grad()
    def step(self, x: Tensor, grad: Tensor) -> None:
        """Move ``x`` (``[B, ...]``) in place along the L-BFGS direction for ``grad``."""
        b = x.shape[0]
        g = grad.reshape(b, -1).to(torch.promote_types(grad.dtype, torch.float32))  # float64 stays float64
        if self._prev_grad is not None and self._prev_step is not None:
            self._remember(self._prev_step, g - self._prev_grad)
        direction = self._direction(g)
        # First step (or after a reset): scale so the first move is at most lr in L1 (torch7's choice).
        first = g.abs().sum(1).clamp_min(1e-30).reciprocal().clamp(max=1.0) * self.lr
        # An item whose direction is not a descent direction falls back to steepest descent.
        not_descent = (g * direction).sum(1) > -1e-30
        fresh = self._fresh | not_descent
        direction = torch.where(not_descent[:, None], -g, direction)
        t = torch.where(fresh, first, torch.full_like(first, self.lr)) * self._step_scale
        before = x.detach().reshape(b, -1).to(g.dtype).clone()
        x.add_((direction * t[:, None]).view_as(x).to(x.dtype))
        if self.clamp is not None:
            x.clamp_(*self.clamp)
        self._fresh = torch.zeros_like(self._fresh)
        self._prev_grad = g.clone()
        # s = the move actually made (after clamping), so (s, y) stays a true secant pair.
        self._prev_step = x.detach().reshape(b, -1).to(g.dtype) - before

    @torch.no_grad()
    def reset(self, items: Tensor, step_factor: float = 0.5) -> None:
        """Forget the history of ``items`` (``[B]`` bool) and multiply their step by ``step_factor``.

        For an item whose pixels the caller has just replaced (the divergence
        guard of :func:`nst_core.engine.optimise` puts back its best image):
        its next step is a first step again, and the pair spanning the
        replacement is not remembered. Other items are not touched. Runs
        without synchronising with the device (a mask of no items is a no-op).
        """
        items = items.to(self._h_diag.device, torch.bool)
        if self._rho is not None:
            self._rho.masked_fill_(items.unsqueeze(0), 0.0)
        self._h_diag = torch.where(items, torch.ones_like(self._h_diag), self._h_diag)
        self._fresh = self._fresh | items
        self._step_scale = torch.where(items, self._step_scale * step_factor, self._step_scale)
        if self._prev_step is not None:
            # s = 0 for the replaced items: the next pair has y.s = 0 and is rejected.
            self._prev_step = torch.where(items[:, None], torch.zeros_like(self._prev_step), self._prev_step)

    def _remember(self, s: Tensor, y: Tensor) -> None:
        ys = torch.linalg.vecdot(y, s)
        accepted = ys > _CURVATURE_EPS
        rho = torch.where(accepted, ys.clamp_min(_CURVATURE_EPS).reciprocal(), torch.zeros_like(ys))
        yy = torch.linalg.vecdot(y, y).clamp_min(1e-30)
        self._h_diag = torch.where(accepted, ys / yy, self._h_diag)
        if self._s is None or self._y is None or self._rho is None:
            self._s = s.new_zeros((self.history, *s.shape))
            self._y = y.new_zeros((self.history, *y.shape))
            self._rho = s.new_zeros((self.history, s.shape[0]))
        if len(self._rows) == self.history:
            row = self._rows.pop(0)  # the oldest slot is overwritten
        else:
            row = len(self._rows)
        # A rejected pair is zeroed too, so a non-finite y (a NaN gradient) cannot leak into the recursion.
        zero = s.new_zeros(())
        torch.where(accepted[:, None], s, zero, out=self._s[row])
        torch.where(accepted[:, None], y, zero, out=self._y[row])
        self._rho[row] = rho
        self._rows.append(row)

    def _direction(self, g: Tensor) -> Tensor:
        """-H g by the two-loop recursion, per item.

        Written with one dot product (``vecdot``) and one fused update (``addcmul_``) per slot and
        loop: over a full history of 100 slots the loops are ~700 kernels, and the unfused form
        (product, sum, scale, subtract) cost 2-3x more (7.6 ms a step at 128 px on one core).
        """
        q = -g
        if self._s is None or self._y is None or self._rho is None:
            return q * self._h_diag[:, None]
        s_buf, y_buf, rho_buf = self._s, self._y, self._rho
        alphas: list[Tensor] = []
        for row in reversed(self._rows):
            alpha = rho_buf[row] * torch.linalg.vecdot(s_buf[row], q)
            q.addcmul_(y_buf[row], alpha[:, None], value=-1.0)  # q -= alpha y
            alphas.append(alpha)
        r = q.mul_(self._h_diag[:, None])
        for row, alpha in zip(self._rows, reversed(alphas)):
            beta = rho_buf[row] * torch.linalg.vecdot(y_buf[row], r)
            r.addcmul_(s_buf[row], (alpha - beta)[:, None])  # r += (alpha - beta) s
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
