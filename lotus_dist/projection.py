"""Low-rank bases for gradient projection: exact SVD, randomized SVD, random, Grassmann walk.

Conventions. A projected weight W has shape (m, n). Its basis is a (d, r) matrix with
orthonormal columns, where d is the dimension being compressed:

* ``left``  (d = m): R = B^T G   -> (r, n),  back-projection B R
* ``right`` (d = n): R = G B     -> (m, r),  back-projection R B^T

``proj_type="std"`` picks the side that compresses the smaller dimension, as GaLore's
``std`` type does (m >= n -> right). All basis maths runs in fp32 whatever the
gradient dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

Reduce = Callable[[torch.Tensor], torch.Tensor]

PROJ_TYPES = ("std", "reverse_std", "left", "right")
PROJECTIONS = ("svd", "rsvd", "random", "grassmann")


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def projection_side(shape: tuple[int, int] | torch.Size, proj_type: str) -> str:
    """Return "left" or "right" for a weight of ``shape`` under GaLore's ``proj_type``."""
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    if proj_type in ("left", "right"):
        return proj_type
    raise ValueError(f"proj_type must be one of {PROJ_TYPES}, got {proj_type!r}")


def projected_dim(shape: tuple[int, int] | torch.Size, side: str) -> int:
    """The dimension a basis spans (the one compressed to ``rank``)."""
    return shape[0] if side == "left" else shape[1]


def project(grad: torch.Tensor, basis: torch.Tensor, side: str) -> torch.Tensor:
    """Low-rank coordinates of ``grad`` in ``basis`` (fp32)."""
    g = grad.float()
    return basis.T @ g if side == "left" else g @ basis


def project_back(low_rank: torch.Tensor, basis: torch.Tensor, side: str) -> torch.Tensor:
    """Map low-rank coordinates back to the weight's shape (fp32)."""
    return basis @ low_rank if side == "left" else low_rank @ basis.T


def refresh_generator(seed: int, param_index: int, refresh_count: int,
                      device: torch.device | str = "cpu") -> torch.Generator:
    """A generator that is a pure function of (seed, parameter index, refresh count).

    Every rank draws the same test matrix without communicating, and a resumed run draws
    the same numbers as one that never stopped. The three integers are mixed with
    splitmix64 so that neighbouring indices give unrelated streams.
    """
    x = (seed * 0x9E3779B97F4A7C15 + param_index * 0xBF58476D1CE4E5B9 + refresh_count) & (2**64 - 1)
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    gen = torch.Generator(device=device)
    gen.manual_seed(x & (2**63 - 1))
    return gen


def _oriented(grad: torch.Tensor, side: str) -> torch.Tensor:
    """View G as A (d x k) whose column space the basis approximates."""
    g = grad.float()
    return g if side == "left" else g.T


def svd_basis(grad: torch.Tensor, rank: int, side: str) -> torch.Tensor:
    """Exact top-``rank`` singular vectors, computed on G itself as GaLore does.

    Using G (not G^T) keeps the sign convention of GaLore's basis, which matters when Adam
    moments are kept across refreshes.
    """
    u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
    return u[:, :rank].contiguous() if side == "left" else vh[:rank].T.contiguous()


