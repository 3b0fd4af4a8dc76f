"""Linear CKA, two estimators, from raw Gram matrices (SPEC.md section 6d).

With K = X X^T and L = Y Y^T over n inputs, and K~, L~ those with their diagonals set to 0:

    unbiased (Song et al. 2012; Nguyen, Raghu, Kornblith 2021)
        HSIC_1 = [tr(K~ L~) + (1^T K~ 1)(1^T L~ 1)/((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1] / (n(n-3))
    biased (Kornblith et al. 2019)
        HSIC_0 = tr(K H L H) / (n-1)^2,   H = I - 11^T/n
    CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))

The biased estimator of two independent d-dimensional representations is of order d/n, not 0; the unbiased one
is 0 in expectation, and so it can be averaged over minibatches (Nguyen et al.): `MinibatchCKA` sums each HSIC over
minibatches of tokens and takes the ratio of the sums, so memory is one n x n Gram matrix per representation and
never grows with the number of tokens.

Every HSIC of a pair comes from three statistics of each Gram (its diagonal d, row sums r, total t) and one of the pair,
S = sum(K * L), a single matrix product over the stacked Grams of all representations:

    tr(K~ L~) = S - d_K.d_L     1^T K~ 1 = t_K - sum d_K     1^T K~ L~ 1 = (r_K - d_K).(r_L - d_L)
    tr(K H L H) = S - (2/n) r_K.r_L + t_K t_L / n^2
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class GramStats:
    """The Grams of r representations of the same n inputs, stacked (r, n, n), float64, and their statistics."""

    gram: Tensor
    diag: Tensor  # (r, n)
    rows: Tensor  # (r, n)
    total: Tensor  # (r,)

    @classmethod
    def of(cls, reps: list[Tensor]) -> GramStats:
        """`reps`: r tensors (n, d_k), any float dtype; computed in float64."""
        gram = torch.stack([(x.double() @ x.double().T) for x in reps])
        return cls(gram, torch.diagonal(gram, dim1=1, dim2=2), gram.sum(2), gram.sum((1, 2)))

    @property
    def n(self) -> int:
        return int(self.gram.shape[-1])

    @functools.cached_property
    def own(self) -> dict[str, Tensor]:
        """HSIC(K, K) of each representation (r,), both estimators."""
        return self_hsic(self)


def hsic(a: GramStats, b: GramStats) -> dict[str, Tensor]:
    """Both estimators of HSIC for every pair (representation of `a`, representation of `b`): (r_a, r_b) each."""
    return _estimators(a.n, a.gram.flatten(1) @ b.gram.flatten(1).T, a.diag @ b.diag.T, a.rows @ b.rows.T,
                       (a.rows - a.diag) @ (b.rows - b.diag).T, a.total[:, None], a.diag.sum(1)[:, None],
                       b.total[None, :], b.diag.sum(1)[None, :])


def self_hsic(a: GramStats) -> dict[str, Tensor]:
    """HSIC(K, K) of each representation (r,): the diagonal of `hsic(a, a)` without its r x r matrix."""
    return _estimators(a.n, (a.gram.flatten(1) ** 2).sum(1), (a.diag ** 2).sum(1), (a.rows ** 2).sum(1),
                       ((a.rows - a.diag) ** 2).sum(1), a.total, a.diag.sum(1), a.total, a.diag.sum(1))


def _estimators(n: int, s: Tensor, dd: Tensor, rr: Tensor, cross: Tensor, ta: Tensor, da: Tensor, tb: Tensor,
                db: Tensor) -> dict[str, Tensor]:
    """The module docstring's identities: s = sum(K*L), dd = d_K.d_L, rr = r_K.r_L, cross = (r_K-d_K).(r_L-d_L),
    t totals and d diagonal sums of each side."""
    if n < 4:
        raise ValueError(f"the unbiased HSIC needs at least 4 inputs, got {n}")
    ka, kb = ta - da, tb - db  # 1^T K~ 1
    unbiased = (s - dd + ka * kb / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * cross) / (n * (n - 3))
    biased = (s - 2.0 / n * rr + ta * tb / n**2) / (n - 1) ** 2
    return {"unbiased": unbiased, "biased": biased}


def cka(x: Tensor, y: Tensor) -> dict[str, float]:
    """Both estimators of linear CKA between two representations (n, d_x), (n, d_y) of the same n inputs."""
    acc = MinibatchCKA()
    acc.update([x], [y])
    return {e: float(m[0, 0]) for e, m in acc.result().items()}


class MinibatchCKA:
    """CKA between each of one set of representations and each of another, over minibatches of the same inputs:
    each HSIC summed over the minibatches, CKA the ratio of the sums (Nguyen et al. 2021's minibatch CKA)."""

    def __init__(self) -> None:
        self.xy: dict[str, Tensor] = {}
        self.xx: dict[str, Tensor] = {}
        self.yy: dict[str, Tensor] = {}
        self.batches = 0

    def update(self, xs: list[Tensor], ys: list[Tensor]) -> None:
        self.add(GramStats.of(xs), GramStats.of(ys))

    def add(self, a: GramStats, b: GramStats) -> None:
        """One minibatch (a Gram shared by several pairs is computed once, and so is its self-HSIC)."""
        for store, value in ((self.xy, hsic(a, b)), (self.xx, a.own), (self.yy, b.own)):
            for e, v in value.items():
                store[e] = store[e] + v if e in store else v.clone()
        self.batches += 1

    def result(self) -> dict[str, Tensor]:
        """{"unbiased", "biased"}: (r_a, r_b) float64 CKA matrices (NaN where a self-HSIC is not positive)."""
        if not self.batches:
            raise ValueError("no minibatch was added")
        out = {}
        for e, xy in self.xy.items():
            norm = self.xx[e][:, None] * self.yy[e][None, :]
            out[e] = torch.where(norm > 0, xy / norm.clamp_min(1e-300).sqrt(), torch.full_like(xy, float("nan")))
        return out


__all__ = ["GramStats", "hsic", "self_hsic", "cka", "MinibatchCKA"]
