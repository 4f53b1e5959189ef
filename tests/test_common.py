"""common.py against independent computations: the KL, the reparameterization, the mu centring,
the shapes data, the spectrum measures, evaluation, pictures, batching, logs, checkpoints and the
data loaders (MNIST padding, CelebA crop, errors)."""
import argparse
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.distributions import Normal, kl_divergence as torch_kl

import common
from conftest import assert_clean_error, no_network


def forward(model, x):
    """What each chapter's loop does: encode, draw z = mu + s * eps, decode -> (raw, mu, logvar)."""
    mu, logvar = model.encoder(x)
    return model.decoder(mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)), mu, logvar


# ----------------------------------------------------------------------------- KL and reparameterization
def test_kl_matches_torch_distributions():
    torch.manual_seed(0)
    mu, logvar = torch.randn(64, 8) * 2, torch.randn(64, 8) * 3
    expected = torch_kl(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0))
    torch.testing.assert_close(common.kl_divergence(mu, logvar), expected)


def test_kl_matches_monte_carlo():
    torch.manual_seed(0)
    mu, logvar = torch.tensor([0.0, 1.5, -2.0, 0.3]), torch.tensor([0.0, -2.0, 1.0, -4.0])
    q = Normal(mu, (0.5 * logvar).exp())
    z = q.sample((400_000,))
    estimate = (q.log_prob(z) - Normal(0.0, 1.0).log_prob(z)).mean(0)  # E_q[log q - log p]
    torch.testing.assert_close(common.kl_divergence(mu, logvar), estimate, atol=0.02, rtol=0.01)


def test_encoder_clamps_logvar():
    enc = common.Encoder(1, 32, 4, 8)
    with torch.no_grad():
        enc.to_logvar.bias[:] = 50.0
    _, logvar = enc(torch.zeros(2, 1, 32, 32))
    assert logvar.max().item() == 10.0


def test_centred_mu_has_batch_mean_zero_and_no_offset_route():
    # 02-04: mu = W BatchNorm(h) with no bias after the centring, so in training the batch mean of mu
    # is 0 whatever the weights: no shift of all codes at once, which would buy KL without information.
    torch.manual_seed(0)
    enc = common.Encoder(1, 32, 6, 8, centre_mu=True)
    assert enc.to_mu[1].bias is None
    with torch.no_grad():
        enc.features[-2].bias += 3.0  # strongly positive features, as ReLU features tend to be
    mu, _ = enc(torch.rand(64, 1, 32, 32) * 2 - 1)
    assert (mu.mean(0).abs() < 1e-3 * mu.std(0)).all()  # 0 up to float32 rounding


def test_kl_split_adds_up_and_each_part_is_what_it_says():
    torch.manual_seed(0)
    mu = torch.randn(4000, 5, dtype=torch.float64) * torch.tensor([0.1, 0.5, 1.0, 2.0, 0.01]) + torch.tensor(
        [0.0, 1.0, -2.0, 0.0, 0.5], dtype=torch.float64)
    logvar = torch.randn(4000, 5, dtype=torch.float64) * 0.5 - 1.0
    parts = common.kl_split(mu, logvar)
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
    parts = common.kl_split(mu.double(), s2.log().double().expand(200_000, 3))
    assert parts["info_bound"].item() == pytest.approx(0.5 * torch.log(1 + a / s2).sum().item(), rel=2e-3)
    assert parts["kl_offset"].item() == pytest.approx(3 * 0.5 * 9.0, rel=1e-2)  # (E mu)^2 / 2 per dim, mean 3


@pytest.mark.parametrize("size,channels", [(32, 3), (64, 1)])
def test_spatial_latent_shapes_and_kl_per_position_and_channel(size, channels):
    # A code map: one 4-channel code per 4 x 4 patch. Its KL per value matches torch.distributions,
    # the per-dim KL is each channel's sum over positions, and the decoder rebuilds the full image.
    torch.manual_seed(0)
    model = common.VAE(channels, size, 4, 8, "mse", centre_mu=True, spatial=True)  # centring: a code vector's only
    raw, mu, logvar = forward(model, torch.rand(5, channels, size, size) * 2 - 1)
    assert mu.shape == logvar.shape == (5, 4, size // 4, size // 4) == (5, *model.latent_shape)
    assert raw.shape == (5, channels, size, size)
    expected = torch_kl(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0))  # (B, c, h, w)
    torch.testing.assert_close(common.kl_divergence(mu, logvar), expected)
    torch.testing.assert_close(common.kl_per_dim(mu, logvar), expected.mean(0).sum((1, 2)))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert model.decoder.conv_out.weight.shape[0] == channels  # 04's adaptive weight reads this layer


