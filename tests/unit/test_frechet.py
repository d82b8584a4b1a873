"""Frechet distance against independent formulas, and the toy feature map."""

import numpy as np
import pytest
import scipy.linalg
import torch

from sidscale.eval.frechet import feature_statistics, frechet_distance, toy_features, toy_frechet


def _random_spd(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_diagonal_covariances_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    v1, v2 = rng.uniform(0.1, 2, 6), rng.uniform(0.1, 2, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-9)


def test_full_covariances_against_symmetric_form():
    # tr (S1 S2)^(1/2) == tr (S1^(1/2) S2 S1^(1/2))^(1/2): the latter via eigh only, an independent route
    rng = np.random.default_rng(1)
    d = 8
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    w, q = np.linalg.eigh(s1)
    r1 = q @ np.diag(np.sqrt(w)) @ q.T
    inner = np.linalg.eigvalsh(r1 @ s2 @ r1)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(inner))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    # and the scipy-computed formula on the same known Gaussians
    direct = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(direct, rel=1e-8)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)


def test_statistics_and_self_distance():
    rng = np.random.default_rng(2)
    f = rng.standard_normal((500, 5)) @ rng.standard_normal((5, 5))
    mu, sigma = feature_statistics(f)
    assert mu.dtype == np.float64 and sigma.shape == (5, 5)
    np.testing.assert_allclose(sigma, (f - f.mean(0)).T @ (f - f.mean(0)) / 499)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)


def test_singular_covariances_stay_finite():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((4, 10)), rng.standard_normal((4, 10))  # rank 3 covariances in 10 dims
    fd = frechet_distance(*feature_statistics(a), *feature_statistics(b))
    assert np.isfinite(fd) and fd > 0


def test_toy_features_are_cell_means():
    x = torch.randn(5, 3, 16, 16)
    f = toy_features(x)
    assert f.shape == (5, 48) and f.dtype == np.float64
    manual = x.reshape(5, 3, 4, 4, 4, 4).mean(dim=(3, 5)).reshape(5, -1).double().numpy()
    np.testing.assert_allclose(f, manual, atol=1e-6)


def test_toy_frechet_sees_a_shift_and_not_resampling():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2000, 3, 16, 16, generator=g)
    same = torch.randn(2000, 3, 16, 16, generator=g)
    assert toy_frechet(base, base) == pytest.approx(0.0, abs=1e-8)
    noise_floor = toy_frechet(base, same)
    shifted = toy_frechet(base, same + 0.3)
    # 48 dims x mean shift 0.3^2 = 4.32 dominates the finite-sample floor
    assert noise_floor < 0.2 and shifted == pytest.approx(4.32 + noise_floor, abs=0.2)
