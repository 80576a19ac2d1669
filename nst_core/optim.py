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

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, TypeVar

import torch
from torch import Tensor

from nst_core.measure import fastest, time_in_turns

# Curvature pairs kept per item (torch.optim.LBFGS's default).
LBFGS_HISTORY = 100
# A pair (s, y) with y.s below this carries no usable curvature and is skipped.
_CURVATURE_EPS = 1e-10


InnerWay = Literal["rows_first", "history_first", "onednn"]
"""How :func:`inner_products` runs: ``rows_first`` (``rows @ history.T``, PyTorch's BLAS: the default),
``history_first`` (``(history @ rows.T).T``, the same BLAS) or ``onednn`` (oneDNN's float32 product, CPU)."""

CombineWay = Literal["mm", "onednn", "chunked"]
"""How :func:`combine` runs: ``mm`` (``coefficients @ history``, PyTorch's BLAS: the default), ``onednn``
(oneDNN's float32 product, CPU) or ``chunked`` (one batched product over column blocks of the history,
:func:`_chunked_combine`)."""


@dataclass(frozen=True)
class ProductWays:
    """How a step's two products over the history run, each the fastest of its candidates
    (:func:`measure_products`): they are different shapes (``[3, D] x [D, n]`` reduces over the long
    side, ``[1, n] x [n, D]`` produces it), and the fastest of one says nothing about the other."""

    inner: InnerWay = "rows_first"
    combine: CombineWay = "mm"


W = TypeVar("W", bound=str)

# Per device, dtype, history length and size class of D: the ways measured fastest (:func:`measure_products`).
_PRODUCTS: dict[tuple[str, torch.dtype, int, int], ProductWays] = {}


def inner_products(rows: Tensor, history: Tensor, way: InnerWay = "rows_first") -> Tensor:
    """``rows`` ``[k, D]`` times ``history`` ``[n, D]`` transposed: ``[k, n]``, every ``r_a . h_i``.

    Every way computes the same thing (up to the order of the sums), but libraries run them very
    differently for a short side ``k`` of 1-3 and a long ``D``: on one Xeon (MKL, AVX512)
    ``rows @ history.T`` was 3x faster than ``(history @ rows.T).T``; on one AMD EPYC with AVX512
    (the same MKL, which takes a slower path on AMD CPUs) the other way round, 2.2x (3.3 against
    7.2 ms for ``k`` = 3 at ``D`` = 3 x 256 x 192, ``n`` = 200), and oneDNN's product faster than
    either at 128 px (1.1 against 1.9 ms; the history fits the CPU's cache there). So the way is
    measured (:func:`measure_products`) when a history is first allocated for a device, dtype and size.
    """
    if way == "onednn":
        return _onednn_product(rows, history)
    if way == "history_first":
        return (history @ rows.T).T
    return rows @ history.T


def combine(coefficients: Tensor, history: Tensor, out: Tensor, way: CombineWay = "mm") -> None:
    """``out`` ``[1, D]`` (contiguous) = ``coefficients`` ``[1, n]`` times ``history`` ``[n, D]``."""
    if way == "onednn":
        out.copy_(_onednn_product(coefficients, history.T))
    elif way == "chunked":
        _chunked_combine(coefficients, history, out)
    else:
        torch.mm(coefficients, history, out=out)


