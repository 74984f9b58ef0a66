"""Fitting the linear surrogates of q-nets (ridge regression, per-query sets with padding, the dual form)."""
import torch

from pyterrier_hypencoder.search import fit_surrogates


def test_fit_surrogates_recovers_a_linear_function():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=g)
    w = torch.randn(3, 8, generator=g)
    y = x @ w.T + torch.tensor([1.0, -2.0, 0.5])
    fw, fb = fit_surrogates(x, y.T, ridge=1e-6)
    torch.testing.assert_close(fw, w, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(fb, torch.tensor([1.0, -2.0, 0.5]), atol=1e-3, rtol=1e-3)
    # Per-query sets with padding (and -inf scores there) give the same fit; the dual form (m < d) too.
    xs = torch.cat([x[None].expand(3, -1, -1), torch.zeros(3, 5, 8)], dim=1)
    ys = torch.cat([y.T, torch.full((3, 5), float('-inf'))], dim=1)
    mask = torch.arange(205).expand(3, -1) < 200
    fw2, fb2 = fit_surrogates(xs, ys, mask, ridge=1e-6)
    torch.testing.assert_close(fw2, w, atol=1e-3, rtol=1e-3)
    few = fit_surrogates(x[:6], y.T[:, :6], ridge=1e-3)[0]
    assert torch.isfinite(few).all()
