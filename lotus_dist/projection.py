"""Low-rank bases for gradient projection: exact SVD, randomized SVD, random, Grassmann walk.

Conventions. A projected weight W has shape (m, n). Its basis is a (d, r) matrix with
orthonormal columns, where d is the dimension being compressed:

* ``left``  (d = m): R = B^T G   -> (r, n),  back-projection B R
* ``right`` (d = n): R = G B     -> (m, r),  back-projection R B^T

``proj_type="std"`` picks the side that compresses the smaller dimension, as GaLore's
``std`` type does (m >= n -> right). All basis maths runs in fp32 whatever the
gradient dtype. On CUDA, projections and back-projections may use TF32 tensor cores (R
only feeds Adam, whose update is normalised), while the bases are computed in full fp32
(``matmul_precision``): TF32's 10-bit mantissa would blur the small singular values an
rSVD separates, whatever the process-wide setting.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from lotus_dist.precision import compute_dtype, upcast

Reduce = Callable[[torch.Tensor], torch.Tensor]

PROJ_TYPES = ("std", "reverse_std", "left", "right")
PROJECTIONS = ("svd", "rsvd", "random", "grassmann")
#: Workspace cap of one refresh batch: the test matrices, sketches and co-sketches of a
#: batched rSVD (``rsvd_batch_size``), the whole bases of a shared burst of exact SVDs.
#: At 7b (rank 1024) a refresh of all 224 matrices then runs as batches of 4 (MLP) to 7
#: (attention) rSVDs instead of allocating every sketch at once.
REFRESH_BATCH_BYTES = 512 * 2**20


@contextlib.contextmanager
def matmul_precision(precision: str) -> Iterator[None]:
    """CUDA fp32 matmuls as ``precision`` ("tf32" or "ieee") inside the block, then back
    to what the process had; no effect on CPU matmuls."""
    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision
    matmul.fp32_precision = precision
    try:
        yield
    finally:
        matmul.fp32_precision = saved


def _with_precision(precision: str) -> Callable[[Callable], Callable]:
    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            with matmul_precision(precision):
                return fn(*args, **kwargs)
        return inner
    return wrap


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


@_with_precision("tf32")
def project(grad: torch.Tensor, basis: torch.Tensor, side: str) -> torch.Tensor:
    """Low-rank coordinates of ``grad`` in ``basis`` (in the compute dtype)."""
    g = upcast(grad)
    return basis.T @ g if side == "left" else g @ basis


@_with_precision("tf32")
def project_back(low_rank: torch.Tensor, basis: torch.Tensor, side: str) -> torch.Tensor:
    """Map low-rank coordinates back to the weight's shape (in the compute dtype)."""
    return basis @ low_rank if side == "left" else low_rank @ basis.T


@_with_precision("tf32")
def add_projected_back(out: torch.Tensor, low_rank: torch.Tensor, basis: torch.Tensor,
                       side: str, alpha: float) -> None:
    """out += alpha * project_back(low_rank, basis, side), in place.

    One ``addmm_`` where ``out`` has the compute dtype, so the full-size update is never
    formed (a 4096 x 11008 fp32 temporary per matrix at 7B) and the scale, the step size
    and the add are one kernel; other dtypes (a bf16 parameter) form it and cast.
    """
    a, b = (basis, low_rank) if side == "left" else (low_rank, basis.T)
    if out.dtype == a.dtype:
        out.addmm_(a, b, alpha=alpha)
    else:
        out.add_((a @ b).to(out.dtype), alpha=alpha)


def refresh_generator(seed: int, param_index: int, refresh_count: int,
                      stream: int = 0) -> torch.Generator:
    """A CPU generator that is a pure function of (seed, parameter index, refresh count).

    Every rank draws the same test matrix without communicating, and a resumed run draws
    the same numbers as one that never stopped, on any device: draws happen on the CPU
    (``draw``) because CUDA's ``randn`` of a large tensor depends on the GPU model's SM
    count, so replicas on mixed GPUs, or a resume on another GPU model, would differ. The
    three integers are mixed with splitmix64 so that neighbouring indices give unrelated
    streams. ``stream`` selects an independent stream for a second use at the same refresh
    (0 is the basis's own).
    """
    x = (seed * 0x9E3779B97F4A7C15 + param_index * 0xBF58476D1CE4E5B9 + refresh_count
         + stream * 0xD1B54A32D192ED03) & (2**64 - 1)
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    gen = torch.Generator()
    gen.manual_seed(x & (2**63 - 1))
    return gen


