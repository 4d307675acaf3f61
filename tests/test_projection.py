"""Projection maths: rSVD accuracy, power iterations, determinism, Grassmann steps."""

import math

import pytest
import torch

from lotus_dist.projection import (
    add_projected_back,
    grassmann_step,
    project,
    project_back,
    projection_side,
    random_basis,
    refresh_generator,
    rsvd_basis,
    svd_basis,
)


def spectrum_matrix(m: int, n: int, sigmas: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """U diag(sigmas) V^T with random orthonormal U, V."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(m, k, generator=g)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=g)).Q
    return (u * sigmas[:k]) @ v.T


def energy(grad: torch.Tensor, basis: torch.Tensor, side: str) -> float:
    return float(project(grad, basis, side).pow(2).sum())


@pytest.mark.parametrize("shape", [(256, 96), (96, 256)])
@pytest.mark.parametrize("rank", [4, 16, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rsvd_captures_exact_top_r_energy_on_decaying_spectrum(shape, rank, dtype):
    sigmas = torch.arange(1, 97, dtype=torch.float32).pow(-1.0)
    grad = spectrum_matrix(*shape, sigmas).to(dtype)
    side = projection_side(grad.shape, "std")
    exact = svd_basis(grad, rank, side)
    approx = rsvd_basis(grad, rank, side, oversample=8, power_iters=1,
                        generator=refresh_generator(0, 0, 0))
    assert approx.dtype == torch.float32
    assert energy(grad, approx, side) >= 0.99 * energy(grad, exact, side)


def test_power_iterations_help_on_flat_spectrum():
    sigmas = 1.0 / (1.0 + 0.02 * torch.arange(128, dtype=torch.float32))
    grad = spectrum_matrix(128, 384, sigmas, seed=1)
    side = projection_side(grad.shape, "std")
    exact = energy(grad, svd_basis(grad, 16, side), side)

    def mean_energy(q: int) -> float:
        return sum(energy(grad, rsvd_basis(grad, 16, side, oversample=4, power_iters=q,
                                           generator=refresh_generator(s, 0, 0)), side)
                   for s in range(5)) / 5 / exact

    e0, e1, e2 = mean_energy(0), mean_energy(1), mean_energy(2)
    assert e0 < e1 < e2 <= 1.0 + 1e-6
    assert e2 - e0 > 0.02  # a measurable gain, not noise


@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
def test_bases_are_orthonormal(shape):
    grad = torch.randn(*shape)
    side = projection_side(shape, "std")
    gen = refresh_generator(3, 1, 2)
    for basis in (svd_basis(grad, 8, side),
                  rsvd_basis(grad, 8, side, oversample=4, power_iters=2, generator=gen),
                  random_basis(24, 8, gen)):
        assert basis.shape == (24, 8)
        torch.testing.assert_close(basis.T @ basis, torch.eye(8), atol=1e-5, rtol=0)


def test_generator_is_pure_function_of_seed_index_and_refresh_count():
    def draw(*key):
        return torch.randn(4, generator=refresh_generator(*key))

    assert torch.equal(draw(1, 2, 3), draw(1, 2, 3))
    assert not torch.equal(draw(1, 2, 3), draw(1, 2, 4))
    assert not torch.equal(draw(1, 2, 3), draw(1, 3, 3))
    assert not torch.equal(draw(1, 2, 3), draw(2, 2, 3))


def test_std_side_projects_the_smaller_dimension_like_galore():
    assert projection_side((512, 128), "std") == "right"
    assert projection_side((128, 512), "std") == "left"
    assert projection_side((128, 128), "std") == "right"
    assert projection_side((512, 128), "reverse_std") == "left"
    grad = torch.randn(30, 10)
    basis = svd_basis(grad, 10, "right")  # full rank: projection is lossless
    torch.testing.assert_close(project_back(project(grad, basis, "right"), basis, "right"), grad,
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_adding_the_update_back_in_place_equals_forming_it(side, dtype):
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(24, 10, generator=gen, dtype=torch.float64)
    basis = random_basis(24 if side == "left" else 10, 4, gen, dtype=torch.float64)
    low_rank = torch.randn((4, 10) if side == "left" else (24, 4), generator=gen,
                           dtype=torch.float64)
    expected = weight - 0.3 * project_back(low_rank, basis, side)
    out = weight.to(dtype)
    add_projected_back(out, low_rank, basis, side, alpha=-0.3)
    tol = 1e-12 if dtype == torch.float64 else 1e-2  # bf16: formed in fp64, then cast
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)
    assert out.dtype == dtype


def test_grassmann_step_moves_by_the_requested_largest_angle():
    basis = random_basis(64, 6, refresh_generator(0, 0, 0))
    moved = grassmann_step(basis, 0.3, refresh_generator(0, 0, 1))
    torch.testing.assert_close(moved.T @ moved, torch.eye(6), atol=1e-5, rtol=0)
    cosines = torch.linalg.svdvals(basis.T @ moved)  # cosines of the principal angles
    assert math.isclose(float(torch.arccos(cosines.min().clamp(max=1))), 0.3, abs_tol=1e-3)


def test_projections_may_use_tf32_and_bases_never_do(monkeypatch):
    """Whatever the process chose, R is formed with TF32 allowed and the rSVD in full
    fp32 (on CUDA; the flag is read by CUDA matmuls only)."""
    import lotus_dist.projection as projection

    seen = {}
    plain_upcast, plain_orth = projection.upcast, projection.orthonormalize

    def recording_upcast(t):
        seen["project"] = torch.backends.cuda.matmul.fp32_precision
        return plain_upcast(t)

    def recording_orth(t):
        seen["rsvd"] = torch.backends.cuda.matmul.fp32_precision
        return plain_orth(t)

    monkeypatch.setattr(projection, "upcast", recording_upcast)
    monkeypatch.setattr(projection, "orthonormalize", recording_orth)
    before = torch.backends.cuda.matmul.fp32_precision
    grad = torch.randn(32, 16, generator=torch.Generator().manual_seed(0))
    for process_wide in ("tf32", "ieee"):
        torch.backends.cuda.matmul.fp32_precision = process_wide
        basis = projection.rsvd_basis(grad, 4, "right", oversample=4, power_iters=1,
                                      generator=refresh_generator(0, 0, 0))
        projection.project(grad, basis, "right")
        assert seen == {"project": "tf32", "rsvd": "ieee"}
        assert torch.backends.cuda.matmul.fp32_precision == process_wide  # restored
    torch.backends.cuda.matmul.fp32_precision = before
