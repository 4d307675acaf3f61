"""projection="svd", switch="fixed" is GaLore's AdamW, step by step."""

import math

import torch

from lotus_dist import LotusAdamW


class GaLoreReference:
    """A small, readable GaLore AdamW (Zhao et al. 2024), written from the paper's rule.

    Per matrix: every ``gap`` steps (counting from 0) take the top-r singular vectors of
    the gradient (U for m < n, V for m >= n); Adam runs on the projected gradient with
    moments kept across refreshes; the update is scale * back-projection, bias corrected,
    followed by decoupled weight decay.
    """

    def __init__(self, params, rank, gap, scale, lr, betas=(0.9, 0.999), eps=1e-6, wd=0.0):
        self.params, self.rank, self.gap, self.scale = params, rank, gap, scale
        self.lr, self.betas, self.eps, self.wd = lr, betas, eps, wd
        self.t = 0
        self.basis, self.m, self.v = {}, {}, {}
        self.refresh_steps = []

    def step(self):
        b1, b2 = self.betas
        for i, p in enumerate(self.params):
            g = p.grad
            m_dim, n_dim = g.shape
            right = m_dim >= n_dim
            if self.t % self.gap == 0:
                u, _, vh = torch.linalg.svd(g, full_matrices=False)
                self.basis[i] = vh[: self.rank] if right else u[:, : self.rank]
                if i == 0:
                    self.refresh_steps.append(self.t)
            b = self.basis[i]
            r = g @ b.T if right else b.T @ g
            if i not in self.m:
                self.m[i], self.v[i] = torch.zeros_like(r), torch.zeros_like(r)
            self.m[i] = b1 * self.m[i] + (1 - b1) * r
            self.v[i] = b2 * self.v[i] + (1 - b2) * r * r
            n = self.m[i] / (self.v[i].sqrt() + self.eps)
            full = (n @ b if right else b @ n) * self.scale
            t = self.t + 1
            step_size = self.lr * math.sqrt(1 - b2**t) / (1 - b1**t)
            with torch.no_grad():
                p.add_(full, alpha=-step_size)
                if self.wd:
                    p.add_(p, alpha=-self.lr * self.wd)
        self.t += 1


def _loss(weights, x):
    """A two-layer net through a tall and a wide matrix, so both sides are exercised."""
    w1, w2 = weights
    return (torch.tanh(x @ w1.T) @ w2.T).pow(2).mean()


def test_svd_fixed_reproduces_galore_step_by_step():
    torch.manual_seed(0)
    init = [torch.randn(24, 12) * 0.3, torch.randn(6, 24) * 0.3]  # tall (right), wide (left)
    ours = [w.clone().requires_grad_() for w in init]
    ref = [w.clone().requires_grad_() for w in init]
    opt = LotusAdamW([{"params": ours, "rank": 4, "update_proj_gap": 5, "scale": 0.25,
                       "projection": "svd", "switch": "fixed"}], lr=0.01, weight_decay=0.1)
    galore = GaLoreReference(ref, rank=4, gap=5, scale=0.25, lr=0.01, wd=0.1)
    refreshes = []
    for step in range(23):
        x = torch.randn(32, 12)
        for ws in (ours, ref):
            for w in ws:
                w.grad = None
            _loss(ws, x).backward()
        before = opt.telemetry().get("param0", {}).get("refresh_count", 0)
        opt.step()
        if opt.telemetry()["param0"]["refresh_count"] > before:
            refreshes.append(step)
        galore.step()
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"step {step}")
    assert refreshes == galore.refresh_steps == [0, 5, 10, 15, 20]
