"""Dictionary learning: spherical k-means, the orthogonality term, and NeuralDict."""

import math

import pytest
import torch

from csr_vllm.codec.pursuit import PURSUITS, reconstruct
from csr_vllm.dict_training.neuraldict import (
    neuraldict,
    orthogonality,
    pursuit_reconstruction,
    spherical_kmeans,
)


def union_of_subspaces(gen, n=2048, d=8, subspaces=12, rank=2, noise=0.02):
    """Vectors near a few random low-dimensional subspaces: structure a dictionary can learn."""
    bases = torch.randn(subspaces, rank, d, generator=gen)
    which = torch.randint(0, subspaces, (n,), generator=gen)
    z = torch.randn(n, rank, generator=gen)
    return torch.einsum("nk,nkd->nd", z, bases[which]) + noise * torch.randn(n, d, generator=gen)


def coding_mse(x, atoms, s, pursuit):
    idx, coef = PURSUITS[pursuit](x, atoms, s)
    return ((x - reconstruct(idx, coef, atoms)) ** 2).mean().item()


# -- spherical k-means ---------------------------------------------------------------------------


def test_spherical_kmeans_returns_unit_norm_atoms(gen):
    x = torch.randn(500, 8, generator=gen) * 3
    atoms = spherical_kmeans(x, 32, iters=5, generator=gen)
    assert atoms.shape == (32, 8)
    assert atoms.dtype == torch.float32
    torch.testing.assert_close(atoms.norm(dim=1), torch.ones(32))


def test_spherical_kmeans_is_deterministic_for_a_seed():
    x = torch.randn(300, 6, generator=torch.Generator().manual_seed(1))
    a = spherical_kmeans(x, 16, iters=4, generator=torch.Generator().manual_seed(7))
    b = spherical_kmeans(x, 16, iters=4, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_spherical_kmeans_finds_sign_invariant_cluster_directions(gen):
    directions = torch.nn.functional.normalize(torch.randn(4, 8, generator=gen), dim=1)
    which = torch.randint(0, 4, (800,), generator=gen)
    signs = torch.randint(0, 2, (800,), generator=gen) * 2 - 1
    lengths = torch.rand(800, generator=gen) + 0.5
    x = (signs * lengths)[:, None] * directions[which] + 0.01 * torch.randn(800, 8, generator=gen)
    atoms = spherical_kmeans(x, 4, iters=10, generator=gen)
    cos = (atoms @ directions.T).abs()
    # every true direction is matched by some atom, with either sign
    assert (cos.max(dim=0).values > 0.99).all()


def test_spherical_kmeans_needs_enough_vectors(gen):
    with pytest.raises(ValueError, match="cannot seed"):
        spherical_kmeans(torch.randn(10, 4, generator=gen), 16, generator=gen)


# -- orthogonality term --------------------------------------------------------------------------


@pytest.mark.parametrize(("num_atoms", "dim"), [(5, 3), (8, 8), (12, 4)])
def test_orthogonality_matches_direct_formula(unit_atoms, num_atoms, dim):
    atoms = unit_atoms(num_atoms, dim, dtype=torch.float64)
    w = atoms.T  # [Dc, A]: atoms are the columns of W
    eye = torch.eye(num_atoms, dtype=torch.float64)
    direct = sum(
        float((eye - w.T @ w)[i, j]) ** 2 for i in range(num_atoms) for j in range(num_atoms)
    ) / num_atoms**2
    assert orthogonality(atoms).item() == pytest.approx(direct, rel=1e-9, abs=1e-12)


def test_orthogonality_is_zero_for_an_orthonormal_basis(gen):
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=torch.float64))
    assert orthogonality(q.T).item() == pytest.approx(0.0, abs=1e-12)


def test_orthogonality_of_non_unit_atoms_matches_direct_formula(gen):
    atoms = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    direct = ((torch.eye(7, dtype=torch.float64) - atoms @ atoms.T) ** 2).sum() / 49
    assert orthogonality(atoms).item() == pytest.approx(direct.item(), rel=1e-9)


# -- NeuralDict ----------------------------------------------------------------------------------


@pytest.mark.parametrize("pursuit", ["mp", "omp"])
def test_pursuit_reconstruction_matches_the_codec_pursuit(gen, unit_atoms, pursuit):
    atoms = unit_atoms(16, 8).requires_grad_(True)
    x = torch.randn(64, 8, generator=gen)
    recon = pursuit_reconstruction(x, atoms, 3, pursuit)
    idx, coef = PURSUITS[pursuit](x, atoms.detach(), 3)
    torch.testing.assert_close(recon.detach(), reconstruct(idx, coef, atoms.detach()),
                               atol=1e-4, rtol=1e-4)
    recon.square().sum().backward()
    assert atoms.grad is not None
    assert atoms.grad.abs().sum() > 0


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True")
@pytest.mark.parametrize("pursuit", ["mp", "omp"])
def test_neuraldict_lowers_error_and_keeps_unit_atoms(gen, pursuit):
    x = union_of_subspaces(gen)
    init = spherical_kmeans(x, 32, iters=10, generator=gen)
    atoms, stats = neuraldict(x, init, s=2, pursuit=pursuit, steps=30, batch=1024, lr=1e-2,
                              generator=gen)
    assert atoms.shape == (32, 8)
    assert not atoms.requires_grad
    torch.testing.assert_close(atoms.norm(dim=1), torch.ones(32))
    assert stats.steps == 30
    assert stats.mse_end < stats.mse_start
    assert math.isfinite(stats.ortho_end) and stats.ortho_end >= 0
    # on the whole training set, the refined dictionary codes no worse than k-means alone
    assert coding_mse(x, atoms, 2, pursuit) <= coding_mse(x, init, 2, pursuit)


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True")
def test_neuraldict_does_not_modify_its_input(gen):
    x = union_of_subspaces(gen, n=256)
    init = spherical_kmeans(x, 16, iters=3, generator=gen)
    before = init.clone()
    neuraldict(x, init, s=2, steps=3, batch=128, lr=1e-2, generator=gen)
    assert torch.equal(init, before)