def test_spatial_vae_learns_to_reconstruct():
    # A few hundred Adam steps on smooth random images: the reconstruction error falls far below the
    # error of predicting the mean image, which a code that carries nothing cannot beat.
    torch.manual_seed(0)
    images = F.interpolate(torch.rand(256, 3, 4, 4), size=16, mode="bilinear", align_corners=False) * 2 - 1
    model = common.VAE(3, 16, 4, 16, "mse", spatial=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for step in range(300):
        x = images[torch.randint(0, 256, (32,))]
        raw, mu, logvar = forward(model, x)
        loss = (torch.tanh(raw) - x).pow(2).flatten(1).sum(1).mean() + 0.01 * common.kl_per_dim(mu, logvar).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        error = (torch.tanh(model.decoder(model.encoder(images)[0])) - images).pow(2).mean()
    assert error < 0.5 * (images - images.mean(0)).pow(2).mean()  # measured: 0.31 of it


@pytest.mark.parametrize("size,channels", [(32, 1), (32, 3), (64, 1), (64, 3)])
def test_vae_shapes_and_output_bias(size, channels):
    model = common.VAE(channels, size, 6, 8, recon="mse", channel_mean=torch.full((channels,), 0.1))
    raw, mu, logvar = forward(model, torch.zeros(5, channels, size, size))
    assert raw.shape == (5, channels, size, size) and mu.shape == logvar.shape == (5, 6)
    torch.testing.assert_close(torch.tanh(model.decoder.conv_out.bias), torch.full((channels,), 2 * 0.1 - 1))


# ----------------------------------------------------------------------------- shapes
def reference_shapes(factors, size):
    """Straightforward full-grid rendering (no window), to check the windowed renderer."""
    out = []
    for f in factors.tolist():
        shape, scale, orient, px, py = f
        r = 0.15 * (0.5 + 0.5 * scale / 5)
        a = 2 * math.pi * orient / 40
        cx, cy = 0.2 + 0.6 * px / 31, 0.2 + 0.6 * py / 31
        g = (torch.arange(size, dtype=torch.float32) + 0.5) / size
        dx, dy = g.view(1, -1) - cx, g.view(-1, 1) - cy
        u = (math.cos(a) * dx + math.sin(a) * dy) / r
        v = (-math.sin(a) * dx + math.cos(a) * dy) / r
        if shape == 0:
            inside = torch.maximum(u.abs(), v.abs()) <= 0.8
        elif shape == 1:
            inside = u ** 2 + (v / 0.5) ** 2 <= 1
        else:
            hx, hy = 1.1 * u, -1.1 * v + 0.1
            inside = (hx ** 2 + hy ** 2 - 1) ** 3 - hx ** 2 * hy ** 3 <= 0
        out.append(inside.to(torch.uint8) * 255)
    return torch.stack(out).unsqueeze(1)


@pytest.mark.parametrize("size", [32, 64])
def test_windowed_shapes_equal_full_grid_rendering(size):
    g = torch.Generator().manual_seed(3)
    factors = torch.stack([torch.randint(0, n, (200,), generator=g) for n in common.SHAPE_FACTORS.values()], 1)
    factors[:20, 1], factors[:20, 3:] = 5, 0  # largest shapes in a corner: the window's worst case
    drawn = common.draw_shapes(factors, size)
    assert (drawn != reference_shapes(factors, size)).sum() <= 2  # float rounding on a boundary pixel at most


def test_shapes_deterministic_and_disjoint():
    a_train, a_test, a_factors = common.make_shapes(3000, 500, 32, seed=7)
    b_train, b_test, b_factors = common.make_shapes(3000, 500, 32, seed=7)
    assert torch.equal(a_train, b_train) and torch.equal(a_test, b_test) and torch.equal(a_factors, b_factors)
    c_train, _, _ = common.make_shapes(3000, 500, 32, seed=8)
    assert not torch.equal(a_train, c_train)
    assert a_train.dtype == torch.uint8 and a_train.shape == (3000, 1, 32, 32)
    counts = torch.tensor(list(common.SHAPE_FACTORS.values()))
    assert (a_factors >= 0).all() and (a_factors < counts).all()


def centroid_x(images):
    w = images.float().squeeze(1)
    return (w.sum(1) * torch.arange(w.shape[-1])).sum(-1) / w.sum((1, 2))


def test_shape_factors_drive_the_pixels():
    base = torch.tensor([[1, 5, 0, 0, 16]]).repeat(32, 1)
    base[:, 3] = torch.arange(32)  # sweep pos_x
    cx = centroid_x(common.draw_shapes(base, 64))
    expected = (0.2 + 0.6 * torch.arange(32) / 31) * 64 - 0.5  # pixel index of the centre
    assert (cx - expected).abs().max() < 1.0

    scales = torch.tensor([[0, s, 0, 16, 16] for s in range(6)])
    area = common.draw_shapes(scales, 64).float().sum((1, 2, 3)) / 255
    assert (area.diff() > 0).all()  # bigger scale, bigger area, roughly as scale^2
    expected_ratio = (1.0 / 0.5) ** 2
    assert abs(area[-1] / area[0] - expected_ratio) < 0.6

    shapes = common.draw_shapes(torch.tensor([[s, 5, 0, 16, 16] for s in range(3)]), 64)
    assert len({tuple(x.flatten().tolist()) for x in shapes}) == 3  # square, ellipse, heart differ
    # rotating the ellipse by 90 degrees (orientation index 10 of 40) swaps its width and height
    flat, tall = common.draw_shapes(torch.tensor([[1, 5, 0, 16, 16], [1, 5, 10, 16, 16]]), 64).squeeze(1).bool()
    assert flat.any(0).sum() > 1.5 * flat.any(1).sum() and tall.any(1).sum() > 1.5 * tall.any(0).sum()


# ----------------------------------------------------------------------------- spectra and evaluation
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
        got[name] = common.spectrum_metrics(common.power_spectrum(recon), common.power_spectrum(data))
        assert got[name] == pytest.approx(reference_spectrum_metrics(recon, data), rel=1e-6, abs=1e-9), name
    assert got["same"] == pytest.approx((1.0, 0.0), abs=1e-9)
    assert got["double"] == pytest.approx((4.0, math.log10(4)), rel=1e-6)  # power x4 at every frequency
    # The high-frequency power ratio calls noise "sharper" than the data; spectrum_error punishes both.
    assert got["blurred"][0] < 0.5 and got["noisy"][0] > 1.5
    assert got["blurred"][1] > 0.1 and got["noisy"][1] > 0.1


class EvalArgs:  # the flags common.evaluate reads
    seed, amp, dataset, decoder_std = 0, False, "shapes", 0.5


def test_evaluate_against_direct_computation():
    torch.manual_seed(0)

    model = common.VAE(1, 32, 4, 8)
    test = (torch.rand(300, 1, 32, 32) * 255).to(torch.uint8)
    model.encoder(test[:64].float() / 127.5 - 1)  # one training-mode pass: running statistics not the defaults
    sse = lambda raw, x: (torch.tanh(raw) - x).pow(2).flatten(1).sum(1)  # noqa: E731
    metrics, mu = common.evaluate(model, test, sse, torch.device("cpu"), EvalArgs)
    model.eval()  # evaluation uses BatchNorm's running statistics, not the test batch's
    with torch.no_grad():
        x = test.float() / 127.5 - 1
        mu_ref, logvar_ref = model.encoder(x)
        recon = (torch.tanh(model.decoder(mu_ref)) + 1) / 2
    mse = (recon - test.float() / 255).pow(2).mean().item()
    kl = common.kl_divergence(mu_ref, logvar_ref)
    assert metrics["test_mse"] == pytest.approx(mse, rel=1e-4)
    assert metrics["test_psnr_db"] == pytest.approx(10 * math.log10(1 / mse), rel=1e-4)
    assert metrics["test_kl"] == pytest.approx(kl.sum(1).mean().item(), rel=1e-4)
    assert metrics["kl_per_dim"] == pytest.approx(kl.mean(0).tolist(), rel=1e-4)
    assert metrics["active_units"] == int((mu_ref.var(0) > 0.01).sum())
    expected = common.spectrum_metrics(common.power_spectrum(recon), common.power_spectrum(test.float() / 255))
    assert (metrics["hf_power_ratio"], metrics["spectrum_error"]) == pytest.approx(expected, rel=1e-3)
    assert metrics["test_kl_offset"] == pytest.approx(0.5 * mu_ref.mean(0).pow(2).sum().item(), rel=1e-4)
    parts = metrics["test_kl_offset"] + metrics["test_kl_scale"] + metrics["test_info_bound"]
    assert parts == pytest.approx(metrics["test_kl"], rel=1e-6)  # the split is exact
    assert metrics["latent_scale_factor"] is None  # no training images given
    train = (torch.rand(1100, 1, 32, 32) * 255).to(torch.uint8)  # two chunks: 1,024 + 76 images
    metrics, _ = common.evaluate(model, test, sse, torch.device("cpu"), EvalArgs, train=train)
    model.eval()
    with torch.no_grad():  # the scale factor as defined here: 1 / std of every value of z = mu over the training images
        expected = 1 / model.encoder(train.float() / 127.5 - 1)[0].flatten().std().item()
    assert metrics["latent_scale_factor"] == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(mu, mu_ref)


def test_vgg_scores_equal_evaluates_test_lpips_and_a_direct_computation():
    # 03 and 04 score LPIPS-VGG and FD-VGG with vgg_scores, LPIPS-alex inside evaluate: all must see the same images
    perceptual, _ = common.load_lpips("vgg", True, torch.device("cpu"))  # random backbone: any fixed network will do
    torch.manual_seed(0)
    model = common.VAE(3, 32, 4, 8, centre_mu=True)  # BatchNorm: scoring in training mode would change mu
    test = (torch.rand(40, 3, 32, 32) * 255).to(torch.uint8)
    model.encoder(test.float() / 127.5 - 1)  # one training-mode pass: running statistics not the defaults
    found = common.vgg_scores(perceptual, common.reconstructions(model, test, torch.device("cpu"), EvalArgs, chunk=16))
    assert model.training  # back in training mode for the loop that called it
    metrics, _ = common.evaluate(model, test, lambda raw, x: raw.new_zeros(len(x)), torch.device("cpu"), EvalArgs,
                                 extra=lambda x, mean: {"test_lpips": common.lpips_distance(perceptual, mean, x)})
    model.eval()
    with torch.no_grad():  # by hand: decode z = mu, then LPIPS on [-1, 1] images, one image at a time
        x = test.float() / 127.5 - 1
        recon = torch.tanh(model.decoder(model.encoder(x)[0]))
        direct = torch.stack([perceptual(recon[i:i + 1], x[i:i + 1]) for i in range(len(x))]).mean().item()
        # FD by hand: relu4_3 of each set, every position a sample, numpy's covariance, scipy-free matrix root
        feats = [perceptual.net(perceptual.scaling_layer(t)).relu4_3.permute(0, 2, 3, 1).reshape(-1, 512).double()
                 for t in (x, recon)]
    (m1, m2), (c1, c2) = [f.mean(0) for f in feats], [torch.from_numpy(np.cov(f.numpy().T)) for f in feats]
    w, v = torch.linalg.eigh(c1)
    root = v @ torch.diag(w.clamp(min=0).sqrt()) @ v.T
    fd = (m1 - m2).pow(2).sum() + c1.trace() + c2.trace() - 2 * torch.linalg.eigvals(root @ c2 @ root).real.clamp(
        min=0).sqrt().sum()
    assert found["test_lpips_vgg"] == pytest.approx(direct, rel=1e-5)
    assert metrics["test_lpips"] == pytest.approx(direct, rel=1e-5)
    assert found["test_fd_vgg"] == pytest.approx(fd.item(), rel=1e-4) and found["test_fd_vgg"] > 0


def test_frechet_distance_of_known_gaussians():
    # Diagonal covariances commute: FD = |m1 - m2|^2 + sum (s1 - s2)^2, s the standard deviations
    m1, m2 = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64), torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)
    s1, s2 = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), torch.tensor([2.0, 2.0, 0.5], dtype=torch.float64)
    expected = (m1 - m2).pow(2).sum() + (s1 - s2).pow(2).sum()  # 5 + 1 + 0 + 6.25
    assert common.frechet_distance(m1, s1.pow(2).diag(), m2, s2.pow(2).diag()) == pytest.approx(expected.item())
    # A rotated pair that does not commute: tr(S1 S2)^(1/2) from the 2 x 2 closed form,
    # tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)) for M = S1 S2 with real positive eigenvalues
    c1 = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    c2 = torch.tensor([[1.0, -0.3], [-0.3, 3.0]], dtype=torch.float64)
    product = c1 @ c2
    cross = math.sqrt(product.trace().item() + 2 * math.sqrt(torch.linalg.det(product).item()))
    zero = torch.zeros(2, dtype=torch.float64)
    assert common.frechet_distance(zero, c1, zero, c2) == pytest.approx(3.0 + 4.0 - 2 * cross, rel=1e-9)
    assert common.frechet_distance(m1, s1.pow(2).diag(), m1, s1.pow(2).diag()) == pytest.approx(0.0, abs=1e-9)


