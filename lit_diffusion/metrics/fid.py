"""Fréchet distance between feature Gaussians of real and generated images (FID, Heusel et al. 2017).

The metric keeps running sums (feature sum, outer-product sum in float64, count) that add up exactly across
ranks, so FID on N GPUs equals FID on one. Real statistics can instead be injected from a disk cache
(`stats_cache.py`); injected statistics are held off the synced states, so they are not counted once per rank.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

from lit_diffusion.metrics.features import BACKENDS, CLIPFeatures, InceptionFeatures, make_extractor

__all__ = ["FID", "RealStats", "frechet_distance", "psd_root", "make_extractor", "InceptionFeatures", "CLIPFeatures", "BACKENDS"]


def _f64(x) -> Tensor:
    return torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).to(device="cpu", dtype=torch.float64)


def psd_root(sigma) -> Tensor:
    """R [D, k] with R @ R.T = sigma, k its numerical rank (eigenvalues above D * eps * the largest): a covariance
    of n < D samples has rank n - 1, so R is thin. float64 on the CPU."""
    sigma = _f64(sigma)
    w, v = torch.linalg.eigh((sigma + sigma.T) / 2)
    keep = w > w[-1].clamp_min(0) * sigma.shape[0] * torch.finfo(torch.float64).eps
    return v[:, keep] * w[keep].sqrt()


def frechet_distance(mu1, sigma1, mu2, sigma2, root1=None) -> Tensor:
    """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^{1/2}), in float64 on the CPU.

    With sigma1 = R R^T (`psd_root`), the eigenvalues of sigma1 sigma2 are those of the symmetric PSD k x k matrix
    R^T sigma2 R (plus zeros), so Tr((sigma1 sigma2)^{1/2}) is the sum of square roots of its eigenvalues: exact,
    no sqrtm, no failure on the singular covariances that fewer samples than feature dimensions give, and only
    symmetric eigensolvers. Pass the real side's `root1` when it is cached: what remains per call is a k x k
    eigenproblem (k < number of real images), instead of a general D x D one.
    """
    mu1, sigma1, mu2, sigma2 = (_f64(t) for t in (mu1, sigma1, mu2, sigma2))
    if mu1.shape != mu2.shape or mu1.dim() != 1 or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"frechet_distance: shapes mu {tuple(mu1.shape)}/{tuple(mu2.shape)}, "
                         f"sigma {tuple(sigma1.shape)}/{tuple(sigma2.shape)} do not match")
    root1 = psd_root(sigma1) if root1 is None else _f64(root1)
    if root1.dim() != 2 or root1.shape[0] != mu1.shape[0]:
        raise ValueError(f"frechet_distance: root1 has shape {tuple(root1.shape)}, expected [{mu1.shape[0]}, k]")
    inner = root1.T @ sigma2 @ root1  # [k, k]
    tr_covmean = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt().sum()
    diff = mu1 - mu2
    return diff.dot(diff) + sigma1.trace() + sigma2.trace() - 2 * tr_covmean


class RealStats(NamedTuple):
    """A reference set's feature Gaussian: mean [D], covariance [D, D], image count, and the covariance's thin
    square root [D, k] (`psd_root`), kept so that each later FID against this set solves only a k x k problem."""

    mu: Tensor
    sigma: Tensor
    n: int
    root: Tensor

    @classmethod
    def of(cls, mu, sigma, n: int, root=None) -> "RealStats":
        """Validated float64 CPU statistics; `root` is computed when not given."""
        mu, sigma = _f64(mu), _f64(sigma)
        d = mu.shape[0] if mu.dim() == 1 else -1
        if mu.dim() != 1 or sigma.shape != (d, d):
            raise ValueError(f"real statistics: expected mu [D] and sigma [D, D], got {tuple(mu.shape)} and "
                             f"{tuple(sigma.shape)}")
        if int(n) < 2:
            raise ValueError(f"real statistics: n must be >= 2, got {n}")
        root = psd_root(sigma) if root is None else _f64(root)
        if root.dim() != 2 or root.shape[0] != d:
            raise ValueError(f"real statistics: root has shape {tuple(root.shape)}, expected [{d}, k]")
        return cls(mu, sigma, int(n), root)


def _gaussian(total: Tensor, outer: Tensor, n: Tensor, side: str) -> tuple[Tensor, Tensor, int]:
    n = int(n)
    if n < 2:
        raise ValueError(f"FID needs at least 2 {side} images to estimate a covariance, got {n}")
    mu = total / n  # [D]
    sigma = (outer - n * torch.outer(mu, mu)) / (n - 1)  # [D, D], unbiased like np.cov
    return mu, sigma, n


class FID(Metric):
    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, extractor, num_features: int | None = None, keep_real: bool = False, **kwargs):
        """`extractor`: images [B, 3, H, W] in [0, 1] -> [B, D]. `keep_real`: `reset()` keeps the real statistics
        (accumulated or injected), so one set of real images serves many evaluations."""
        super().__init__(**kwargs)
        # held outside nn.Module bookkeeping: its weights must not land in every checkpoint that holds this metric
        object.__setattr__(self, "_extractor", extractor)
        num_features = num_features or getattr(extractor, "num_features", None)
        if not num_features:
            raise ValueError("FID: pass num_features= or give the extractor a num_features attribute")
        self.num_features = int(num_features)
        self.keep_real = keep_real
        self._injected_real: RealStats | None = None
        for side in ("real", "fake"):
            self.add_state(f"{side}_sum", torch.zeros(self.num_features, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_outer", torch.zeros(self.num_features, self.num_features, dtype=torch.float64),
                           dist_reduce_fx="sum")
            self.add_state(f"{side}_n", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    @property
    def extractor(self):
        return self._extractor

    def _features(self, images: Tensor) -> Tensor:
        if images.dim() not in (4, 5) or images.shape[-3] != 3:  # 5: clips [B, T, 3, H, W] for a clip extractor
            raise ValueError(f"FID.update expects images [B, 3, H, W] (or clips [B, T, 3, H, W]) in [0, 1], got shape "
                             f"{tuple(images.shape)}")
        param = next(iter(self._extractor.parameters()), None) if hasattr(self._extractor, "parameters") else None
        if param is not None and param.device != images.device:
            self._extractor.to(images.device)
        with torch.no_grad():
            features = self._extractor(images)  # [B, D]
        if features.dim() != 2 or features.shape[1] != self.num_features:
            raise ValueError(f"FID: extractor returned {tuple(features.shape)}, expected [B, {self.num_features}]")
        return features.double()

    def update(self, images: Tensor, real: bool) -> None:
        if real and self._injected_real is not None:
            raise ValueError("FID: real statistics were injected with set_real_stats(); do not also update(real=True)")
        features = self._features(images)  # [B, D] float64
        side = "real" if real else "fake"
        setattr(self, f"{side}_sum", getattr(self, f"{side}_sum") + features.sum(0))
        setattr(self, f"{side}_outer", getattr(self, f"{side}_outer") + features.T @ features)
        setattr(self, f"{side}_n", getattr(self, f"{side}_n") + features.shape[0])

    def forward(self, images: Tensor, real: bool) -> None:
        """Accumulate only: FID of a single batch means nothing (and torchmetrics' forward would reset mid-way)."""
        self.update(images, real=real)

    def compute(self) -> Tensor:
        if self._injected_real is not None:
            mu_r, sigma_r, _, root_r = self._injected_real
        else:  # the real side accumulated here: sigma_r's root is computed in frechet_distance
            (mu_r, sigma_r, _), root_r = _gaussian(self.real_sum, self.real_outer, self.real_n, "real"), None
        mu_f, sigma_f, _ = _gaussian(self.fake_sum, self.fake_outer, self.fake_n, "generated")
        return frechet_distance(mu_r, sigma_r, mu_f, sigma_f, root1=root_r).to(self.fake_sum.device)

    def set_real_stats(self, mu, sigma, n: int, root=None) -> None:
        """Use these real statistics (e.g. from the disk cache) instead of accumulating real images; `root`
        (`psd_root(sigma)`) is computed here when not given."""
        d = self.num_features
        mu, sigma = _f64(mu), _f64(sigma)
        if mu.shape != (d,) or sigma.shape != (d, d):
            raise ValueError(f"FID.set_real_stats: expected mu [{d}] and sigma [{d}, {d}], "
                             f"got {tuple(mu.shape)} and {tuple(sigma.shape)}")
        try:
            stats = RealStats.of(mu, sigma, n, root)
        except ValueError as err:
            raise ValueError(f"FID.set_real_stats: {err}") from None
        # injected statistics replace any accumulated real images (which would otherwise be counted twice)
        for key in ("real_sum", "real_outer", "real_n"):
            getattr(self, key).zero_()
        self._injected_real = stats
        self._computed = None

    @property
    def real_injected(self) -> bool:
        return self._injected_real is not None

    def real_stats(self) -> RealStats:
        """RealStats (mu [D], sigma [D, D], n, root) in float64 on the CPU, gathered over all ranks (a collective:
        call it on every rank, like compute())."""
        if self._injected_real is not None:
            return self._injected_real
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync,
                               should_unsync=self._should_unsync):
            mu, sigma, n = _gaussian(self.real_sum, self.real_outer, self.real_n, "real")
        return RealStats.of(mu.cpu(), sigma.cpu(), n)

    def reset(self) -> None:
        kept = {k: getattr(self, k).clone() for k in ("real_sum", "real_outer", "real_n")} if self.keep_real else {}
        super().reset()
        for key, value in kept.items():
            setattr(self, key, value)
        if not self.keep_real:
            self._injected_real = None
