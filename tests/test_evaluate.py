"""tools/evaluate.py and tools/pictures.py against independent computations: the KL split, the spectrum measures,
SSIM, LPIPS and FD-VGG, the measures of a whole model, BatchNorm's statistics, and the pictures."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.distributions import Normal
from torch.distributions import kl_divergence as torch_kl

import common
from tools import evaluate
from tools import pictures
from tools.lpips_weights import load_lpips


# ----------------------------------------------------------------------------- the KL split
def test_kl_split_adds_up_and_each_part_is_what_it_says():
    torch.manual_seed(0)
    mu = torch.randn(4000, 5, dtype=torch.float64) * torch.tensor([0.1, 0.5, 1.0, 2.0, 0.01]) + torch.tensor(
        [0.0, 1.0, -2.0, 0.0, 0.5], dtype=torch.float64)
    logvar = torch.randn(4000, 5, dtype=torch.float64) * 0.5 - 1.0
    parts = evaluate.kl_split(mu, logvar)
    assert sum(parts.values()).item() == pytest.approx(common.kl_divergence(mu, logvar).sum(1).mean().item(), rel=1e-9)
    # Independently: the codes' marginal, matched as a Gaussian N(E mu, t), t = Var mu + E s^2. Its KL from N(0, 1)
    # is offset + scale, the part centred at 0 the scale alone; the information bound is that Gaussian's entropy
    # less the encoder's mean entropy, h(z) <= h(N(E mu, t)) and h(z|x) = E h(N(mu, s^2)).
    t = mu.var(0, unbiased=False) + logvar.exp().mean(0)
    scale = torch_kl(Normal(torch.zeros(5, dtype=torch.float64), t.sqrt()), Normal(0.0, 1.0)).sum()
    marginal = torch_kl(Normal(mu.mean(0), t.sqrt()), Normal(0.0, 1.0)).sum()
    info = (Normal(0.0, t.sqrt()).entropy() - Normal(mu, (0.5 * logvar).exp()).entropy().mean(0)).sum()
    assert parts["kl_scale"].item() == pytest.approx(scale.item(), rel=1e-9)
    assert parts["kl_offset"].item() == pytest.approx((marginal - scale).item(), rel=1e-9)
    assert parts["info_bound"].item() == pytest.approx(info.item(), rel=1e-9)


def test_info_bound_is_the_information_of_a_gaussian_code():
    # mu ~ N(0, a) and a fixed s^2: z = mu + s eps is a Gaussian channel with I(x; z) = 1/2 ln(1 + a / s^2).
    # The bound holds with equality there, whatever the offset and scale routes cost.
    torch.manual_seed(0)
    a, s2 = torch.tensor([4.0, 0.25, 9.0]), torch.tensor([0.5, 0.1, 2.0])
    mu = torch.randn(200_000, 3) * a.sqrt() + 3.0
    parts = evaluate.kl_split(mu.double(), s2.log().double().expand(200_000, 3))
    assert parts["info_bound"].item() == pytest.approx(0.5 * torch.log(1 + a / s2).sum().item(), rel=2e-3)
    assert parts["kl_offset"].item() == pytest.approx(3 * 0.5 * 9.0, rel=1e-2)  # (E mu)^2 / 2 per dim, mean 3


# ----------------------------------------------------------------------------- spectra, SSIM, LPIPS, FD-VGG
def reference_spectrum_metrics(recon, data):
    """hf_power_ratio and spectrum_error with numpy and plain loops over the frequencies."""
    h = data.shape[-1]
    power = [(np.abs(np.fft.fft2(t.numpy().astype(np.float64))) ** 2).sum((0, 1)) for t in (recon, data)]
    high, rings = [0.0, 0.0], [np.zeros(h // 2 + 1), np.zeros(h // 2 + 1)]
    for i in range(h):
        for j in range(h):
            radius = math.hypot(min(i, h - i) / h, min(j, h - j) / h)  # cycles per pixel
            for k in (0, 1):
                high[k] += power[k][i, j] if radius > 0.25 else 0.0
                if 1 <= round(radius * h) <= h // 2:
                    rings[k][round(radius * h)] += power[k][i, j]
    error = np.mean([abs(math.log10(rings[0][r]) - math.log10(rings[1][r])) for r in range(1, h // 2 + 1)])
    return high[0] / high[1], error


def test_spectrum_metrics_against_loops_and_for_blur_and_noise():
    torch.manual_seed(0)
    data = torch.rand(6, 3, 16, 16)
    blurred = F.avg_pool2d(data, 3, stride=1, padding=1, count_include_pad=False)
    noisy = data + 0.3 * torch.randn_like(data)
    got = {}
    for name, recon in [("same", data), ("double", 2 * data), ("blurred", blurred), ("noisy", noisy)]:
        got[name] = evaluate.spectrum_metrics(evaluate.power_spectrum(recon), evaluate.power_spectrum(data))
        assert got[name] == pytest.approx(reference_spectrum_metrics(recon, data), rel=1e-6, abs=1e-9), name
    assert got["same"] == pytest.approx((1.0, 0.0), abs=1e-9)
    assert got["double"] == pytest.approx((4.0, math.log10(4)), rel=1e-6)  # power x4 at every frequency
    # The high-frequency power ratio calls noise "sharper" than the data; spectrum_error punishes both.
    assert got["blurred"][0] < 0.5 and got["noisy"][0] > 1.5
    assert got["blurred"][1] > 0.1 and got["noisy"][1] > 0.1


def test_measures_against_direct_computation():
    torch.manual_seed(0)
    model = common.VAE(1, 32, 4, 8, centre_mu=True)  # BatchNorm: scoring must use statistics of the training images
    test = (torch.rand(300, 1, 32, 32) * 255).to(torch.uint8)
    train = (torch.rand(600, 1, 32, 32) * 255).to(torch.uint8)
    metrics = evaluate.measures(model, test, train, torch.device("cpu"), decoder_std=0.5, dataset="shapes")
    with torch.no_grad():  # by hand: BatchNorm's statistics, recomputed as the mean of batches of 256 training images
        bn = model.encoder.to_mu[0]
        h = model.encoder.features(train.float() / 127.5 - 1)
        torch.testing.assert_close(bn.running_mean, torch.stack([c.mean(0) for c in h.split(256)]).mean(0))
        x = test.float() / 127.5 - 1
        mu, logvar = model.encoder(x)
        recon = (torch.tanh(model.decoder(mu)) + 1) / 2
        train_mu = model.encoder(train.float() / 127.5 - 1)[0]
    mse = (recon - test.float() / 255).pow(2).mean().item()
    kl = common.kl_divergence(mu, logvar)
    assert metrics["test_mse"] == pytest.approx(mse, rel=1e-4)
    assert metrics["test_psnr_db"] == pytest.approx(10 * math.log10(1 / mse), rel=1e-4)
    assert metrics["test_kl"] == pytest.approx(kl.sum(1).mean().item(), rel=1e-4)
    assert metrics["kl_per_dim"] == pytest.approx(kl.mean(0).tolist(), rel=1e-4)
    assert metrics["active_units"] == int((mu.var(0) > 0.01).sum())
    expected = evaluate.spectrum_metrics(evaluate.power_spectrum(recon), evaluate.power_spectrum(test.float() / 255))
    assert (metrics["hf_power_ratio"], metrics["spectrum_error"]) == pytest.approx(expected, rel=1e-3)
    assert metrics["test_kl_offset"] == pytest.approx(0.5 * mu.mean(0).pow(2).sum().item(), rel=1e-4)
    parts = metrics["test_kl_offset"] + metrics["test_kl_scale"] + metrics["test_info_bound"]
    assert parts == pytest.approx(metrics["test_kl"], rel=1e-6)  # the split is exact
    # the scale factor as defined here: 1 / std of every value of z = mu over the training images
    assert metrics["latent_scale_factor"] == pytest.approx(1 / train_mu.flatten().std().item(), rel=1e-5)
    assert metrics["test_ssim"] == pytest.approx(evaluate.ssim(recon, test.float() / 255).mean().item(), rel=1e-5)
    assert metrics["eval_images"] == 300 and metrics["vgg_images"] == 0


def test_vgg_scores_equal_test_lpips_and_a_direct_computation():
    # 03 and 04 score LPIPS-VGG and FD-VGG with vgg_scores, LPIPS-alex inside measures: all must see the same images
    perceptual, _ = load_lpips("vgg", True, torch.device("cpu"))  # random backbone: any fixed network will do
    torch.manual_seed(0)
    model = common.VAE(3, 32, 4, 8, spatial=True)
    test = (torch.rand(40, 3, 32, 32) * 255).to(torch.uint8)
    found = evaluate.vgg_scores(perceptual, evaluate.reconstructions(model, test, torch.device("cpu")))
    metrics = evaluate.measures(model, test, test, torch.device("cpu"), decoder_std=0.1, dataset="folder",
                                perceptual=perceptual, vgg=perceptual, vgg_images=30)
    with torch.no_grad():  # by hand: decode z = mu, then LPIPS on [-1, 1] images, one image at a time
        x = test.float() / 127.5 - 1
        recon = torch.tanh(model.decoder(model.encoder(x)[0]))
        direct = torch.stack([perceptual(recon[i:i + 1], x[i:i + 1]) for i in range(len(x))]).flatten()
        # FD by hand: relu4_3 of each set, every position a sample, numpy's covariance, scipy-free matrix root
        feats = [perceptual.net(perceptual.scaling_layer(t)).relu4_3.permute(0, 2, 3, 1).reshape(-1, 512).double()
                 for t in (x, recon)]
    (m1, m2), (c1, c2) = [f.mean(0) for f in feats], [torch.from_numpy(np.cov(f.numpy().T)) for f in feats]
    w, v = torch.linalg.eigh(c1)
    root = v @ torch.diag(w.clamp(min=0).sqrt()) @ v.T
    fd = (m1 - m2).pow(2).sum() + c1.trace() + c2.trace() - 2 * torch.linalg.eigvals(root @ c2 @ root).real.clamp(
        min=0).sqrt().sum()
    assert found["test_lpips_vgg"] == pytest.approx(direct.mean().item(), rel=1e-5)
    assert metrics["test_lpips"] == pytest.approx(direct.mean().item(), rel=1e-4)
    assert metrics["test_lpips_vgg"] == pytest.approx(direct[:30].mean().item(), rel=1e-5)  # the first 30 only
    assert found["test_fd_vgg"] == pytest.approx(fd.item(), rel=1e-4) and found["test_fd_vgg"] > 0
    assert metrics["vgg_images"] == 30


def reference_ssim(x, y, window=11, sigma=1.5):
    """SSIM with plain loops over the windows inside the image, each a 2-D Gaussian of weights, float64."""
    x, y = x.double(), y.double()
    r = torch.arange(window, dtype=torch.float64) - window // 2
    w = torch.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma ** 2))
    w = w / w.sum()
    scores = []
    for a, b in zip(x, y):
        values = []
        for c in range(a.shape[0]):
            for i in range(a.shape[1] - window + 1):
                for j in range(a.shape[2] - window + 1):
                    pa, pb = a[c, i:i + window, j:j + window], b[c, i:i + window, j:j + window]
                    ma, mb = (w * pa).sum(), (w * pb).sum()
                    va, vb = (w * (pa - ma) ** 2).sum(), (w * (pb - mb) ** 2).sum()
                    cov = (w * (pa - ma) * (pb - mb)).sum()
                    values.append((2 * ma * mb + 1e-4) * (2 * cov + 9e-4)
                                  / ((ma ** 2 + mb ** 2 + 1e-4) * (va + vb + 9e-4)))
        scores.append(torch.stack(values).mean())
    return torch.stack(scores).mean().item()


def test_ssim_against_windows_computed_one_by_one():
    torch.manual_seed(0)
    x = torch.rand(3, 2, 16, 14)
    y = (x + 0.2 * torch.randn_like(x)).clamp(0, 1)
    got = evaluate.ssim(x, y)
    for i in range(3):
        assert got[i].item() == pytest.approx(reference_ssim(x[i:i + 1], y[i:i + 1]), rel=1e-4)
    assert evaluate.ssim(x, x) == pytest.approx(torch.ones(3), abs=1e-6)  # an image against itself: 1
    assert (evaluate.ssim(x, torch.rand_like(x)) < 0.2).all()  # against noise: near 0


def test_frechet_distance_of_known_gaussians():
    # Diagonal covariances commute: FD = |m1 - m2|^2 + sum (s1 - s2)^2, s the standard deviations
    m1, m2 = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64), torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)
    s1, s2 = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), torch.tensor([2.0, 2.0, 0.5], dtype=torch.float64)
    expected = (m1 - m2).pow(2).sum() + (s1 - s2).pow(2).sum()  # 5 + 1 + 0 + 6.25
    assert evaluate.frechet_distance(m1, s1.pow(2).diag(), m2, s2.pow(2).diag()) == pytest.approx(expected.item())
    # A rotated pair that does not commute: tr(S1 S2)^(1/2) from the 2 x 2 closed form,
    # tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)) for M = S1 S2 with real positive eigenvalues
    c1 = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    c2 = torch.tensor([[1.0, -0.3], [-0.3, 3.0]], dtype=torch.float64)
    product = c1 @ c2
    cross = math.sqrt(product.trace().item() + 2 * math.sqrt(torch.linalg.det(product).item()))
    zero = torch.zeros(2, dtype=torch.float64)
    assert evaluate.frechet_distance(zero, c1, zero, c2) == pytest.approx(3.0 + 4.0 - 2 * cross, rel=1e-9)
    assert evaluate.frechet_distance(m1, s1.pow(2).diag(), m1, s1.pow(2).diag()) == pytest.approx(0.0, abs=1e-9)



# ----------------------------------------------------------------------------- BatchNorm, subsets, pictures
def test_recalibrate_batchnorm_gives_the_exact_feature_statistics():
    torch.manual_seed(0)
    model = common.VAE(1, 64, 4, 8, "mse", centre_mu=True)
    images = torch.randint(0, 256, (600, 1, 64, 64), dtype=torch.uint8)
    for _ in range(3):  # some training-mode forwards with drifting inputs leave lagging running stats
        model.encoder(common.to_model_range(images[:64]) + torch.rand(1))
    evaluate.recalibrate_batchnorm(model, images, torch.device("cpu"))
    bn = model.encoder.to_mu[0]
    with torch.no_grad():
        h = model.encoder.features(common.to_model_range(images))
    # the plain average of each batch's mean and unbiased variance, batches of 256 in order: 256 + 256 + 88 images
    assert torch.allclose(bn.running_mean, torch.stack([c.mean(0) for c in h.split(256)]).mean(0), atol=1e-6)
    expected_var = torch.stack([c.var(0) for c in h.split(256)]).mean(0)
    assert torch.allclose(bn.running_var, expected_var, rtol=1e-4, atol=1e-7)
    assert model.encoder.training is True and bn.momentum == 0.1  # as it was


def test_sample_takes_a_seeded_subset_from_the_whole_set():
    images = torch.arange(1000).view(1000, 1, 1, 1)
    picked = evaluate.sample(images, 100)
    assert torch.equal(picked, evaluate.sample(images, 100)) and len(set(picked.flatten().tolist())) == 100
    assert picked.float().mean() > 300  # not the first hundred of a folder sorted by path
    assert evaluate.sample(images, 5000) is images


@pytest.mark.parametrize("n_test,spatial", [(1, False), (2, False), (10, False), (33, False), (3, True)])
def test_pictures_for_any_number_of_test_images(tmp_path, n_test, spatial):
    torch.manual_seed(0)
    model = common.VAE(3, 32, 4, 8, "mse", spatial=spatial)
    test = torch.randint(0, 256, (n_test, 3, 32, 32), dtype=torch.uint8)
    pictures.save_pictures(tmp_path, model, test, torch.device("cpu"), kl_per_dim=[0.1, 2.0, 0.5, 1.0])
    for name in ["recon.png", "samples.png", "interpolation.png", "traversals.png"]:
        assert (tmp_path / name).stat().st_size > 0, name


def test_pictures_decoded_in_chunks_equal_those_decoded_at_once(tmp_path, monkeypatch):
    # at 256 px save_pictures decodes a few codes at a time; here chunks of 3 images against one pass
    torch.manual_seed(0)
    model = common.VAE(3, 32, 4, 8, "mse", spatial=True)
    test = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    (tmp_path / "whole").mkdir(), (tmp_path / "chunks").mkdir()
    pictures.save_pictures(tmp_path / "whole", model, test, torch.device("cpu"), kl_per_dim=[0.1, 2.0, 0.5, 1.0])
    monkeypatch.setattr(pictures, "DECODED_VALUES", 3 * 3 * 32 * 32)
    pictures.save_pictures(tmp_path / "chunks", model, test, torch.device("cpu"), kl_per_dim=[0.1, 2.0, 0.5, 1.0])
    for name in ["samples.png", "interpolation.png", "traversals.png"]:
        whole, chunks = (np.asarray(Image.open(tmp_path / d / name), dtype=int) for d in ("whole", "chunks"))
        assert np.abs(whole - chunks).max() <= 1, name  # float rounding may move a pixel by one level