# ----------------------------------------------------------------------------- batches, logs, checkpoints
def test_batches_are_a_fixed_permutation_per_epoch():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1)
    batches = common.Batches(images, 3, seed=5, device=torch.device("cpu"))
    assert batches.steps_per_epoch == 3  # the ragged last batch is dropped
    epoch0 = torch.cat([batches(s) for s in range(3)]).flatten()
    assert len(set(epoch0.tolist())) == 9  # no image twice within an epoch
    epoch1 = torch.cat([batches(s) for s in range(3, 6)]).flatten()
    assert not torch.equal(epoch0, epoch1)  # a new order each epoch
    fresh = common.Batches(images, 3, seed=5, device=torch.device("cpu"))
    assert torch.equal(fresh(4), batches(4))  # a resumed run sees the same batch at the same step


def test_run_logs_means_without_per_step_sync_and_resume_keeps_earlier_rows(tmp_path):
    # Tensors and numbers are averaged over the steps of a row (numbers over the steps that gave one),
    # vectors become columns; a resumed run keeps the rows up to its checkpoint and the partial sums.
    args = argparse.Namespace(batch_size=2, seed=0, epochs=1, steps=1, max_steps=0, log_every=3, resume=None,
                              checkpoint_every=0, eval_every=0,
                              out=str(tmp_path), dataset="shapes")
    images = torch.zeros(8, 1, 2, 2, dtype=torch.uint8)  # 4 steps per epoch
    run = common.Run(args, "01_vanilla_vae", torch.device("cpu"), images)
    rows = [run.log(step, loss=torch.tensor(float(step)), kl=torch.tensor([step, -2.0 * step]), beta=step / 10)
            for step in run.steps()]
    assert rows[0] is None and rows[1] is None  # no row, no host sync
    assert {k: rows[2][k] for k in ("step", "loss", "kl_0", "kl_1", "beta")} == pytest.approx(
        {"step": 3, "loss": 1.0, "kl_0": 1.0, "kl_1": -2.0, "beta": 0.1})
    assert rows[3]["step"] == 4 and rows[3]["loss"] == 3.0  # the last step always ends a row, reset after each
    assert common.load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 4  # the epoch's end
    (tmp_path / "checkpoint.pt").rename(tmp_path / "end.pt")
    args.max_steps, args.log_every, args.out = 0, 3, str(tmp_path)
    common.save_checkpoint(tmp_path / "mid.pt", script="01_vanilla_vae", args=vars(args), step=2, total_steps=4,
                           sums=torch.tensor([1.0, 1.0, -2.0]), count=2, numbers={"beta": (0.1, 2)})
    resumed = common.Run(argparse.Namespace(**dict(vars(args), resume=str(tmp_path / "mid.pt"))), "01_vanilla_vae",
                         torch.device("cpu"), images)
    assert [r["step"] for r in resumed.rows] == []  # the rows after step 2 (3 and 4) are dropped
    common.save_checkpoint(tmp_path / "at3.pt", script="01_vanilla_vae", args=vars(args), step=3, total_steps=4,
                           sums=None, count=0, numbers={})  # also without rows: those of metrics.csv up to step 3
    at3 = common.Run(argparse.Namespace(**dict(vars(args), resume=str(tmp_path / "at3.pt"))), "01_vanilla_vae",
                     torch.device("cpu"), images)
    assert [(r["step"], r["loss"]) for r in at3.rows] == [(3, 1.0)] and at3.evals == []
    row = [resumed.log(step, loss=torch.tensor(float(step)), kl=torch.tensor([step, -2.0 * step]), beta=step / 10)
           for step in resumed.steps()][0]
    assert row["step"] == 3 and row["loss"] == pytest.approx(1.0) and row["kl_1"] == pytest.approx(-2.0)
    assert row["beta"] == pytest.approx(0.1)
    other = common.Run(argparse.Namespace(**dict(vars(args), out=str(tmp_path / "other"), max_steps=3)),
                       "01_vanilla_vae", torch.device("cpu"), images)
    ratios = [other.log(step, loss=torch.tensor(0.0), ratio=0.5 if step == 2 else None) for step in other.steps()]
    assert ratios[2]["ratio"] == 0.5  # measured once in the row, not diluted by the steps without it


