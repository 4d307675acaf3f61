"""LotusAdamW behaviour: switch rules, state, resume, per-layer mode, bad input."""

import io
import itertools
import math

import pytest
import torch
from torch import nn

from lotus_dist import LotusAdamW, NonFiniteGradientError, lotus_param_groups
from lotus_dist.optim import rotate_moments
from lotus_dist.switching import PATH_SKETCH_WIDTH


def refreshes_over(opt: LotusAdamW, grads: list[dict[str, torch.Tensor]],
                   params: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    """Feed fixed gradients step by step; return the steps at which each matrix refreshed."""
    out: dict[str, list[int]] = {name: [] for name in params}
    for step, g in enumerate(grads):
        for name, p in params.items():
            p.grad = g[name].clone()
        before = {k: v["refresh_count"] for k, v in opt.telemetry().items()}
        opt.step()
        for name, t in opt.telemetry().items():
            if t["refresh_count"] > before.get(name, 0):
                out[name].append(step)
    return out


def drifting_gradients(steps: int, shape=(8, 20), drift=0.15, seed=0) -> list[torch.Tensor]:
    """A gradient that rotates slowly with noise, so displacement varies between checks."""
    g = torch.Generator().manual_seed(seed)
    base, direction = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    return [base + drift * t * direction + 0.3 * torch.randn(*shape, generator=g)
            for t in range(steps)]


def algorithm2_refreshes(grads, rank, eta, gamma, min_gap):
    """Lotus Algorithm 2, written out with explicit unit vectors (wide matrix: left basis)."""
    refreshes, pending, t, basis, d_init = [], True, 0, None, None
    for step, g in enumerate(grads):
        if pending:
            basis = torch.linalg.svd(g, full_matrices=False)[0][:, :rank]
            r = basis.T @ g
            d_init, t, pending = r / r.norm(), 1, False
            refreshes.append(step)
        else:
            t += 1
        r = basis.T @ g
        d_cur = r / r.norm()
        if t % eta == 0 and (d_cur - d_init).norm() / t < gamma and t >= min_gap:
            pending = True
    return refreshes


@pytest.mark.parametrize("min_gap", [0, 12])
def test_displacement_refreshes_exactly_as_algorithm_2(min_gap):
    grads = drifting_gradients(80)
    w = torch.zeros(8, 20, requires_grad=True)
    opt = LotusAdamW([{"params": [("w", w)], "rank": 3, "projection": "svd",
                       "switch": "displacement",
                       "verify_gap": 4, "gamma": 0.06, "min_gap": min_gap}], lr=1e-3)
    got = refreshes_over(opt, [{"w": g} for g in grads], {"w": w})["w"]
    expected = algorithm2_refreshes(grads, rank=3, eta=4, gamma=0.06, min_gap=min_gap)
    assert got == expected
    intervals = {b - a for a, b in itertools.pairwise(expected)}
    assert len(intervals) > 1, "the data should make some checks pass and some fail"


def test_displacement_lets_each_matrix_switch_on_its_own_schedule():
    g = torch.Generator().manual_seed(1)
    still = torch.randn(8, 20, generator=g)
    grads = [{"still": still, "noisy": torch.randn(8, 20, generator=g)} for _ in range(48)]
    params = {k: torch.zeros(8, 20, requires_grad=True) for k in ("still", "noisy")}
    opt = LotusAdamW([{"params": list(params.items()), "rank": 2, "switch": "displacement",
                       "verify_gap": 4, "gamma": 0.05}], lr=1e-3)
    got = refreshes_over(opt, grads, params)
    # a constant gradient never moves: refresh after every check. Independent random
    # gradients sit about sqrt(2) apart, so ||d - d0||/T < 0.05 needs T near 28, and
    # 2/T < 0.05 forces it by T = 44 at the latest.
    assert got["still"] == list(range(0, 48, 4))
    assert got["noisy"][0] == 0 and len(got["noisy"]) == 2
    assert 20 <= got["noisy"][1] <= 44 and got["noisy"][1] % 4 == 0


def test_fixed_refreshes_every_update_proj_gap_steps():
    w = torch.zeros(20, 8, requires_grad=True)
    opt = LotusAdamW([{"params": [("w", w)], "rank": 2, "switch": "fixed",
                       "update_proj_gap": 7}])
    grads = [{"w": torch.randn(20, 8)} for _ in range(30)]
    assert refreshes_over(opt, grads, {"w": w})["w"] == [0, 7, 14, 21, 28]


def test_path_efficiency_matches_equation_5():
    eta, rank = 5, 3
    grads = drifting_gradients(30, shape=(20, 8), drift=0.3, seed=2)  # tall: right basis
    w = torch.zeros(20, 8, requires_grad=True)
    opt = LotusAdamW([{"params": [w], "rank": rank, "projection": "svd",
                       "switch": "path_efficiency", "verify_gap": eta, "gamma": 0.8}])
    basis, window, metrics, expected_refreshes, pending = None, [], [], [], True
    for step, g in enumerate(grads):
        w.grad = g.clone()
        opt.step()
        if pending:  # reference eq. (5) over the last eta unit gradients
            basis = torch.linalg.svd(g, full_matrices=False)[2][:rank].T
            window, pending, t = [], False, 0
            expected_refreshes.append(step)
        t += 1
        window.append(g / g.norm())
        if t % eta == 0:
            total = sum(window)
            rho = float((total @ basis).norm() / total.norm())
            metrics.append((rho, opt.telemetry()["param0"]["switch_metric"]))
            pending, window = rho < 0.8, []
    assert len(metrics) >= 4
    for rho, got in metrics:
        assert math.isclose(rho, got, rel_tol=1e-4)
    assert 0 < len(expected_refreshes) < len(grads)
    assert opt.telemetry()["param0"]["refresh_count"] == len(expected_refreshes)


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(40, 16)
        self.mlp = nn.Sequential(nn.Linear(16, 48, bias=False), nn.GELU(),
                                 nn.Linear(48, 16, bias=False))
        self.head = nn.Linear(16, 40)

    def forward(self, x):
        return self.head(self.mlp(self.embed(x)))


def loss_fn(model, batch):
    return nn.functional.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())


