"""Losses of the robust trainers: CAMEL's subgroup consistency and (class-conditional) Group DRO.

Formulas follow ``research/camel_gdro.md``:

- :func:`consistency_loss` is CAMEL's ``consistency_type='camel'`` penalty (§1.2)::

      ℓ_c = ½·KL(p_x ‖ m) + ¼·KL(p_F ‖ m) + ¼·KL(p_G ‖ m),   m = (p_F + p_G) / 2

  with ``KL(p ‖ m) = Σ_c p_c·log(p_c / m_c)`` (the individual prediction first, the mixture
  second, as Keras' ``KLD(y_true=p, y_pred=m)``), both arguments clamped to ``[1e-7, 1]`` and
  **no** detach: gradients flow through ``p_x``, ``p_F``, ``p_G`` and ``m``.
- :class:`GroupDRO` is Sagawa et al.'s online Group DRO (§5) and, with ``class_conditional``,
  CAMEL's class-conditional variant (§1.3): per-cell logits ``a ← a + η·(ℓ + C/√n)`` computed
  from **detached** losses, ``q = softmax`` within each class (or over all cells), and the loss
  ``Σ_y w_y Σ_z q_{y,z}·(ℓ_{y,z} + C/√n_{y,z})`` with ``w_y`` = the class's share of the cells.
  The q update comes first, then the loss is weighted with the new q (Sagawa's order).
"""

from __future__ import annotations

import torch

EPS = 1e-7


def kl_div(p: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Per-row ``KL(p ‖ m) = Σ_c p·log(p/m)`` of probability rows, clamped like Keras' ``KLD``."""
    p = p.clamp(EPS, 1.0)
    m = m.clamp(EPS, 1.0)
    return (p * (p.log() - m.log())).sum(dim=-1)


def consistency_terms(p_x: torch.Tensor, p_f: torch.Tensor, p_g: torch.Tensor) -> torch.Tensor:
    """Per-example CAMEL consistency ``½KL(p_x‖m) + ¼KL(p_F‖m) + ¼KL(p_G‖m)``, shape ``[B]``."""
    m = (p_f + p_g) / 2
    return 0.5 * kl_div(p_x, m) + 0.25 * kl_div(p_f, m) + 0.25 * kl_div(p_g, m)


def consistency_loss(p_x: torch.Tensor, p_f: torch.Tensor, p_g: torch.Tensor) -> torch.Tensor:
    """Batch mean of :func:`consistency_terms` (softmax probabilities in, a scalar out)."""
    return consistency_terms(p_x, p_f, p_g).mean()


def cell_means(
    losses: torch.Tensor, cells: torch.Tensor, n_cells: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean loss per cell (0 where a cell is absent from the batch) and the presence mask."""
    one_hot = torch.zeros(n_cells, losses.shape[0], device=losses.device, dtype=losses.dtype)
    one_hot[cells, torch.arange(losses.shape[0], device=losses.device)] = 1.0
    counts = one_hot.sum(dim=1)
    means = (one_hot @ losses) / counts.clamp(min=1.0)
    return means, counts > 0


class GroupDRO:
    """Online Group DRO over cells ``cell = y * groups_per_class + g``.

    ``counts[y, g]`` are the training counts of each cell (cells with 0 examples are ignored).
    ``eta`` is the step size of the exponentiated-gradient update, ``adj_coef`` the C of the
    C/√n generalization adjustment. ``class_conditional`` normalises q within each class (CAMEL);
    otherwise one softmax over all cells (Sagawa).
    """

    def __init__(
        self,
        counts: torch.Tensor,
        eta: float = 0.01,
        adj_coef: float = 0.0,
        class_conditional: bool = True,
    ) -> None:
        self.shape = tuple(counts.shape)
        n = counts.to(torch.float32).flatten()
        self.valid = n > 0
        self.adj = torch.where(self.valid, adj_coef / n.clamp(min=1.0).sqrt(), torch.zeros_like(n))
        self.eta = eta
        self.class_conditional = class_conditional
        self.logits = torch.zeros_like(n)
        per_class = self.valid.view(self.shape).sum(dim=1).to(torch.float32)
        self.class_weight = per_class / per_class.sum()

    @property
    def q(self) -> torch.Tensor:
        """Current weights per cell, shape ``[classes, groups]`` (0 for empty cells)."""
        a = self.logits.masked_fill(~self.valid, float("-inf")).view(self.shape)
        if self.class_conditional:
            q = torch.softmax(a, dim=1)
            q = torch.nan_to_num(q, nan=0.0)  # a class with no valid cell
        else:
            q = torch.softmax(a.flatten(), dim=0).view(self.shape)
        return q

    def update(self, cell_loss: torch.Tensor, present: torch.Tensor) -> None:
        """``a ← a + η·(ℓ + adj)`` for cells present in the batch, from detached losses."""
        step = self.eta * (cell_loss.detach().cpu() + self.adj)
        self.logits = self.logits + torch.where(present.cpu() & self.valid, step, 0.0)

    def loss(self, losses: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        """Update q with this batch, then return the q-weighted robust loss (a scalar)."""
        cell_loss, present = cell_means(losses, cells, self.valid.numel())
        self.update(cell_loss, present)
        q = self.q.flatten().to(losses.device)
        adjusted = cell_loss + self.adj.to(losses.device)
        if not self.class_conditional:
            return (q * adjusted).sum()
        per_class = (q * adjusted).view(self.shape).sum(dim=1)
        return (self.class_weight.to(losses.device) * per_class).sum()