def test_default_length_is_the_chapters_steps_in_whole_epochs(tmp_path):
    # Without --epochs a run lasts the chapter's `steps`, rounded up to whole epochs, so a small photo
    # folder trains as long as the built-in data; --epochs and --max-steps still rule when given.
    args = argparse.Namespace(batch_size=2, seed=0, epochs=None, steps=10, max_steps=0, log_every=5, resume=None,
                              checkpoint_every=0, eval_every=0,
                              out=str(tmp_path), dataset="folder")
    images = torch.zeros(8, 1, 2, 2, dtype=torch.uint8)  # 4 steps per epoch
    assert common.Run(args, "01_vanilla_vae", torch.device("cpu"), images).total_steps == 12  # 3 epochs
    args.epochs = 1
    assert common.Run(args, "01_vanilla_vae", torch.device("cpu"), images).total_steps == 4
    args.epochs, args.max_steps = None, 7
    assert common.Run(args, "01_vanilla_vae", torch.device("cpu"), images).total_steps == 7


def test_checkpoint_is_atomic_and_bad_files_exit_2(tmp_path, capsys):
    path = tmp_path / "checkpoint.pt"
    common.save_checkpoint(path, step=3, model={"w": torch.ones(2)})
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary left behind
    assert common.load_checkpoint(path)["step"] == 3

    def crash_midway(obj, f):  # a save that dies after writing part of the file
        open(f, "wb").write(b"half a checkpoint")
        raise OSError("disk full")
    real_save = torch.save
    torch.save = crash_midway
    try:
        with pytest.raises(OSError):
            common.save_checkpoint(path, step=4, model={"w": torch.zeros(2)})
    finally:
        torch.save = real_save
    assert common.load_checkpoint(path)["step"] == 3  # the previous checkpoint is untouched
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    for bad in (tmp_path / "broken.pt", tmp_path / "missing.pt"):
        with pytest.raises(SystemExit) as e:
            common.load_checkpoint(bad)
        assert e.value.code == 2
        assert_clean_error(capsys.readouterr().err, "cannot read checkpoint", bad.name)