def make(seed=0, **opts):
    torch.manual_seed(seed)
    model = TinyNet()
    defaults = {"projection": "rsvd", "switch": "displacement", "verify_gap": 3,
                "gamma": 0.2, **opts}
    return model, LotusAdamW(lotus_param_groups(model, 4, **defaults), lr=5e-3, seed=7)


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 40, (8, 12), generator=g) for _ in range(n)]


def train(model, opt, data):
    for b in data:
        opt.zero_grad()
        loss_fn(model, b).backward()
        opt.step()


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("options", [
    {"moments": "keep"}, {"moments": "rotate"},
    {"switch": "path_efficiency", "gamma": 0.9, "recovery_scaling": True},
    {"switch": "momentum_displacement", "gamma": 0.5},
], ids=["keep", "rotate", "path_efficiency", "momentum_displacement"])
def test_resume_across_a_refresh_equals_never_stopping(options):
    data = batches(20)
    model_a, opt_a = make(**options)
    train(model_a, opt_a, data)

    model_b, opt_b = make(**options)
    train(model_b, opt_b, data[:9])
    saved = roundtrip({"model": model_b.state_dict(), "optim": opt_b.state_dict()})
    refreshes_at_save = sum(t["refresh_count"] for t in opt_b.telemetry().values())

    model_c, opt_c = make(seed=123, **options)  # different init: all comes from the save
    model_c.load_state_dict(saved["model"])
    opt_c.load_state_dict(saved["optim"])
    train(model_c, opt_c, data[9:])

    assert sum(t["refresh_count"] for t in opt_c.telemetry().values()) > refreshes_at_save
    for (name, a), c in zip(model_a.state_dict().items(), model_c.state_dict().values()):
        assert torch.equal(a, c), name
    assert opt_c.telemetry() == opt_a.telemetry()


def test_state_dict_holds_only_tensors_and_plain_values():
    model, opt = make(switch="path_efficiency", recovery_scaling=True)
    train(model, opt, batches(4))
    sd = roundtrip(opt.state_dict())  # weights_only=True refuses any other object
    assert sd["state"][3]["basis"].dtype == torch.float32
    assert set(sd["lotus"]) == {"skipped_steps"}


