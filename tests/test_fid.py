import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image
from scipy import linalg
from torch import nn

from lit_diffusion.metrics.features import (
    INCEPTION_URL,
    CLIPFeatures,
    InceptionFeatures,
    make_extractor,
    save_random_inception_weights,
    to_uint8,
)
from lit_diffusion.metrics.fid import FID, RealStats, frechet_distance, psd_root
from lit_diffusion.metrics.stats_cache import cached_real_stats, stats_path


class TinyExtractor(nn.Module):
    """A cheap deterministic stand-in for Inception: pooled pixels, random projection, tanh."""

    num_features = 12

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = nn.Parameter(torch.randn(3 * 16, self.num_features, generator=g) * 0.5)

    def forward(self, images):
        # float64, so that batch composition changes nothing and cross-rank sums are compared at 1e-12
        return torch.tanh(F.adaptive_avg_pool2d(images.double(), 4).flatten(1) @ self.proj.double())  # [B, 12]


def smooth_images(n, size=16, seed=0):
    """Random smooth images in [0, 1] (upsampled noise), so pooled features vary across samples."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    return F.interpolate(low, size=size, mode="bilinear", align_corners=False).clamp(0, 1)


def numpy_fid(feats1, feats2):
    """The reference recipe (TTUR / pytorch-fid): np.cov statistics, scipy sqrtm."""
    f1, f2 = feats1.double().numpy(), feats2.double().numpy()
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


# ---------------------------------------------------------------- frechet_distance


def test_frechet_distance_matches_scipy_sqrtm_reference():
    g = torch.Generator().manual_seed(1)
    d = 24
    a = torch.randn(d, 3 * d, generator=g, dtype=torch.float64)
    b = torch.randn(d, 3 * d, generator=g, dtype=torch.float64)
    s1, s2 = a @ a.T / (3 * d), b @ b.T / (3 * d) + 0.1 * torch.eye(d, dtype=torch.float64)
    mu1, mu2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    ref = ((mu1 - mu2) ** 2).sum().item() + np.trace(s1.numpy()) + np.trace(s2.numpy()) \
        - 2 * np.trace(linalg.sqrtm(s1.numpy() @ s2.numpy()).real)
    got = frechet_distance(mu1, s1, mu2, s2)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(ref, rel=1e-9)
    # numpy inputs are accepted and give the same value
    assert frechet_distance(mu1.numpy(), s1.numpy(), mu2.numpy(), s2.numpy()).item() == pytest.approx(ref, rel=1e-12)


def test_frechet_distance_with_fewer_samples_than_dimensions_matches_the_full_eigenproblem():
    """n < D: singular covariances. The thin-root path solves a k x k problem (k = n - 1) and must equal the
    general D x D eigenvalue formula that torchmetrics and torch-fidelity use."""
    g = torch.Generator().manual_seed(2)
    d, n_real, n_fake = 64, 20, 15
    real = torch.randn(n_real, d, generator=g, dtype=torch.float64)
    fake = 1.3 * torch.randn(n_fake, d, generator=g, dtype=torch.float64) + 0.2
    mu1, s1, mu2, s2 = real.mean(0), real.T.cov(), fake.mean(0), fake.T.cov()
    root = psd_root(s1)
    assert root.shape == (d, n_real - 1)  # the numerical rank of n centred samples
    torch.testing.assert_close(root @ root.T, s1, rtol=0, atol=1e-12)
    # exact reference: with s = Xc^T Xc / (n - 1), Tr((s1 s2)^{1/2}) is the nuclear norm of Xc1 Xc2^T / sqrt(..)
    xc1, xc2 = real - mu1, fake - mu2
    tr_sqrt = torch.linalg.svdvals(xc1 @ xc2.T).sum() / ((n_real - 1) * (n_fake - 1)) ** 0.5
    exact = (((mu1 - mu2) ** 2).sum() + s1.trace() + s2.trace() - 2 * tr_sqrt).item()
    # (R^T s2 R still has n_real - n_fake rounding-level eigenvalues; their square roots are the residual error)
    assert frechet_distance(mu1, s1, mu2, s2).item() == pytest.approx(exact, rel=1e-8)
    assert frechet_distance(mu1, s1, mu2, s2, root1=root).item() == pytest.approx(exact, rel=1e-8)
    # the general formula agrees up to the square roots of its ~1e-15 rounding eigenvalues (D - k of them)
    general = ((mu1 - mu2) ** 2).sum() + s1.trace() + s2.trace() \
        - 2 * torch.linalg.eigvals(s1 @ s2).sqrt().real.sum()
    assert general.item() == pytest.approx(exact, rel=1e-7)
    with pytest.raises(ValueError, match="root1"):
        frechet_distance(mu1, s1, mu2, s2, root1=root[:5])
    with pytest.raises(ValueError, match="root"):
        RealStats.of(mu1, s1, n_real, root=root.T)


def test_frechet_distance_closed_forms():
    # 1-D Gaussians: (m1 - m2)^2 + (std1 - std2)^2
    got = frechet_distance(torch.tensor([1.0]), torch.tensor([[4.0]]), torch.tensor([-2.0]), torch.tensor([[9.0]]))
    assert got.item() == pytest.approx(9.0 + 1.0, abs=1e-12)
    # identical Gaussians: 0
    s = torch.diag(torch.tensor([1.0, 2.0, 3.0]))
    assert frechet_distance(torch.zeros(3), s, torch.zeros(3), s).item() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="shapes"):
        frechet_distance(torch.zeros(3), s, torch.zeros(2), s)


# ---------------------------------------------------------------- FID metric


def test_fid_metric_statistics_and_value_match_numpy_reference():
    ext = TinyExtractor()
    real, fake = smooth_images(60, seed=0), smooth_images(50, seed=1) ** 2
    fid = FID(ext)
    for chunk in real.split(16):
        fid.update(chunk, real=True)
    for chunk in fake.split(7):
        fid.update(chunk, real=False)
    with torch.no_grad():
        f_real, f_fake = ext(real), ext(fake)
    mu, sigma, n, root = fid.real_stats()
    assert n == 60
    np.testing.assert_allclose((root @ root.T).numpy(), sigma.numpy(), rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(mu.numpy(), f_real.double().mean(0).numpy(), rtol=1e-10)
    np.testing.assert_allclose(sigma.numpy(), np.cov(f_real.double().numpy(), rowvar=False), rtol=1e-8, atol=1e-12)
    assert fid.compute().item() == pytest.approx(numpy_fid(f_real, f_fake), rel=1e-6)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise():
    ext = TinyExtractor()
    real = smooth_images(200, seed=3)
    noise = torch.randn(real.shape, generator=torch.Generator().manual_seed(4))
    fid = FID(ext, keep_real=True)
    fid.update(real, real=True)
    values = []
    for std in (0.0, 0.05, 0.1, 0.2, 0.4):
        fid.reset()  # keeps the real statistics
        fid.update((real + std * noise).clamp(0, 1), real=False)
        values.append(fid.compute().item())
    assert abs(values[0]) < 1e-9
    assert all(b > a for a, b in zip(values, values[1:])), values
    assert values[1] > 1e-5


def test_injected_real_stats_equal_accumulated_and_survive_reset_only_with_keep_real():
    ext = TinyExtractor()
    real, fake = smooth_images(40, seed=5), smooth_images(30, seed=6).flip(-1) * 0.8
    full = FID(ext)
    full.update(real, real=True)
    full.update(fake, real=False)
    expected = full.compute().item()

    cached = FID(ext, keep_real=True)
    cached.set_real_stats(*full.real_stats())
    assert cached.real_stats()[2] == 40
    cached.update(fake, real=False)
    assert cached.compute().item() == pytest.approx(expected, rel=1e-10)
    cached.reset()
    cached.update(fake, real=False)
    assert cached.compute().item() == pytest.approx(expected, rel=1e-10)
    with pytest.raises(ValueError, match="injected"):
        cached.update(real, real=True)

    forgetful = FID(ext)
    forgetful.set_real_stats(*full.real_stats())
    forgetful.reset()
    forgetful.update(fake, real=False)
    with pytest.raises(ValueError, match="at least 2 real"):
        forgetful.compute()


def test_fid_accumulated_real_kept_across_reset_with_keep_real():
    ext = TinyExtractor()
    fid = FID(ext, keep_real=True)
    fid.update(smooth_images(20, seed=7), real=True)
    fid.update(smooth_images(20, seed=8), real=False)
    fid.reset()
    assert int(fid.real_n) == 20 and int(fid.fake_n) == 0


def test_extractor_is_not_saved_with_the_metric():
    ext = TinyExtractor()
    holder = nn.Module()
    holder.fid = FID(ext)
    assert not any("proj" in k for k in holder.state_dict())
    assert all(not isinstance(m, TinyExtractor) for m in holder.modules())
    assert holder.fid.extractor is ext


def test_fid_rejects_bad_inputs():
    fid = FID(TinyExtractor())
    fid.update(smooth_images(4), real=True)
    fid.set_real_stats(torch.zeros(12), torch.eye(12), 10)  # replaces the accumulated real images
    assert fid.real_injected and int(fid.real_n) == 0 and fid.real_stats()[2] == 10
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        fid.update(torch.rand(3, 16, 16), real=False)
    with pytest.raises(ValueError, match="num_features"):
        FID(lambda x: x)
    with pytest.raises(ValueError, match="set_real_stats"):
        fid.set_real_stats(torch.zeros(5), torch.eye(5), 10)


# ---------------------------------------------------------------- feature backends


def test_clip_backend_maps_images_to_minus_one_one():
    class StandIn(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 5)
            self.seen = []

        def encode_image(self, x):
            self.seen.append((x.min().item(), x.max().item()))
            return F.normalize(self.lin(x.mean((2, 3))), dim=-1)

    clip = StandIn()
    ext = make_extractor("clip", clip=clip)
    assert isinstance(ext, CLIPFeatures) and ext.num_features == 5  # probed, no embed_dim attribute
    images = torch.zeros(2, 3, 8, 8)
    images[0, :, 0, 0] = 1.0
    out = ext(images)
    assert clip.seen[-1] == (-1.0, 1.0)
    torch.testing.assert_close(out, clip.encode_image(images * 2 - 1))
    assert ext.identity.startswith("clip-")


def test_extractor_factory_errors(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError) as err:
        make_extractor("inception", weights_path=missing)
    assert str(missing) in str(err.value) and INCEPTION_URL in str(err.value) and "'clip'" in str(err.value)
    with pytest.raises(ValueError, match="clip="):
        make_extractor("clip")
    with pytest.raises(ValueError, match="unknown FID feature backend 'dino'"):
        make_extractor("dino")


def test_to_uint8_round_trips_png_values():
    values = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, 3, 16, 16)
    assert torch.equal(to_uint8(values.float() / 255), values)


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    return save_random_inception_weights(tmp_path_factory.mktemp("inception") / "random_inception.pth", seed=0)


def save_pngs(images01, folder):
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(to_uint8(images01)):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i:04d}.png")
    return folder


def test_inception_features_equal_torch_fidelity_on_the_saved_pngs(inception_weights, tmp_path):
    from torch_fidelity.datasets import ImagesPathDataset
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    folder = save_pngs(images, tmp_path / "png")
    uint8 = torch.stack([ImagesPathDataset([str(p)])[0] for p in sorted(folder.glob("*.png"))])
    theirs = FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(inception_weights)
    )
    with torch.no_grad():
        (expected,) = theirs(uint8)
        ours = InceptionFeatures(inception_weights)(images)
    assert ours.shape == (3, 2048) and expected.std() > 1e-3  # the random net's features are not degenerate
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def _tiny_fidelity_extractor_class():
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

    class TinyFidelityExtractor(FeatureExtractorBase):
        """A torch-fidelity feature extractor (uint8 in) cheap enough for the default test run."""

        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)
            self.inner = TinyExtractor()

        def forward(self, x):
            return (self.inner(x.float() / 255).float(),)

        @staticmethod
        def get_provided_features_list():
            return ("tiny",)

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return "tiny"

        @staticmethod
        def can_be_compiled():
            return False

    return TinyFidelityExtractor


def test_fid_pipeline_equals_torch_fidelity_with_a_registered_tiny_extractor(tmp_path):
    """The whole path (float images -> uint8 -> features -> running sums -> distance) against torch-fidelity
    reading the PNG folders, with a cheap extractor; the Inception version of this test is marked slow."""
    import torch_fidelity
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    cls = _tiny_fidelity_extractor_class()
    if "lit-tiny-test" not in FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor("lit-tiny-test", cls)

    class Ours(nn.Module):
        num_features = TinyExtractor.num_features

        def __init__(self):
            super().__init__()
            self.net = cls("lit-tiny-test", ["tiny"])

        def forward(self, images):
            return self.net(to_uint8(images))[0]

    real = torch.rand(70, 3, 16, 16, generator=torch.Generator().manual_seed(30))
    fake = (smooth_images(64, seed=31) + 0.1 * torch.rand(64, 3, 16, 16, generator=torch.Generator().manual_seed(32)))
    fake = fake.clamp(0, 1)
    expected = torch_fidelity.calculate_metrics(
        input1=str(save_pngs(fake, tmp_path / "fake")), input2=str(save_pngs(real, tmp_path / "real")), fid=True,
        feature_extractor="lit-tiny-test", cuda=False, cache=False, verbose=False, save_cpu_ram=True,
    )["frechet_inception_distance"]
    fid = FID(Ours())
    for chunk in real.split(32):
        fid.update(chunk, real=True)
    fid.update(fake, real=False)
    assert expected > 0.01
    assert fid.compute().item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
def test_fid_equals_torch_fidelity_calculate_metrics(inception_weights, tmp_path):
    import torch_fidelity

    real = smooth_images(32, size=32, seed=10)
    fake = (smooth_images(32, size=32, seed=11) * 0.7 + 0.1)
    dir_real, dir_fake = save_pngs(real, tmp_path / "real"), save_pngs(fake, tmp_path / "fake")
    expected = torch_fidelity.calculate_metrics(
        input1=str(dir_fake), input2=str(dir_real), fid=True, cuda=False, cache=False, verbose=False,
        save_cpu_ram=True, batch_size=16, feature_extractor_weights_path=str(inception_weights),
    )["frechet_inception_distance"]
    fid = FID(make_extractor("inception", weights_path=inception_weights))
    for chunk in real.split(10):  # batch boundaries differ from torch-fidelity's on purpose
        fid.update(chunk, real=True)
    fid.update(fake, real=False)
    assert expected > 0
    assert fid.compute().item() == pytest.approx(expected, rel=1e-3)


# ---------------------------------------------------------------- exact reduction across ranks


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SPLITS = {"even": (20, 15), "uneven": (3, 26)}  # rank 0 takes the first k real / fake images


def _fid_results(real, fake, rank, world, ext):
    results = {}
    for name, (k_real, k_fake) in SPLITS.items():
        part = (lambda x, k: x) if world == 1 else (lambda x, k: x[:k] if rank == 0 else x[k:])
        fid = FID(ext)
        fid.update(part(real, k_real), real=True)
        fid.update(part(fake, k_fake), real=False)
        results[name] = fid.compute()
        results[f"{name}_mu"] = fid.real_stats()[0]
        injected = FID(ext)
        injected.set_real_stats(*fid.real_stats())  # every rank injects the same (global) statistics
        injected.update(part(fake, k_fake), real=False)
        results[f"{name}_injected"] = injected.compute()
    return results


def _ddp_worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        real, fake = smooth_images(40, seed=20), smooth_images(30, seed=21) * 0.9
        torch.save(_fid_results(real, fake, rank, world, TinyExtractor()), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_fid_on_two_ranks_equals_one_rank(tmp_path):
    real, fake = smooth_images(40, seed=20), smooth_images(30, seed=21) * 0.9
    single = _fid_results(real, fake, 0, 1, TinyExtractor())
    # fork: the children inherit the imports (spawn would re-import torch and torchmetrics: ~20 s here)
    mp.start_processes(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    for rank in range(2):
        multi = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for key, value in single.items():
            torch.testing.assert_close(multi[key], value, rtol=1e-9, atol=1e-12, msg=f"rank {rank} {key}")


# ---------------------------------------------------------------- real-statistics cache


def _key(**over):
    return {"data": "val-shards-abc", "resolution": 32, "num_samples": 64, "backend": "inception",
            "weights": "inception-0123", **over}


def test_stats_cache_miss_hit_and_mismatch(tmp_path):
    calls = []

    def compute(value=1.0):
        calls.append(value)
        return torch.full((4,), value), torch.eye(4) * value, 64

    key = _key()
    mu, sigma, n, _ = cached_real_stats(tmp_path, key, compute, is_writer=True)
    assert len(calls) == 1 and n == 64 and mu.dtype == torch.float64
    path = stats_path(tmp_path, key)
    assert path.exists() and path.name.startswith("fid_stats_inception_32px_64_")
    blob = torch.load(path, weights_only=True)
    assert blob["key_fields"] == key and blob["n"] == 64
    torch.testing.assert_close(blob["root"] @ blob["root"].T, torch.eye(4, dtype=torch.float64))
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temp file left behind

    mu2, *_ = cached_real_stats(tmp_path, key, lambda: compute(2.0), is_writer=True)  # hit
    assert len(calls) == 1 and torch.equal(mu2, mu)

    # another resolution or weights is another file, not a reuse
    cached_real_stats(tmp_path, _key(weights="inception-ffff"), lambda: compute(3.0), is_writer=True)
    assert calls == [1.0, 3.0] and len(list(tmp_path.iterdir())) == 2

    # a file at the right name holding other fields (stale, or a hash collision) is recomputed and replaced
    blob["key_fields"] = _key(num_samples=999)
    torch.save(blob, path)
    mu4, *_ = cached_real_stats(tmp_path, key, lambda: compute(4.0), is_writer=True)
    assert calls[-1] == 4.0 and mu4[0].item() == 4.0
    assert torch.load(path, weights_only=True)["key_fields"] == key

    # a corrupt file is recomputed too
    path.write_bytes(b"not a torch file")
    cached_real_stats(tmp_path, key, lambda: compute(5.0), is_writer=True)
    assert calls[-1] == 5.0


def test_stats_cache_non_writer_does_not_write_and_key_is_checked(tmp_path):
    stats = (torch.zeros(2), torch.eye(2), 10)
    cached_real_stats(tmp_path, _key(), lambda: stats, is_writer=False)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="weights"):
        cached_real_stats(tmp_path, {k: v for k, v in _key().items() if k != "weights"}, lambda: stats)