def test_resume_into_a_model_of_another_shape_exits_2_and_keeps_the_run(tmp_path, capsys):
    # --resume with a flag that changes the model (say --width) must stop before config.json is rewritten
    args = argparse.Namespace(batch_size=2, seed=0, epochs=1, steps=1, max_steps=0, log_every=2, resume=None,
                              checkpoint_every=0, eval_every=0,
                              out=str(tmp_path), dataset="shapes")
    images = torch.zeros(8, 1, 2, 2, dtype=torch.uint8)
    model = torch.nn.Linear(2, 3)
    run = common.Run(args, "01_vanilla_vae", torch.device("cpu"), images, model=model)
    for step in run.steps():
        run.log(step, loss=torch.tensor(1.0))
    config = (tmp_path / "config.json").read_text()
    args.resume = str(tmp_path / "checkpoint.pt")
    resumed = torch.nn.Linear(2, 3)  # the same shape resumes with the saved weights
    common.Run(args, "01_vanilla_vae", torch.device("cpu"), images, model=resumed)
    assert torch.equal(resumed.weight, model.weight)
    (tmp_path / "config.json").write_text(config)
    capsys.readouterr()  # the progress bars so far
    with pytest.raises(SystemExit) as e:
        common.Run(args, "01_vanilla_vae", torch.device("cpu"), images, model=torch.nn.Linear(2, 4))  # another shape
    assert e.value.code == 2
    assert_clean_error(capsys.readouterr().err, "does not fit this model", "size mismatch", "checkpoint.pt")
    assert (tmp_path / "config.json").read_text() == config  # the run's record is untouched
    assert common.load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 4