def test_per_layer_mode_equals_normal_mode_under_accumulation_and_schedule():
    data = batches(12)
    schedule = lambda step: 1.0 / (1 + step)  # noqa: E731 - changes lr every step

    model_a, opt_a = make()
    sched_a = torch.optim.lr_scheduler.LambdaLR(opt_a, schedule)
    for i in range(0, 12, 3):
        opt_a.zero_grad()
        for b in data[i:i + 3]:
            (loss_fn(model_a, b) / 3).backward()
        opt_a.step()
        sched_a.step()

    torch.manual_seed(0)
    model_b = TinyNet()
    opt_b = LotusAdamW(lotus_param_groups(model_b, 4, projection="rsvd", switch="displacement",
                                          verify_gap=3, gamma=0.2),
                       lr=5e-3, seed=7, per_layer=True)
    opt_b.register_per_layer_hooks()
    sched_b = torch.optim.lr_scheduler.LambdaLR(opt_b, schedule)
    for i in range(0, 12, 3):
        for k, b in enumerate(data[i:i + 3]):
            opt_b.accumulation_boundary = k == 2
            (loss_fn(model_b, b) / 3).backward()
        opt_b.step()
        sched_b.step()
        assert all(p.grad is None for p in model_b.parameters())

    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7, msg=name)
    assert opt_a.telemetry() == opt_b.telemetry()


def test_nonfinite_gradient_is_skipped_before_any_svd():
    model, opt = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss_fn(model, batches(1)[0]).backward()
    model.mlp[0].weight.grad[0, 0] = float("nan")
    opt.step()
    assert opt.skipped_steps == 1
    assert len(opt.state) == 0  # no basis was computed, no moment touched
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_nonfinite_gradient_raises_when_configured():
    torch.manual_seed(0)
    model = TinyNet()
    opt = LotusAdamW(lotus_param_groups(model, 4), nonfinite="raise")
    loss_fn(model, batches(1)[0]).backward()
    model.head.weight.grad[0, 0] = float("inf")
    with pytest.raises(NonFiniteGradientError, match="non-finite"):
        opt.step()


def test_refreshes_leave_the_global_rng_alone():
    model, opt = make(projection="random")
    state = torch.get_rng_state()
    loss_fn(model, batches(1)[0]).backward()
    opt.step()
    assert torch.equal(state, torch.get_rng_state())


def test_seed_changes_rsvd_draws_but_not_exact_svd():
    def final(projection, seed):
        torch.manual_seed(0)
        model = TinyNet()
        opt = LotusAdamW(lotus_param_groups(model, 4, projection=projection), seed=seed)
        train(model, opt, batches(2))
        return model.mlp[0].weight.detach().clone()

    assert not torch.equal(final("rsvd", 0), final("rsvd", 1))
    assert torch.equal(final("svd", 0), final("svd", 1))


def test_telemetry_reports_each_projected_matrix_by_name():
    model, opt = make()
    train(model, opt, batches(5))
    tele = opt.telemetry()
    assert set(tele) == {"mlp.0.weight", "mlp.2.weight"}
    for t in tele.values():
        assert t["refresh_count"] >= 1 and t["steps_since_refresh"] >= 1
        assert 0 < t["energy"] <= 1


@pytest.mark.parametrize(("group", "match"), [
    ({"rank": 17}, "rank 17 exceeds"),
    ({"rank": 4, "rnak": 3}, "unknown key"),
    ({"rank": 4, "projection": "qr"}, "projection must be one of"),
    ({"rank": 4, "switch": "sometimes"}, "switch must be one of"),
    ({"rank": 4, "verify_gap": 0}, "verify_gap must be"),
])
def test_bad_groups_fail_at_construction(group, match):
    w = torch.zeros(16, 40, requires_grad=True)
    with pytest.raises(ValueError, match=match):
        LotusAdamW([{"params": [w], **group}])


def test_non_matrix_in_projected_group_fails_at_construction():
    with pytest.raises(ValueError, match="only 2-D weights"):
        LotusAdamW([{"params": [torch.zeros(16, requires_grad=True)], "rank": 2}])