def draw(shape: tuple[int, ...], generator: torch.Generator, device: torch.device | str,
         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal values drawn in fp32 on ``generator``'s CPU, then moved: the same
    numbers on every device and in fp32 and fp64 runs alike. Refreshes are rare, so the
    copy costs little next to the sketch it feeds."""
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device, dtype)


def _oriented(grad: torch.Tensor, side: str) -> torch.Tensor:
    """View G as A (d x k) whose column space the basis approximates."""
    g = upcast(grad)
    return g if side == "left" else g.T


def svd_basis(grad: torch.Tensor, rank: int, side: str) -> torch.Tensor:
    """Exact top-``rank`` singular vectors, computed on G itself as GaLore does.

    Using G (not G^T) keeps the sign convention of GaLore's basis, which matters when Adam
    moments are kept across refreshes.
    """
    u, _, vh = torch.linalg.svd(upcast(grad), full_matrices=False)
    return u[:, :rank].contiguous() if side == "left" else vh[:rank].T.contiguous()


def orthonormalize(y: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the column space of ``y`` (reduced QR)."""
    return torch.linalg.qr(y, mode="reduced").Q


@dataclass(frozen=True)
class RsvdComm:
    """Where a distributed rSVD reduces (all identity in one process).

    With A (d x k) the oriented gradient, the algorithm forms d x l sketches (A Omega,
    A Z), k x l co-sketches (A^T Q) and l x l Gram matrices (Z^T Z, B B^T):

    * A sharded over its k columns (FSDP, shard on the kept dimension): ``sketch`` and
      ``gram`` sum over shards; the co-sketch rows stay local. ``columns`` names this
      shard's columns of A, hence its rows of the shared Omega.
    * A sharded over its d rows (FSDP, shard on the compressed dimension): ``sketch``
      gathers the rows of each shard, ``cosketch`` sums over shards and the Grams are
      then local. ``rows`` names this shard's rows of A, hence its rows of Q.
    * A replicated per rank, the target being the rank mean (DDP): ``sketch`` and
      ``cosketch`` average over ranks and the Grams are then local.

    Every collective is a batch (b, d or k, l) of sketches or (b, l, l) of Grams (fp64),
    one per matrix of a batched rSVD (``rsvd_bases``), never a full gradient: a batch
    costs one collective per stage, not one per matrix. ``shape`` is the (d, k) of the
    whole A where a shard is passed: the sketch width and Omega are drawn for it, so
    every world size draws the same numbers.
    """

    sketch: Reduce = _identity
    cosketch: Reduce = _identity
    gram: Reduce = _identity
    shape: tuple[int, int] | None = None
    columns: slice | None = None
    rows: slice | None = None

    def own_rows(self, q: torch.Tensor) -> torch.Tensor:
        """The rows of (a batch of) d-row sketches that meet this shard's rows of A."""
        return q if self.rows is None else q[..., self.rows, :]

    @property
    def layout(self) -> tuple:
        """(shape, columns, rows), hashable: matrices with the same local shape and layout
        reduce alike, so one batched rSVD can serve them all."""
        spans = tuple(None if s is None else (s.start, s.stop) for s in (self.columns, self.rows))
        return (self.shape, *spans)


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

    With A = G (left) or G^T (right), of shape (d, k), and l = rank + oversample:

    1. Y = A Omega with a Gaussian Omega (k x l); Q = orth(Y).
    2. q times (randomized subspace iteration, Halko et al. 2011, Algorithm 4.4):
       Z = orth(A^T Q), Q = orth(A Z). Each product sees the spectrum once, so the
       iterate spans A (A^T A)^q Omega (Lotus eq. 1: singular values to the power 2q+1)
       while rounding never has to resolve sigma_i^2 / sigma_1^2 in fp32. Forming
       A A^T Q without the intermediate orth loses every direction whose squared
       singular-value ratio is below fp32's epsilon.
    3. B^T = A^T Q (k x l); the left singular vectors of B are the eigenvectors of the
       l x l Gram B B^T, formed and solved in fp64: in fp32 that Gram would square the
       condition number and lose the directions with sigma_i / sigma_1 below ~3e-4.
       The basis is Q times the top ``rank`` eigenvectors.

    The big products run in fp32 whatever the gradient dtype; only l x l matrices (and
    the co-sketch on its way into a Gram) are fp64. A caller holding a shard of A says in
    ``comm`` where to reduce and which part of A it holds (or passes its rows of
    ``omega`` itself). Column signs follow ``canonical_signs``; the optimizer then aligns
    them with the previous basis (``align_signs``). This is ``rsvd_bases`` of one matrix.
    """
    if omega is None:
        return rsvd_bases([grad], rank, side, oversample=oversample, power_iters=power_iters,
                          generators=[generator], comm=comm)[0]
    a = _oriented(grad, side)
    return _rsvd([a], omega.to(a.dtype)[None], rank, power_iters, comm)[0].clone()


def rsvd_bases(
    grads: Sequence[torch.Tensor],
    rank: int,
    side: str,
    *,
    oversample: int,
    power_iters: int,
    generators: Sequence[torch.Generator],
    comm: RsvdComm = RsvdComm(),
) -> list[torch.Tensor]:
    """``rsvd_basis`` of several matrices of one shape and layout at once.

    A refresh burst (step 1 refreshes every matrix) would otherwise run 2 QRs, an eigh
    (a host sync on CUDA) and 3-4 blocking collectives per matrix; here each stage is one
    batched QR, Cholesky-QR or eigh and one collective for the whole batch (``comm``
    reduces the stacked sketches). The products with the gradients run one GEMM per
    matrix into a shared buffer, so the gradients are never stacked (copied). Matrix i
    draws its test matrix from ``generators[i]`` exactly as alone, so its numbers do not
    depend on which others refresh with it. ``rsvd_batch_size`` says how many to pass.
    """
    a = [_oriented(g, side) for g in grads]
    d, k = comm.shape or a[0].shape
    width = min(rank + oversample, d)
    # drawn in fp32 on the CPU whatever the compute dtype: fp32 and fp64 runs sketch alike
    omega = torch.stack([draw((k, width), gen, "cpu") for gen in generators])
    if comm.columns is not None:
        omega = omega[:, comm.columns]
    bases = _rsvd(a, omega.to(a[0].device, a[0].dtype), rank, power_iters, comm)
    return [b.clone() for b in bases]  # own storage: a stored basis must not pin the batch


def rsvd_batch_size(grad: torch.Tensor, rank: int, side: str, oversample: int,
                    comm: RsvdComm = RsvdComm(),
                    max_bytes: int = REFRESH_BATCH_BYTES) -> int:
    """How many matrices like ``grad`` (this rank's part) one ``rsvd_bases`` call may
    take within ``max_bytes``: per matrix its test matrix, co-sketch, sketch and Q (about
    2 (d + k) l numbers), plus a compute-dtype copy of a low-precision gradient."""
    rows, cols = grad.shape if side == "left" else grad.shape[::-1]
    d = (comm.shape or (rows, cols))[0]
    dtype = compute_dtype(grad)
    per = 2 * (d + cols) * min(rank + oversample, d) * dtype.itemsize
    if grad.dtype != dtype:
        per += grad.numel() * dtype.itemsize
    return max(1, max_bytes // per)


@_with_precision("ieee")
def _rsvd(a: list[torch.Tensor], omega: torch.Tensor, rank: int, power_iters: int,
          comm: RsvdComm) -> torch.Tensor:
    """The rSVD of ``rsvd_basis`` on the oriented matrices ``a`` (this rank's parts) with
    their test matrices ``omega`` (b, k, l): the (b, d, rank) bases."""
    y = comm.sketch(_times(a, omega))
    for _ in range(power_iters):
        z = comm.cosketch(_times(a, comm.own_rows(orthonormalize(y)), transpose=True))
        y = comm.sketch(_times(a, _gram_orthonormalize(z, comm.gram)))
    q = orthonormalize(y)
    bt = comm.cosketch(_times(a, comm.own_rows(q), transpose=True))  # B^T, (b, k, l)
    _, evecs = torch.linalg.eigh(comm.gram(_gram64(bt)))  # ascending eigenvalues
    top = evecs[..., -rank:].flip(-1).to(q.dtype)
    return canonical_signs(q @ top)


def _times(a: list[torch.Tensor], x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """(b, ., l): A_i X_i (A_i^T X_i with ``transpose``) for each matrix of the batch, one
    GEMM each into one buffer."""
    mats = [t.T for t in a] if transpose else a
    out = x.new_empty((len(mats), mats[0].shape[0], x.shape[-1]))
    for mat, xi, oi in zip(mats, x, out):
        torch.matmul(mat, xi, out=oi)
    return out


def _gram64(x: torch.Tensor, rows: int = 1024) -> torch.Tensor:
    """X_i^T X_i in fp64 for each fp32 X_i of a batch (b, k, l), converting ``rows`` rows
    at a time so that the fp64 workspace stays at b x rows x l, not b x k x l."""
    out = x.new_zeros((x.shape[0], x.shape[-1], x.shape[-1]), dtype=torch.float64)
    for part in x.split(rows, dim=-2):
        part = part.double()
        out.baddbmm_(part.mT, part)
    return out


def _gram_orthonormalize(z: torch.Tensor, gram: Reduce) -> torch.Tensor:
    """Columns spanning those of each Z of a batch (b, k, l, rows possibly sharded),
    orthonormal.

    Shifted Cholesky-QR (Fukaya et al. 2020) through the fp64 Gram Z^T Z, which ``gram``
    sums over shards: with Z scaled to unit Frobenius norm, Z R^-1 where
    R^T R = Z^T Z + l eps64 I. The shift keeps the factorisation defined when Z is rank
    deficient (a gradient of rank < l): those columns come out short instead of blowing
    up, and R^-1 stays below 1 / sqrt(l eps64) ~ 2e7, well inside fp32. In fp64 the Gram
    resolves singular-value ratios down to ~1e-7, as far as fp32 data carries them. R^-1
    is applied in fp32: its rounding lands in the k-space of Z and reaches the sketch
    only through A, which damps it like any direction outside the top ones.

    Everything is per matrix and stays on the device (no host sync per matrix): a zero
    Z (a zero gradient, nothing to span) is scaled by 1 instead of by its zero trace,
    and stays zero through the finite R^-1 of the shift alone.
    """
    g = gram(_gram64(z))
    trace = g.diagonal(dim1=-2, dim2=-1).sum(-1)  # the same on every rank: g is reduced
    trace = torch.where(trace > 0, trace, 1.0)
    g /= trace[:, None, None]
    g.diagonal(dim1=-2, dim2=-1).add_(g.shape[-1] * torch.finfo(torch.float64).eps)
    upper, _ = torch.linalg.cholesky_ex(g, upper=True)  # positive definite by the shift
    eye = torch.eye(g.shape[-1], dtype=g.dtype, device=g.device)
    inverse = torch.linalg.solve_triangular(upper, eye, upper=True)
    # z is a fresh co-sketch
    return z.div_(trace.sqrt().to(z.dtype)[:, None, None]) @ inverse.to(z.dtype)


def canonical_signs(basis: torch.Tensor) -> torch.Tensor:
    """Flip each column (of a basis or a batch of them) so that its largest-magnitude
    entry is positive.

    Singular vectors are defined up to sign; a rule on the vectors themselves (not on
    the sketch's coordinates, whose signs follow the random test matrix) makes a
    refresh's signs a function of the subspace, and keeps runs that differ only by
    summation order (1 vs N ranks) on the same basis.
    """
    pivot = basis.gather(-2, basis.abs().argmax(dim=-2, keepdim=True))
    return basis * torch.where(pivot < 0, -1.0, 1.0).to(basis.dtype)


def align_signs(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Flip column j of ``new`` where (new^T old)_jj < 0.

    Kept Adam moments live in the basis coordinates: a coordinate whose basis vector
    flipped would see its gradient change sign against its momentum. Both bases are
    replicated on every rank (or owned whole), so this is a local, rank-identical
    computation. Columns are not permuted: a near-tie in singular values makes the order
    (and the vectors themselves) ill-defined, which a sign rule cannot repair anyway.
    """
    dots = (new * old).sum(dim=0)
    return new * torch.where(dots < 0, -1.0, 1.0).to(new.dtype)


def random_basis(d: int, rank: int, generator: torch.Generator,
                 device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An orthonormalised Gaussian basis, independent of the gradient (GrassJump / RSO)."""
    return orthonormalize(draw((d, rank), generator, device, dtype))


@_with_precision("ieee")
def grassmann_step(basis: torch.Tensor, step: float, generator: torch.Generator) -> torch.Tensor:
    """A random geodesic step on the Grassmannian from ``basis`` (GrassWalk).

    A Gaussian direction is projected onto the tangent space at S, X = (I - S S^T) Z,
    and scaled so its largest singular value is 1. With X = U diag(s) V^T the geodesic is
    S(t) = S V cos(s t) V^T + U sin(s t) V^T, so ``step`` is the largest principal angle
    (radians) between the old and the new subspace.
    """
    d, r = basis.shape
    z = draw((d, r), generator, basis.device, basis.dtype)
    x = z - basis @ (basis.T @ z)
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    angles = s / s.max().clamp_min(torch.finfo(s.dtype).tiny) * step
    moved = (basis @ vh.T) * torch.cos(angles) @ vh + (u * torch.sin(angles)) @ vh
    return orthonormalize(moved)


def captured_energy(low_rank: torch.Tensor, grad: torch.Tensor) -> float:
    """||R||_F / ||G||_F: the fraction of gradient norm the basis keeps."""
    g_norm = upcast(grad).norm()
    return float(low_rank.norm() / g_norm) if g_norm > 0 else math.nan


def subspace_error(basis: torch.Tensor, reference: torch.Tensor) -> float:
    """Sine of the largest principal angle between two subspaces of equal dimension.

    Both arguments have orthonormal columns; the value is ||(I - E E^T) B||_2 (in fp64),
    0 for the same subspace and 1 when some direction of one is orthogonal to the other.
    """
    b, e = basis.double(), reference.double()
    return float(torch.linalg.matrix_norm(b - e @ (e.T @ b), ord=2))


@_with_precision("ieee")
def orthogonal_sketch(basis: torch.Tensor, width: int, generator: torch.Generator) -> torch.Tensor:
    """A d x s test matrix S with E[S S^T] = I - B B^T, for ``basis`` B (d x r).

    ``||X S||_F^2`` (or ``||S^T X||_F^2``) is then an unbiased estimate of the energy of
    X outside the basis, from a sketch of s columns. Where the complement has at most
    ``width`` dimensions, S is an orthonormal basis of it (s = d - r) and the value is
    exact; otherwise S = (I - B B^T) Omega / sqrt(s) for a Gaussian Omega (s = width),
    whose estimate has relative standard deviation at most sqrt(2 / s).
    """
    d, r = basis.shape
    cols = min(d - r, width)
    omega = draw((d, cols), generator, basis.device, basis.dtype)
    omega -= basis @ (basis.T @ omega)
    if d - r <= width:
        comp = orthonormalize(omega)
        return orthonormalize(comp - basis @ (basis.T @ comp))  # twice: orthogonal to B
    return omega / math.sqrt(cols)