# ----------------------------------------------------------------------------- data loaders
def write_png(path, color, size=(40, 30)):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_folder_skips_unreadable_files_and_holds_out_ten_percent(tmp_path, capsys):
    for i in range(19):
        write_png(tmp_path / f"class{i % 2}" / f"img{i:02d}.png", (10 * i, 0, 0))
    (tmp_path / "class0" / "broken.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    (tmp_path / "notes.txt").write_text("not an image")
    train, test = common.load_folder(tmp_path, 32)
    assert train.shape == (17, 3, 32, 32) and test.shape == (2, 3, 32, 32)
    assert "19 images read, 1 unreadable files skipped" in capsys.readouterr().out
    assert sorted(train[:, 0, 0, 0].tolist() + test[:, 0, 0, 0].tolist()) == [10 * i for i in range(19)]


def test_folder_with_train_and_test_subfolders_uses_that_split(tmp_path):
    for part, n, color in [("train", 5, 50), ("test", 2, 200)]:
        for i in range(n):
            write_png(tmp_path / part / "photo" / f"{i}.png", (color, 0, 0))
    train, test = common.load_folder(tmp_path, 32)
    assert train.shape[0] == 5 and test.shape[0] == 2
    assert (train[:, 0] == 50).all() and (test[:, 0] == 200).all()


def test_folder_is_decoded_once_into_a_mapped_cache_that_a_change_renews(tmp_path, capsys):
    for i in range(12):
        write_png(tmp_path / "photos" / f"{i:02d}.png", (20 * i, 0, 0))
    train, test = common.load_folder(tmp_path / "photos", 32)
    assert "decoded once" in capsys.readouterr().out
    again, again_test = common.load_folder(tmp_path / "photos", 32)
    assert capsys.readouterr().out == ""  # read from the cache: nothing decoded
    assert torch.equal(again, train) and torch.equal(again_test, test)
    mapped = open("/proc/self/maps").read()  # memory-mapped from the files (Linux), not copied into memory
    assert str(next((tmp_path / "photos" / ".decoded").iterdir()) / "train.u8") in mapped
    write_png(tmp_path / "photos" / "05.png", (255, 255, 0))  # one file rewritten
    changed, _ = common.load_folder(tmp_path / "photos", 32)
    assert "decoded once" in capsys.readouterr().out
    assert sorted(changed[:, 1, 0, 0].tolist()) == [0] * 9 + [255]  # the new pixels, in the one changed image
    assert len(list((tmp_path / "photos" / ".decoded").iterdir())) == 1  # the old decoding is gone


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_folder_errors_exit_2(tmp_path, capsys, make):
    root = tmp_path / "images"
    if make == "empty":
        root.mkdir()
        (root / "readme.txt").write_text("no images here")
    with pytest.raises(SystemExit) as e:
        common.load_folder(root, 32)
    assert e.value.code == 2
    assert_clean_error(capsys.readouterr().err, str(root))


def test_celeba_layout_and_cache(tmp_path, capsys):
    folder = tmp_path / "celeba" / "img_align_celeba"
    from PIL import Image
    folder.mkdir(parents=True)
    lines = []
    for i in range(5):
        Image.new("RGB", (178, 218), (40 * i, 100, 200)).save(folder / f"{i:06d}.jpg")
        lines.append(f"{i:06d}.jpg {[0, 0, 0, 1, 2][i]}")
    (tmp_path / "celeba" / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    train, test = common.load_celeba(tmp_path, 64)
    assert train.shape == (3, 3, 64, 64) and test.shape == (1, 3, 64, 64)  # split 1 (validation) unused
    assert list(tmp_path.glob("celeba/cache_64*.pt"))
    assert torch.equal(common.load_celeba(tmp_path, 64)[0], train)
    with pytest.raises(SystemExit) as e:
        common.load_celeba(tmp_path / "nowhere", 64)
    assert e.value.code == 2
    assert_clean_error(capsys.readouterr().err, "list_eval_partition.txt", "img_align_celeba")


def test_celeba_crop_is_the_148_px_box_at_the_centre(tmp_path):
    # The customary crop: a 148 x 148 box at the centre of the 178 x 218 image, then resized. A frame
    # drawn just outside that box must not show; one just inside must.
    from PIL import Image, ImageDraw
    folder = tmp_path / "celeba" / "img_align_celeba"
    folder.mkdir(parents=True)
    img = Image.new("RGB", (178, 218), (0, 0, 0))
    draw = ImageDraw.Draw(img)
    left, top = (178 - 148) // 2, (218 - 148) // 2  # 15, 35
    draw.rectangle((left - 6, top - 6, left + 153, top + 153), outline=(255, 0, 0), width=5)  # outside
    draw.rectangle((left, top, left + 147, top + 147), outline=(0, 255, 0), width=8)  # inside, at the edge
    img.save(folder / "000001.jpg", format="PNG")  # lossless, whatever the name says
    img.save(folder / "000002.jpg", format="PNG")
    (tmp_path / "celeba" / "list_eval_partition.txt").write_text("000001.jpg 0\n000002.jpg 2\n")
    train, _ = common.load_celeba(tmp_path, 64)
    assert train[0, 0].max() < 40  # no red: the frame outside the box is cut away
    assert train[0, 1, 1].float().mean() > 150 and train[0, 1, :, 1].float().mean() > 150  # green edge kept


def test_mnist_is_padded_with_a_zero_border_keeping_every_pixel(tmp_path, monkeypatch):
    import torchvision.datasets.mnist as tv_mnist
    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", no_network)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = torch.randint(1, 256, (2, 3, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for split, imgs in zip(["train", "t10k"], images):
        header = (2051).to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in imgs.shape)
        (raw / f"{split}-images-idx3-ubyte").write_bytes(header + imgs.numpy().tobytes())
        (raw / f"{split}-labels-idx1-ubyte").write_bytes((2049).to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes(3))
    args = argparse.Namespace(dataset="mnist", data_dir=str(tmp_path), image_size=32)
    train, test, _ = common.load_data(args)
    assert train.shape == (3, 1, 32, 32)
    assert torch.equal(train[:, 0, 2:30, 2:30], images[0]) and torch.equal(test[:, 0, 2:30, 2:30], images[1])
    border = train.clone()
    border[:, :, 2:30, 2:30] = 0
    assert border.sum() == 0
    assert torch.equal(common.original_pixels(train, "mnist"), images[0].unsqueeze(1))
    assert common.original_pixels(train, "cifar10").shape == train.shape


def test_failed_download_exits_2_saying_where_to_put_files(tmp_path, capsys, monkeypatch):
    import torchvision.datasets.mnist as tv_mnist
    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", no_network)
    with pytest.raises(SystemExit) as e:
        common.load_torchvision("fashion-mnist", str(tmp_path), train=True)
    assert e.value.code == 2
    assert_clean_error(capsys.readouterr().err, "fashion-mnist", "FashionMNIST/raw/", str(tmp_path))


def test_recompressed_gz_files_load_offline(tmp_path, monkeypatch):
    # Gzipped IDX files whose checksums are not torchvision's (here: compressed by us, as a Linux
    # package does) must load without the network, not trigger a download.
    import gzip
    import torchvision.datasets.mnist as tv_mnist
    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", no_network)
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    images = torch.randint(0, 256, (2, 5, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for split, imgs in zip(["train", "t10k"], images):  # the IDX format: magic, sizes (big-endian), bytes
        header = (2051).to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in imgs.shape)
        (raw / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + imgs.numpy().tobytes()))
        labels = (2049).to_bytes(4, "big") + (5).to_bytes(4, "big") + bytes(range(5))
        (raw / f"{split}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels))
    for split, train in [(0, True), (1, False)]:
        data = common.load_torchvision("fashion-mnist", str(tmp_path), train=train)
        assert torch.equal(data, images[split].unsqueeze(1))
    assert not list(raw.glob("*.part"))


def test_resize_crops_the_centre_then_resizes():
    img = torch.zeros(1, 1, 40, 60, dtype=torch.uint8)
    img[..., :, 10:50] = 200  # the centred 40x40 square
    out = common.resize_uint8(img, 32)
    assert out.shape == (1, 1, 32, 32) and (out == 200).all()


def test_recalibrate_batchnorm_gives_the_exact_feature_statistics():
    torch.manual_seed(0)
    model = common.VAE(1, 32, 4, 8, "mse", centre_mu=True)
    images = torch.randint(0, 256, (600, 1, 32, 32), dtype=torch.uint8)
    for _ in range(3):  # some training-mode forwards with drifting inputs leave lagging running stats
        model.encoder(common.to_model_range(images[:64]) + torch.rand(1))
    common.recalibrate_batchnorm(model, images, batch_size=200)
    bn = model.encoder.to_mu[0]
    with torch.no_grad():
        h = model.encoder.features(common.to_model_range(images))
    assert torch.allclose(bn.running_mean, h.mean(0), atol=1e-5)
    # the average of three unbiased batch variances, each over 200 images in the seeded random order
    order = torch.randperm(600, generator=torch.Generator().manual_seed(0))
    expected_var = torch.stack([c.var(0) for c in h[order].split(200)]).mean(0)
    assert torch.allclose(bn.running_var, expected_var, rtol=1e-4, atol=1e-7)
    assert not model.training and bn.momentum == 0.1


def test_recalibrate_batchnorm_samples_the_whole_training_set():
    # A folder's images come sorted by path; the statistics must not come from its first part only.
    torch.manual_seed(0)
    model = common.VAE(1, 32, 4, 8, "mse", centre_mu=True)
    images = torch.cat([torch.zeros(500, 1, 32, 32), torch.full((500, 1, 32, 32), 255.0)]).to(torch.uint8)
    common.recalibrate_batchnorm(model, images, batch_size=100, max_images=400)
    with torch.no_grad():
        h = model.encoder.features(common.to_model_range(images))
    bn = model.encoder.to_mu[0]
    first, whole = h[:500].mean(0), h.mean(0)
    assert (bn.running_mean - whole).norm() < 0.3 * (first - whole).norm()


@pytest.mark.parametrize("n_test,spatial", [(1, False), (2, False), (10, False), (33, False), (3, True)])
def test_pictures_for_any_number_of_test_images(tmp_path, n_test, spatial):
    torch.manual_seed(0)
    model = common.VAE(3, 32, 4, 8, "mse", spatial=spatial)
    test = torch.randint(0, 256, (n_test, 3, 32, 32), dtype=torch.uint8)
    common.save_pictures(tmp_path, model, test, torch.device("cpu"), kl_per_dim=[0.1, 2.0, 0.5, 1.0])
    for name in ["recon.png", "samples.png", "interpolation.png", "traversals.png"]:
        assert (tmp_path / name).stat().st_size > 0, name


def test_pictures_decoded_in_chunks_equal_those_decoded_at_once(tmp_path, monkeypatch):
    # at 256 px save_pictures decodes a few images at a time (eval_chunk); here chunks of 3 images against one pass
    torch.manual_seed(0)
    model = common.VAE(3, 32, 4, 8, "mse", spatial=True)
    test = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    (tmp_path / "whole").mkdir(), (tmp_path / "chunks").mkdir()
    common.save_pictures(tmp_path / "whole", model, test, torch.device("cpu"), kl_per_dim=[0.1, 2.0, 0.5, 1.0])
    monkeypatch.setattr(common, "eval_chunk", lambda images: 3)
    common.save_pictures(tmp_path / "chunks", model, test, torch.device("cpu"), kl_per_dim=[0.1, 2.0, 0.5, 1.0])
    for name in ["samples.png", "interpolation.png", "traversals.png"]:
        whole, chunks = (np.asarray(Image.open(tmp_path / d / name), dtype=int) for d in ("whole", "chunks"))
        assert np.abs(whole - chunks).max() <= 1, name  # float rounding may move a pixel by one level