def test_unknown_optimizer_option_fails():
    with pytest.raises(ValueError, match="unknown option"):
        LotusAdamW([torch.zeros(3, requires_grad=True)], gama=0.1)


def test_rotating_moments_into_a_permuted_basis_permutes_them():
    old = torch.linalg.qr(torch.randn(10, 4)).Q
    perm = torch.tensor([2, 0, 3, 1])
    m = torch.randn(4, 6)
    v = m * m + torch.rand(4, 6)  # a valid second moment: v >= m^2
    m_new, v_new = rotate_moments(m, v, old, old[:, perm], "left")
    torch.testing.assert_close(m_new, m[perm])
    torch.testing.assert_close(v_new, v[perm])
    m_r, v_r = rotate_moments(m.T, v.T, old, old[:, perm], "right")
    torch.testing.assert_close(m_r, m.T[:, perm])
    torch.testing.assert_close(v_r, v.T[:, perm])


def test_recovery_scaling_norm_growth_is_limited():
    model, opt = make(recovery_scaling=True, recovery_limiter=1.01)
    norms = []
    for b in batches(8):
        opt.zero_grad()
        loss_fn(model, b).backward()
        opt.step()
        norms.append(opt.state[model.mlp[0].weight]["recovery_norm"])
    assert all(b <= 1.01 * a * (1 + 1e-6) for a, b in itertools.pairwise(norms))
    assert norms[0] > 0


def test_recovery_scaling_adds_nothing_at_full_rank():
    def final(recovery):
        torch.manual_seed(0)
        model = TinyNet()
        groups = lotus_param_groups(model, 16, projection="svd", recovery_scaling=recovery)
        opt = LotusAdamW(groups, lr=1e-2)
        train(model, opt, batches(3))
        return model.mlp[0].weight.detach()

    torch.testing.assert_close(final(True), final(False), atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------- clipping, recovery


@pytest.mark.parametrize("switch", ["path_efficiency", "displacement"])
def test_clipping_the_consumed_gradient_equals_stepping_on_a_clipped_gradient(switch):
    """scale_consumed_grads(f) after prepare() must act like a gradient f * G: the recovery
    residual G - back(R), the captured energy and path efficiency's unit gradients
    included."""
    factor, data = 0.3, batches(7)
    model_a, opt_a = make(switch=switch, recovery_scaling=True, gamma=0.9)
    model_b, opt_b = make(switch=switch, recovery_scaling=True, gamma=0.9)
    for b in data:
        for model in (model_a, model_b):
            model.zero_grad()
            loss_fn(model, b).backward()
        assert opt_a.prepare()
        opt_a.scale_consumed_grads(factor)
        opt_a.step()
        for p in model_b.parameters():
            p.grad.mul_(factor)
        opt_b.step()
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)
    for name, t in opt_a.telemetry().items():
        for key in ("energy", "switch_metric"):
            assert math.isclose(t[key], opt_b.telemetry()[name][key], rel_tol=1e-4), (name, key)


@pytest.mark.parametrize("shape", [(12, 20), (20, 12)], ids=["left", "right"])
def test_recovery_term_is_added_without_galore_scale(shape):
    """One step from zero state, against Fira's rule written out in float64:
    W -= lr_t (scale * B N + phi * (G - B R)), phi = ||N_j|| / ||R_j|| per kept column."""
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    w = torch.zeros(shape, requires_grad=True)
    lr, scale, (b1, b2), eps = 0.1, 0.25, (0.9, 0.999), 1e-6
    opt = LotusAdamW([{"params": [w], "rank": 3, "projection": "svd", "switch": "fixed",
                       "scale": scale, "recovery_scaling": True}], lr=lr)
    w.grad = grad.clone()
    opt.step()
    g = grad.double()
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    left = shape[0] < shape[1]
    basis = u[:, :3] if left else vh[:3].T
    r = basis.T @ g if left else g @ basis
    n = (1 - b1) * r / ((1 - b2) ** 0.5 * r.abs() + eps)
    back = basis @ n if left else n @ basis.T
    residual = g - (basis @ r if left else r @ basis.T)
    dim = 0 if left else 1
    phi = n.norm(dim=dim, keepdim=True) / r.norm(dim=dim, keepdim=True)
    step_size = lr * (1 - b2) ** 0.5 / (1 - b1)
    expected = -step_size * (scale * back + phi * residual)
    torch.testing.assert_close(w.detach().double(), expected, rtol=1e-4, atol=1e-7)


