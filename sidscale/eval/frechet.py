"""Frechet distance between Gaussians fitted to features, and the toy pixel features.

``frechet_distance`` is the FID formula (Heusel et al. 2017) for any feature extractor.
``toy_features`` is the feature map for the toy teacher's 3x16x16 world: there is no Inception
network offline, and none is needed, because the toy distribution is known exactly.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of [N, D] features, float64, covariance with the unbiased N-1 divisor."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need features of shape [N >= 2, D], got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """``||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`` for N(mu1, S1) and N(mu2, S2)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = (
        np.atleast_2d(np.asarray(sigma1, np.float64)),
        np.atleast_2d(np.asarray(sigma2, np.float64)),
    )
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"shape mismatch: {mu1.shape} / {mu2.shape}, {sigma1.shape} / {sigma2.shape}")
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # NOTE: S1 S2 singular (e.g. fewer samples than dims): offset both diagonals slightly,
        # the standard pytorch-fid fallback.
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        # tiny imaginary parts are numerical noise; large ones mean the inputs are not covariances
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm gave imaginary component {np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def toy_features(x: torch.Tensor, grid: int = 4) -> np.ndarray:
    """[B, C, H, W] -> [B, C*grid*grid] float64: average-pooled pixels (48 dims for 3 channels, 4x4).

    Why pooled pixels: the FD fits a Gaussian to the features, and its covariance needs a few
    samples per dimension to be estimated well. Raw 3x16x16 pixels are 768 dims, so a few
    thousand samples would leave the estimate dominated by sampling noise; 4x4 cells keep 48
    dims that still see colour, position and size of the shapes (what the mixture's components
    differ in), so a few thousand (even a few hundred) samples give a stable number.
    """
    if x.dim() != 4:
        raise ValueError(f"expected [B, C, H, W], got {tuple(x.shape)}")
    pooled = F.adaptive_avg_pool2d(x.detach().float().cpu(), grid)
    return pooled.reshape(x.shape[0], -1).double().numpy()


def toy_frechet(samples: torch.Tensor, reference: torch.Tensor) -> float:
    """Frechet distance between two image sets in ``toy_features`` space."""
    return frechet_distance(
        *feature_statistics(toy_features(samples)), *feature_statistics(toy_features(reference))
    )