def _chunked_combine(coefficients: Tensor, history: Tensor, out: Tensor) -> None:
    """:func:`combine` as one batched product over ``2 x threads`` blocks of the history's columns, each
    block's result written in place into its part of ``out``. Measured on a 2-core AMD EPYC (MKL, float32,
    ``n`` = 200): 1.28 -> 0.31 ms at ``D`` = 3 x 128 x 96 and 6.3 -> 2.8 ms at 3 x 256 x 192 against the
    plain product (oneDNN's: 1.04 and 6.5 ms), the history then read at 40-45 GB/s instead of ~20. A ``D``
    that the blocks do not divide runs as one block."""
    n, d = history.shape
    blocks = 2 * torch.get_num_threads()
    blocks = blocks if d % blocks == 0 else 1
    parts = history.view(n, blocks, d // blocks).transpose(0, 1)  # [blocks, n, D / blocks], a view
    torch.bmm(coefficients.expand(blocks, 1, n), parts, out=out.view(blocks, 1, d // blocks))


def _onednn_product(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b.T`` by oneDNN's float32 matrix product (PyTorch sends float32 products to MKL, and
    reaches oneDNN's only through this operator, the one inductor uses for linear layers on CPUs)."""
    return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")


def _products_key(history: Tensor) -> tuple[str, torch.dtype, int, int]:
    return history.device.type, history.dtype, history.shape[0], history.shape[1].bit_length()


def _onednn_available(history: Tensor) -> bool:
    """oneDNN's product is a candidate for float32 on a CPU, where this PyTorch has the operator."""
    onednn = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    return onednn and history.device.type == "cpu" and history.dtype == torch.float32


def inner_ways(history: Tensor) -> list[InnerWay]:
    """The ways of :func:`inner_products` worth timing for ``history``, the default first."""
    ways: list[InnerWay] = ["rows_first", "history_first"]
    return [*ways, "onednn"] if _onednn_available(history) else ways


def combine_ways(history: Tensor) -> list[CombineWay]:
    """The ways of :func:`combine` worth timing for ``history``, the default first."""
    ways: list[CombineWay] = ["mm", "chunked"]
    return [*ways, "onednn"] if _onednn_available(history) else ways


def measure_products(history: Tensor, repeats: int = 3) -> ProductWays:
    """Time the ways of each of a step's two products on ``history`` (a full ``[2m, D]`` history of the
    size to come, its values unused): :func:`inner_products` with ``k`` = 3 rows (:func:`inner_ways`),
    and :func:`combine` (:func:`combine_ways`). Once per device, dtype, ``m`` and size class of ``D``
    (within a factor of two) in a process; returns (and keeps) the ways chosen, each the fastest unless
    within :data:`~nst_core.measure.MARGIN` of its default (:func:`nst_core.measure.fastest`)."""
    key = _products_key(history)
    if key in _PRODUCTS:
        return _PRODUCTS[key]
    rows, out = history.new_zeros((3, history.shape[1])), history.new_empty((1, history.shape[1]))
    coefficients = history.new_zeros((1, history.shape[0]))
    inner = {way: functools.partial(inner_products, rows, history, way) for way in inner_ways(history)}
    combined = {way: functools.partial(combine, coefficients, history, out, way) for way in combine_ways(history)}
    _PRODUCTS[key] = ProductWays(_fastest_way(inner, history.device, repeats), _fastest_way(combined, history.device, repeats))
    return _PRODUCTS[key]


def _fastest_way(ways: Mapping[W, Callable[[], object]], device: torch.device, repeats: int) -> W:
    """The fastest of ``ways`` (timed in turns); without oneDNN's if its operator refuses (another PyTorch build)."""
    try:
        return fastest(time_in_turns(ways, repeats, device))
    except RuntimeError:
        if "onednn" not in ways:
            raise
        return fastest(time_in_turns({way: run for way, run in ways.items() if way != "onednn"}, repeats, device))


class BatchedLBFGS:
    """Fixed-step L-BFGS with a separate history per batch item.

    The history is a ring buffer of ``(s, y, rho)`` slots shared in layout but
    not in content: an item whose new pair is rejected (or whose history was
    :meth:`reset`) has ``rho = 0`` and zero ``s``, ``y`` in the slot, which
    makes the slot an exact no-op in the two-loop recursion for that item only.

    Beside the pairs it keeps their inner products ``s_i . y_j`` and ``y_i . y_j``
    (``[B, m, m]``, one row and column updated per new pair), so that a step reads
    the history twice, in matrix products, instead of the two-loop's ~4m vector
    operations (:func:`two_loop_coefficients`). An item's pairs are stored interleaved,
    ``s_0, y_0, s_1, y_1, ...`` (``[B, m, 2, D]``), so each of the two reads is one product
    over one contiguous ``[2 used, D]`` matrix: at 256 px the history is 118 MB per item,
    and reading it is most of a step. The products are made item by item: a batched
    product may round an item differently from the same product alone.
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
        # Allocated at the first pair: the pairs ``[B, m, 2, D]`` (slot i of an item holds s_i then y_i),
        # rho ``[B, m]``, and the inner products s_i.y_j and y_i.y_j ``[B, m, m]``, indexed by slot.
        self._pairs: Tensor | None = None
        self._rho: Tensor | None = None
        self._sy: Tensor | None = None
        self._yy: Tensor | None = None
        self._rows: list[int] = []  # the slots in use, oldest first
        self._ways = ProductWays()  # how the products over the history run (measured at allocation)
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
        new_row = None
        if self._prev_grad is not None and self._prev_step is not None:
            new_row = self._remember(self._prev_step, g - self._prev_grad)
        direction = self._direction(g, new_row)
        # First step (or after a reset): scale so the first move is at most lr in L1 (torch7's choice).
        first = torch.linalg.vector_norm(g, 1, dim=1).clamp_min(1e-30).reciprocal().clamp(max=1.0) * self.lr
        # An item whose direction is not a descent direction falls back to steepest descent.
        not_descent = torch.linalg.vecdot(g, direction) > -1e-30
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
            self._rho.masked_fill_(items.unsqueeze(1), 0.0)
        self._h_diag = torch.where(items, torch.ones_like(self._h_diag), self._h_diag)
        self._fresh = self._fresh | items
        self._step_scale = torch.where(items, self._step_scale * step_factor, self._step_scale)
        if self._prev_step is not None:
            # s = 0 for the replaced items: the next pair has y.s = 0 and is rejected.
            self._prev_step = torch.where(items[:, None], torch.zeros_like(self._prev_step), self._prev_step)

    @torch.no_grad()
    def keep(self, items: Tensor, x: Tensor) -> None:
        """Go on with the batch items at the indices ``items`` only (in that order), as the batch ``x``.

        For an optimisation whose stopped items leave the batch (:func:`nst_core.engine.optimise`):
        each kept item's state is its own, so it goes on exactly as it would have in the whole batch.
        """
        del x  # the state is per item; the pixels are the caller's
        for name in ("_pairs", "_rho", "_sy", "_yy", "_prev_grad", "_prev_step"):
            if (value := getattr(self, name)) is not None:
                setattr(self, name, value.index_select(0, items))
        self._h_diag = self._h_diag.index_select(0, items)
        self._fresh = self._fresh.index_select(0, items)
        self._step_scale = self._step_scale.index_select(0, items)

    def _remember(self, s: Tensor, y: Tensor) -> int:
        """Store the pair ``(s, y)`` (``[B, D]`` each) in the next slot; returns the slot."""
        ys = torch.linalg.vecdot(y, s)
        accepted = ys > _CURVATURE_EPS
        rho = torch.where(accepted, ys.clamp_min(_CURVATURE_EPS).reciprocal(), torch.zeros_like(ys))
        yy = torch.linalg.vecdot(y, y).clamp_min(1e-30)
        self._h_diag = torch.where(accepted, ys / yy, self._h_diag)
        if self._pairs is None or self._rho is None or self._sy is None or self._yy is None:
            b, d, m = *s.shape, self.history
            self._pairs = s.new_zeros((b, m, 2, d))
            # Chosen for the full history and kept for every step: a lookup by the size of the rows in use
            # (2 x used, not 2 m) would miss while the ring fills, the first m steps of every run.
            self._ways = measure_products(self._pairs[0].reshape(2 * m, d))
            self._rho = s.new_zeros((b, m))
            self._sy, self._yy = s.new_zeros((b, m, m)), s.new_zeros((b, m, m))
        if len(self._rows) == self.history:
            row = self._rows.pop(0)  # the oldest slot is overwritten
        else:
            row = len(self._rows)
        # A rejected pair is zeroed too, so a non-finite y (a NaN gradient) cannot leak into the recursion.
        zero = s.new_zeros(())
        torch.where(accepted[:, None], s, zero, out=self._pairs[:, row, 0])
        torch.where(accepted[:, None], y, zero, out=self._pairs[:, row, 1])
        self._rho[:, row] = rho
        self._rows.append(row)
        return row

    def _direction(self, g: Tensor, new_row: int | None) -> Tensor:
        """-H g, per item; first the inner products of the pair just stored in ``new_row`` with the others.

        One product over the slots in use gives ``S g``, ``Y g`` and the new pair's row and column of
        ``s_i . y_j`` and ``y_i . y_j``; a second forms the direction (:func:`two_loop_coefficients`).
        """
        if self._pairs is None or self._rho is None or self._sy is None or self._yy is None:
            return -g * self._h_diag[:, None]
        used = len(self._rows)  # the ring fills slots 0..m-1 in turn, so the slots in use are the first ``used``
        # Oldest first: the ring is a rotation of 0..used-1. Made on the device (a tensor built from the
        # list would be a host-to-device copy, which waits for the GPU: one stall a step on CUDA).
        order = torch.arange(self._rows[0], self._rows[0] + used, device=g.device).remainder_(used)
        h = self._h_diag.to(g.dtype)
        out = torch.empty_like(g)
        for b in range(g.shape[0]):
            history = self._pairs[b, :used].reshape(2 * used, -1)  # rows s_0, y_0, s_1, y_1, ...
            if new_row is None:
                on = inner_products(g[b : b + 1], history, self._ways.inner)  # [1, 2 used]: g . s_i, g . y_i
            else:
                s_new, y_new = self._pairs[b, new_row]
                on = inner_products(torch.stack([s_new, y_new, g[b]]), history, self._ways.inner)  # [3, 2 used]
                on_s, on_y = on[:, 0::2], on[:, 1::2]
                self._sy[b, :used, new_row] = on_s[1]  # s_i . y_new
                self._sy[b, new_row, :used] = on_y[0]  # s_new . y_i
                self._yy[b, :used, new_row] = on_y[1]
                self._yy[b, new_row, :used] = on_y[1]
            sg, yg = on[-1, 0::2], on[-1, 1::2]
            sy, yy = self._sy[b, order][:, order], self._yy[b, order][:, order]
            on_s_coef, on_y_coef = two_loop_coefficients(sg[order], yg[order], sy, yy, self._rho[b, order], h[b])
            coefficients = g.new_zeros((used, 2))  # interleaved as the history's rows
            coefficients[order, 0], coefficients[order, 1] = on_s_coef, on_y_coef
            combine(coefficients.reshape(1, 2 * used), history, out[b : b + 1], self._ways.combine)
            out[b].addcmul_(g[b], h[b], value=-1.0)
        return out


def two_loop_coefficients(sg: Tensor, yg: Tensor, sy: Tensor, yy: Tensor, rho: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
    """The two-loop recursion (Nocedal & Wright, Algorithm 7.4) for one item, from inner products only.

    With the ``n`` pairs in chronological order as the rows of ``S`` and ``Y``, ``sg = S g``,
    ``yg = Y g``, ``sy[i, j] = s_i . y_j``, ``yy = Y Y^T``, ``rho_i = 1 / (y_i . s_i)`` (0 for a
    pair not to use) and ``h`` the initial Hessian scale, the recursion

        alpha_i = rho_i s_i . q_i,   q_i = -g - sum_{j>i} alpha_j y_j          (newest to oldest)
        beta_i  = rho_i y_i . r_i,   r_i = h q_0 + sum_{j<i} (alpha_j - beta_j) s_j   (oldest to newest)

    is two unit-triangular systems, with ``D = diag(rho)``, ``U`` the strict upper triangle of
    ``sy`` and ``L`` the strict lower triangle of its transpose (``L_ij = s_j . y_i``, ``j < i``):

        (I + D U) alpha = -D sg
        (I + D L) beta  = D (h (-yg - yy alpha) + L alpha)

    and the direction is ``-H g = -h g + S^T (alpha - beta) + Y^T (-h alpha)``: the two vectors of
    coefficients returned. A pair with ``rho_i = 0`` gets ``alpha_i = beta_i = 0``: a no-op.
    """
    n = sg.shape[0]
    eye = torch.eye(n, dtype=sg.dtype, device=sg.device)
    upper, lower = sy.triu(1), sy.transpose(0, 1).tril(-1)
    alpha = torch.linalg.solve_triangular(eye + rho[:, None] * upper, (-rho * sg)[:, None], upper=True, unitriangular=True)[:, 0]
    rhs = h * (-yg - yy @ alpha) + lower @ alpha
    beta = torch.linalg.solve_triangular(eye + rho[:, None] * lower, (rho * rhs)[:, None], upper=False, unitriangular=True)[:, 0]
    return alpha - beta, -h * alpha


class BatchedAdam:
    """Adam on the pixels (elementwise, so per-item independent by construction)."""

    def __init__(self, x: Tensor, *, lr: float, clamp: tuple[float, float] | None = None):
        self._adam = torch.optim.Adam([x], lr=lr)
        self.clamp = clamp

    def keep(self, items: Tensor, x: Tensor) -> None:
        """Go on with the batch items at the indices ``items`` only, as the batch ``x`` (see :meth:`BatchedLBFGS.keep`)."""
        (old,) = self._adam.param_groups[0]["params"]
        state = self._adam.state.get(old, {})
        self._adam = torch.optim.Adam([x], **{k: v for k, v in self._adam.defaults.items() if k != "params"})
        if state:
            self._adam.state[x] = {k: v.index_select(0, items) if isinstance(v, Tensor) and v.dim() > 0 else v for k, v in state.items()}

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