# --------------------------------------------------------------------- path efficiency memory


def test_path_efficiency_keeps_no_full_size_accumulator_and_matches_it():
    """A 300 x 200 matrix at rank 8: the complement (192 dims) is wider than the sketch, so
    the energy outside the basis is estimated. rho must match the full-accumulator value
    of eq. (5) within 2% (the sketch's bound: relative std <= sqrt(2 / 128) / 2 = 6% for a
    rank-one outside sum, far less for the many directions of real gradients)."""
    eta, rank, shape = 5, 8, (300, 200)
    gen = torch.Generator().manual_seed(4)
    signal = torch.randn(shape[0], 6, generator=gen) @ torch.randn(6, shape[1], generator=gen)
    grads = [signal + 0.15 * t * torch.randn(shape, generator=gen) * (t % 3 + 1)
             for t in range(30)]
    w = torch.zeros(shape, requires_grad=True)
    opt = LotusAdamW([{"params": [w], "rank": rank, "projection": "svd",
                       "switch": "path_efficiency", "verify_gap": eta, "gamma": 0.95}])
    basis, window, pairs, pending = None, [], [], True
    for g in grads:
        w.grad = g.clone()
        opt.step()
        if pending:
            basis = torch.linalg.svd(g, full_matrices=False)[2][:rank].T
            window, pending, t = [], False, 0
        t += 1
        window.append(g / g.norm())
        if t % eta == 0:
            total = sum(window)
            rho = float((total @ basis).norm() / total.norm())
            pairs.append((rho, opt.telemetry()["param0"]["switch_metric"]))
            pending, window = rho < 0.95, []
    assert len(pairs) >= 4 and any(rho < 0.95 for rho, _ in pairs)
    for rho, got in pairs:
        assert math.isclose(got, rho, rel_tol=0.02), (got, rho)
    # (m or n) x 128 at most: R's size, the sketch and its accumulator; no m x n tensor
    sizes = [v.numel() for v in opt.state[w].values() if torch.is_tensor(v)]
    assert max(sizes) <= max(shape) * PATH_SKETCH_WIDTH < w.numel()


# --------------------------------------------------------------------- refresh intervals


def test_telemetry_reports_the_spread_of_refresh_intervals_and_survives_a_roundtrip():
    grads = drifting_gradients(80)
    w = torch.zeros(8, 20, requires_grad=True)
    opt = LotusAdamW([{"params": [("w", w)], "rank": 3, "projection": "svd",
                       "switch": "displacement", "verify_gap": 4, "gamma": 0.06}], lr=1e-3)
    steps = refreshes_over(opt, [{"w": g} for g in grads], {"w": w})["w"]
    intervals = [b - a for a, b in itertools.pairwise(steps)]
    tele = opt.telemetry()["w"]
    assert (tele["refresh_interval_min"], tele["refresh_interval_max"]) == (min(intervals),
                                                                            max(intervals))
    assert math.isclose(tele["refresh_interval_mean"], sum(intervals) / len(intervals))
    assert all(type(v) in (int, float) for v in tele.values())

    w2 = torch.zeros(8, 20, requires_grad=True)
    opt2 = LotusAdamW([{"params": [("w", w2)], "rank": 3, "projection": "svd",
                        "switch": "displacement", "verify_gap": 4, "gamma": 0.06}], lr=1e-3)
    opt2.load_state_dict(roundtrip(opt.state_dict()))
    assert opt2.telemetry() == opt.telemetry()


def test_refresh_intervals_are_nan_before_a_second_refresh():
    w = torch.zeros(20, 8, requires_grad=True)
    opt = LotusAdamW([{"params": [w], "rank": 2, "switch": "fixed", "update_proj_gap": 7}])
    w.grad = torch.randn(20, 8)
    opt.step()
    tele = opt.telemetry()["param0"]
    assert all(math.isnan(tele[f"refresh_interval_{k}"]) for k in ("min", "mean", "max"))


# --------------------------------------------------------------------- momentum displacement