def orthonormalize(y: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the column space of ``y`` (reduced QR)."""
    return torch.linalg.qr(y, mode="reduced").Q


@dataclass(frozen=True)
class RsvdComm:
    """Where a distributed rSVD reduces (all identity in one process).

    With A (d x k) the oriented gradient, the algorithm forms d x l sketches (A Omega,
    A Z), k x l co-sketches (A^T Q) and the l x l Gram of B = Q^T A:

    * A sharded over its k columns (FSDP, shard on the kept dimension): ``sketch`` and
      ``gram`` sum over shards; the co-sketch rows stay local. ``columns`` names this
      shard's columns of A, hence its rows of the shared Omega.
    * A sharded over its d rows (FSDP, shard on the compressed dimension): ``sketch``
      gathers the rows of each shard, ``cosketch`` sums over shards and the Gram is
      then local. ``rows`` names this shard's rows of A, hence its rows of Q.
    * A replicated per rank, the target being the rank mean (DDP): ``sketch`` and
      ``cosketch`` average over ranks and the Gram is then local.

    Every collective is a (d or k) x l sketch or the l x l Gram, never a full gradient.
    ``shape`` is the (d, k) of the whole A where a shard is passed: the sketch width and
    Omega are drawn for it, so every world size draws the same numbers.
    """

    sketch: Reduce = _identity
    cosketch: Reduce = _identity
    gram: Reduce = _identity
    shape: tuple[int, int] | None = None
    columns: slice | None = None
    rows: slice | None = None

    def own_rows(self, q: torch.Tensor) -> torch.Tensor:
        """The rows of a d-row sketch that meet this shard's rows of A."""
        return q if self.rows is None else q[self.rows]


def rsvd_basis(
    grad: torch.Tensor,
    rank: int,
    side: str,
    *,
    oversample: int,
    power_iters: int,
    generator: torch.Generator,
    omega: torch.Tensor | None = None,
    comm: RsvdComm = RsvdComm(),
) -> torch.Tensor:
    """Top-``rank`` basis by randomized SVD with power iterations (Lotus Algorithm 1).

    With A = G (left) or G^T (right), of shape (d, k): Y = A Omega with a Gaussian
    Omega of k x (rank + oversample); q power iterations Y <- A (A^T orth(Y)) raise the
    spectrum to the power 2q + 1 (Lotus eq. 1); then B = Q^T A and the eigenvectors of
    the small Gram B B^T rotate Q onto the top singular directions. A caller holding a
    shard of A says in ``comm`` where to reduce and which part of A it holds (or passes
    its rows of ``omega`` itself).
    """
    a = _oriented(grad, side)
    d, k = comm.shape or a.shape
    width = min(rank + oversample, d)
    if omega is None:
        omega = torch.randn(k, width, generator=generator, device=a.device, dtype=torch.float32)
        if comm.columns is not None:
            omega = omega[comm.columns]
    y = comm.sketch(a @ omega)
    for _ in range(power_iters):
        q = orthonormalize(y)
        y = comm.sketch(a @ comm.cosketch(a.T @ comm.own_rows(q)))
    q = orthonormalize(y)
    b = comm.cosketch((a.T @ comm.own_rows(q)).T)
    gram = comm.gram(b @ b.T)
    _, evecs = torch.linalg.eigh(gram)  # ascending eigenvalues
    top = evecs[:, -rank:].flip(-1)
    return (q @ _fix_signs(top)).contiguous()


def _fix_signs(vectors: torch.Tensor) -> torch.Tensor:
    """Flip each column so that its largest-magnitude entry is positive.

    An eigensolver's signs are arbitrary and can flip under rounding-level changes of its
    input (its iteration count changes). Kept Adam moments live in the basis
    coordinates, so a flipped column would flip the sign of that coordinate's gradient
    against its momentum; a fixed rule keeps runs that differ only by summation order
    (1 vs N ranks) on the same basis.
    """
    pivot = vectors.gather(0, vectors.abs().argmax(dim=0, keepdim=True))
    return vectors * torch.where(pivot < 0, -1.0, 1.0)


def random_basis(d: int, rank: int, generator: torch.Generator,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """An orthonormalised Gaussian basis, independent of the gradient (GrassJump / RSO)."""
    z = torch.randn(d, rank, generator=generator, device=device, dtype=torch.float32)
    return orthonormalize(z)


def grassmann_step(basis: torch.Tensor, step: float, generator: torch.Generator) -> torch.Tensor:
    """A random geodesic step on the Grassmannian from ``basis`` (GrassWalk).

    A Gaussian direction is projected onto the tangent space at S, X = (I - S S^T) Z,
    and scaled so its largest singular value is 1. With X = U diag(s) V^T the geodesic is
    S(t) = S V cos(s t) V^T + U sin(s t) V^T, so ``step`` is the largest principal angle
    (radians) between the old and the new subspace.
    """
    d, r = basis.shape
    z = torch.randn(d, r, generator=generator, device=basis.device, dtype=torch.float32)
    x = z - basis @ (basis.T @ z)
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    angles = s / s.max().clamp_min(torch.finfo(s.dtype).tiny) * step
    moved = (basis @ vh.T) * torch.cos(angles) @ vh + (u * torch.sin(angles)) @ vh
    return orthonormalize(moved)


def captured_energy(low_rank: torch.Tensor, grad: torch.Tensor) -> float:
    """||R||_F / ||G||_F: the fraction of gradient norm the basis keeps."""
    g_norm = grad.float().norm()
    return float(low_rank.norm() / g_norm) if g_norm > 0 else math.nan
