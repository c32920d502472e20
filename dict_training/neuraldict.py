"""Dictionary learning: spherical k-means initialisation, then NeuralDict.

NeuralDict (CSR paper, Alg. 1): the dictionary is the weight W [Dc, A] of a bias-free linear
layer (atoms are its columns, stored here as rows [A, Dc]). Each step runs the pursuit with the
current atoms to choose the support, rebuilds the vectors through that support with gradients
flowing into the atoms, and minimises

    MSE(x, x_hat) + beta * (1/A^2) * ||I - W^T W||_F^2,   beta = clamp(0.1 * MSE / div, 0, 1)

where div is the (detached) orthogonality term; atoms are renormalised after every step.
``||I - W^T W||_F^2`` is computed as ``A - 2 tr(W^T W) + ||W W^T||_F^2`` (an [Dc, Dc] product
instead of an [A, A] one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from csr_vllm.codec.pursuit import PURSUITS, best_atom, least_squares_coefficients


@torch.no_grad()
def spherical_kmeans(x: Tensor, num_atoms: int, iters: int = 10,
                     generator: torch.Generator | None = None) -> Tensor:
    """Unit-norm centroids [A, Dc] of the directions of x [N, Dc] (sign-invariant).

    Assignment uses |cosine| because a sparse code may use an atom with either sign.
    Empty clusters are reseeded from the worst-fitted points.
    """
    u = F.normalize(x.float(), dim=1)
    n = u.shape[0]
    if n < num_atoms:
        raise ValueError(f"{n} training vectors cannot seed {num_atoms} atoms")
    atoms = u[torch.randperm(n, generator=generator)[:num_atoms]].clone()
    for _ in range(iters):
        assign, best = best_atom(u, atoms)
        sign, fit = best.sign(), best.abs()
        sums = torch.zeros_like(atoms).index_add_(0, assign, u * sign[:, None])
        counts = torch.bincount(assign, minlength=num_atoms)
        empty = (counts == 0).nonzero().flatten()
        if len(empty):
            worst = fit.argsort()[: len(empty)]
            sums[empty] = u[worst]
        atoms = F.normalize(sums, dim=1)
    return atoms


def orthogonality(atoms: Tensor) -> Tensor:
    """(1/A^2) * ||I - W^T W||_F^2 for atoms [A, Dc] (rows = columns of W)."""
    a = atoms.shape[0]
    gram_small = atoms.T @ atoms  # W W^T, [Dc, Dc]
    tr = (atoms * atoms).sum()
    return (a - 2 * tr + (gram_small * gram_small).sum()) / (a * a)


def pursuit_reconstruction(x: Tensor, atoms: Tensor, s: int, pursuit: str) -> Tensor:
    """x_hat [N, Dc] through the support the pursuit picks, differentiable w.r.t. ``atoms``."""
    with torch.no_grad():
        idx, _ = PURSUITS[pursuit](x, atoms.detach(), s)
    if pursuit == "omp":
        coef = least_squares_coefficients(x, atoms, idx)
        return torch.einsum("ns,nsd->nd", coef, atoms[idx])
    residual = x
    for k in range(s):
        d = atoms[idx[:, k]]
        residual = residual - (residual * d).sum(-1, keepdim=True) * d
    return x - residual


@dataclass
class NeuralDictStats:
    """Loss trace of one NeuralDict run."""

    mse_start: float
    mse_end: float
    ortho_end: float
    steps: int


def neuraldict(x: Tensor, atoms: Tensor, s: int, pursuit: str = "omp", steps: int = 100,
               batch: int = 4096, lr: float = 1e-3,
               generator: torch.Generator | None = None) -> tuple[Tensor, NeuralDictStats]:
    """Refine ``atoms`` [A, Dc] on vectors x [N, Dc] by NeuralDict; returns unit-norm atoms."""
    weight = torch.nn.Parameter(atoms.clone().float())
    opt = torch.optim.Adam([weight], lr=lr)
    x = x.float()
    trace = []
    ortho = torch.tensor(0.0)
    for _ in range(steps):
        xb = x[torch.randint(0, x.shape[0], (batch,), generator=generator)]
        recon = pursuit_reconstruction(xb, weight, s, pursuit)
        mse = F.mse_loss(recon, xb)
        ortho = orthogonality(weight)
        beta = (0.1 * mse.detach() / ortho.detach().clamp_min(1e-12)).clamp(0, 1)
        loss = mse + beta * ortho
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            weight.copy_(F.normalize(weight, dim=1))
        trace.append(float(mse.detach()))
    stats = NeuralDictStats(trace[0], sum(trace[-10:]) / min(10, len(trace)), float(ortho.detach()), steps)
    return weight.detach(), stats