def subspace_noise(steps, shape=(16, 40), k=4, seed=0):
    """Isotropic noise inside a fixed k-dimensional column space: the subspace never needs
    a refresh."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(shape[0], k, generator=g)).Q
    return [u @ torch.randn(k, shape[1], generator=g) for _ in range(steps)]


def rotating_subspace(steps, shape=(16, 40), k=4, rate=0.02, noise=0.2, seed=0):
    """A fixed signal whose column space turns at ``rate`` radians per step, plus noise."""
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(shape[0], 2 * k, generator=g)).Q
    u, w = q[:, :k], q[:, k:]
    coeff = torch.randn(k, shape[1], generator=g)
    rates = rate * torch.linspace(0.5, 1.5, k)
    return [(u * torch.cos(rates * t) + w * torch.sin(rates * t))
            @ (coeff + noise * torch.randn(k, shape[1], generator=g)) for t in range(steps)]


def refresh_count(switch, grads, gamma=0.05):
    w = torch.zeros(grads[0].shape, requires_grad=True)
    opt = LotusAdamW([{"params": [("w", w)], "rank": 4, "switch": switch, "verify_gap": 4,
                       "gamma": gamma}], lr=1e-3)
    return len(refreshes_over(opt, [{"w": g} for g in grads], {"w": w})["w"])


def test_momentum_displacement_ignores_noise_inside_a_fixed_subspace():
    """Algorithm 2 fires near T = sqrt(2) / gamma = 28 on noise; the windowed moment
    displacement stays near sqrt(2 (1 - beta1^4)) / 4 = 0.2 > gamma and does not fire."""
    grads = subspace_noise(200)
    assert refresh_count("displacement", grads) >= 6
    assert refresh_count("momentum_displacement", grads) == 1  # the initial basis only


def test_momentum_displacement_still_refreshes_a_rotating_subspace():
    grads = rotating_subspace(200)
    assert refresh_count("momentum_displacement", grads) >= 10


def test_momentum_displacement_equals_its_definition():
    """Reference: M = beta1 m + (1 - beta1) R with m Adam's first moment; every eta steps,
    ||M/|M| - M_prev/|M_prev||| / (steps since M_prev) against gamma."""
    grads, eta, gamma, beta1 = rotating_subspace(60, noise=0.5), 4, 0.08, 0.9
    w = torch.zeros(16, 40, requires_grad=True)
    opt = LotusAdamW([{"params": [w], "rank": 4, "projection": "svd",
                       "switch": "momentum_displacement", "verify_gap": eta,
                       "gamma": gamma}], lr=1e-3)
    metrics, expected, pending, m = [], [], True, None
    for g in grads:
        w.grad = g.clone()
        opt.step()
        if pending:
            basis = torch.linalg.svd(g, full_matrices=False)[0][:, :4]
            t, pending = 0, False
        t += 1
        r = basis.T @ g
        m = (1 - beta1) * r if m is None else beta1 * m + (1 - beta1) * r
        if t == 1:
            ref, ref_t = m, 1
        elif t % eta == 0:
            metric = float((m / m.norm() - ref / ref.norm()).norm()) / (t - ref_t)
            expected.append(metric)
            metrics.append(opt.telemetry()["param0"]["switch_metric"])
            ref, ref_t, pending = m, t, metric < gamma
    assert len(expected) >= 5 and any(e < gamma for e in expected) and any(e >= gamma
                                                                          for e in expected)
    for e, got in zip(expected, metrics):
        assert math.isclose(e, got, rel_tol=1e-4)


def test_a_step_inside_an_autocast_region_keeps_fp32_maths():
    """The optimizer's maths ignore a caller's autocast: stepping inside the forward's
    bf16 region gives the same weights as stepping outside it."""
    def run(inside: bool) -> torch.Tensor:
        gen = torch.Generator().manual_seed(0)
        w = torch.nn.Parameter(torch.randn(24, 12, generator=gen))
        opt = LotusAdamW([{"params": [w], "rank": 4, "update_proj_gap": 2}], lr=1e-2)
        for _ in range(3):
            w.grad = torch.randn(w.shape, generator=gen)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=inside):
                opt.step()
        return w.detach()

    assert torch.equal(run(inside=True), run(inside=False))
