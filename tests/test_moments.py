"""Adam moments across a refresh: rotate in LDAdam's bias-corrected form, keep, reset."""

import pytest
import torch

from lotus_dist import LotusAdamW
from lotus_dist.optim import rotate_moments

BETAS = (0.9, 0.999)


def ldadam_reference(m, v, old, new, side, step, betas=BETAS):
    """LDAdam's rotation, in float64, on explicit coordinates (rows of R for a left basis,
    columns for a right one): bias-correct, rotate the mean by C = B_new^T B_old, take the
    variance of the rotated estimate, re-bias."""
    m, v, old, new = (t.double() for t in (m, v, old, new))
    if side == "right":
        m, v = m.T, v.T
    c1, c2 = 1 - betas[0] ** step, 1 - betas[1] ** step
    m_hat, v_hat = m / c1, v / c2
    c = torch.einsum("di,dj->ij", new, old)
    m_rot = torch.einsum("ij,jk->ik", c, m_hat)
    var = torch.clamp(v_hat - m_hat**2, min=0)
    v_rot = torch.einsum("ij,jk->ik", c**2, var) + m_rot**2
    m_out, v_out = m_rot * c1, v_rot * c2
    return (m_out, v_out) if side == "left" else (m_out.T, v_out.T)


def bases(d=12, r=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    old = torch.linalg.qr(torch.randn(d, r, generator=gen, dtype=torch.float64)).Q
    new = torch.linalg.qr(old + 0.3 * torch.randn(d, r, generator=gen, dtype=torch.float64)).Q
    return old, new


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("step", [1, 7, 300])
def test_rotation_matches_ldadam_in_float64(side, step):
    old, new = bases()
    gen = torch.Generator().manual_seed(step)
    shape = (4, 9) if side == "left" else (9, 4)
    c1, c2 = 1 - BETAS[0] ** step, 1 - BETAS[1] ** step
    m = torch.randn(shape, generator=gen, dtype=torch.float64) * c1
    v = (m / c1) ** 2 * c2 + torch.rand(shape, generator=gen, dtype=torch.float64) * c2
    got = rotate_moments(m, v, old, new, side, bias1=c1, bias2=c2)
    want = ldadam_reference(m, v, old, new, side, step)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=0)


def test_rotated_second_moment_at_step_one_is_the_rotated_squared_gradient():
    """At t = 1 m_hat = g and v_hat = g^2 (no variance): v' must be bias2 (C g)^2. Rotating
    the raw moments gives bias1^2 (C g)^2 instead, 10x too large for the default betas."""
    old, new = bases()
    g = torch.randn(4, 9, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    c1, c2 = 1 - BETAS[0], 1 - BETAS[1]
    m_new, v_new = rotate_moments(c1 * g, c2 * g * g, old, new, "left", bias1=c1, bias2=c2)
    cg = (new.T @ old) @ g
    torch.testing.assert_close(m_new, c1 * cg)
    torch.testing.assert_close(v_new, c2 * cg * cg)


@pytest.mark.parametrize("shape", [(10, 24), (24, 10)], ids=["left", "right"])
def test_optimizer_rotates_its_moments_as_ldadam_at_a_refresh(shape):
    """prepare() of the refresh step rotates the stored moments; compare with the float64
    reference applied to the moments and bases before and after."""
    gen = torch.Generator().manual_seed(2)
    w = torch.zeros(shape, requires_grad=True)
    opt = LotusAdamW([{"params": [w], "rank": 3, "projection": "random", "switch": "fixed",
                       "update_proj_gap": 4, "moments": "rotate"}], lr=1e-2)
    for _ in range(4):
        w.grad = torch.randn(shape, generator=gen)
        opt.step()
    state = opt.state[w]
    before = {k: state[k].clone() for k in ("exp_avg", "exp_avg_sq", "basis")}
    step = state["step"]
    w.grad = torch.randn(shape, generator=gen)
    assert opt.prepare()  # the refresh (step 5) rotates, the update has not run yet
    assert state["refresh_count"] == 2 and state["step"] == step
    side = "left" if shape[0] < shape[1] else "right"
    want = ldadam_reference(before["exp_avg"], before["exp_avg_sq"], before["basis"],
                            state["basis"], side, step)
    torch.testing.assert_close(state["exp_avg"].double(), want[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(state["exp_avg_sq"].double(), want[1], rtol=1e-5, atol=1e-9)
    opt.step()


def test_reset_restarts_bias_correction_and_keep_leaves_moments_alone():
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(10, 24, generator=gen) for _ in range(5)]
    seen = {}
    for moments in ("keep", "reset"):
        w = torch.zeros(10, 24, requires_grad=True)
        opt = LotusAdamW([{"params": [w], "rank": 3, "projection": "random", "switch": "fixed",
                           "update_proj_gap": 4, "moments": moments}])
        for g in grads[:4]:
            w.grad = g.clone()
            opt.step()
        before = opt.state[w]["exp_avg"].clone()
        w.grad = grads[4].clone()
        opt.prepare()
        seen[moments] = (before, opt.state[w]["exp_avg"].clone(), opt.state[w]["step"])
    assert torch.equal(seen["keep"][0], seen["keep"][1]) and seen["keep"][2] == 4
    assert not seen["reset"][1].any() and seen["reset"][2] == 0
