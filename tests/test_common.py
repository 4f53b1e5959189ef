"""common.py against independent computations: the KL, the reparameterization, the mu centring, the model blocks'
shapes and output, the shapes data, batching, the folder loader, and the exported autoencoder's loaders."""
import argparse
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal
from torch.distributions import kl_divergence as torch_kl

import common
from conftest import ROOT, assert_clean_error


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


@pytest.mark.parametrize("recon,arch,mean", [("mse", "plain", torch.tanh), ("bce", "plain", torch.sigmoid),
                                             ("mse", "sd", lambda raw: raw)])
def test_the_decoders_mean_starts_at_the_datas_mean_colour(recon, arch, mean):
    # The plain Gaussian decoder's mean is tanh(raw) in [-1, 1], the Bernoulli one's sigmoid(raw) in [0, 1], and
    # Stable Diffusion's the raw output itself (no tanh: its released weights were trained without one). Each output
    # starts at the data's mean colour, given in [0, 1].
    colour = torch.tensor([0.2, 0.5, 0.9])
    model = common.VAE(3, 32, 4, 32, recon=recon, spatial=True, arch=arch, channel_mean=colour)
    with torch.no_grad():
        model.decoder.conv_out.weight.zero_()  # the output is its bias alone
        image = model.decode(torch.randn(2, *model.latent_shape))
        raw = model.decoder(torch.randn(2, *model.latent_shape))
    torch.testing.assert_close(model.mean(raw), mean(raw))
    torch.testing.assert_close(image[:, :, 0, 0], (2 * colour - 1).expand(2, 3))  # decode: always [-1, 1]


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


# ----------------------------------------------------------------------------- batches
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


def test_a_batch_larger_than_the_data_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        common.Batches(torch.zeros(5, 1, 2, 2, dtype=torch.uint8), 8, seed=0, device=torch.device("cpu"))
    assert e.value.code == 2
    assert_clean_error(capsys.readouterr().err, "--batch-size 8", "5 training images")


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


def test_two_machines_decoding_one_shared_folder_at_once_leave_one_whole_cache(tmp_path):
    # Each machine's first process decodes a folder it has not seen (under torchrun across machines on a shared disk,
    # several at once): each writes its own part folder and renames it into place; the loser drops its copy.
    for i in range(30):
        write_png(tmp_path / "photos" / f"{i:02d}.png", (8 * i, 100, 0))
    decode = ("import socket, sys, torch, common; socket.gethostname = lambda: sys.argv[1]; "
              "train, test = common.load_folder(sys.argv[2], 32); "
              "torch.save((train.clone(), test.clone()), sys.argv[3])")
    machines = [subprocess.Popen([sys.executable, "-c", decode, name, str(tmp_path / "photos"), str(tmp_path / name)],
                                 cwd=ROOT, stdout=subprocess.DEVNULL) for name in ("node-a", "node-b")]
    assert [m.wait(timeout=120) for m in machines] == [0, 0]
    caches = list((tmp_path / "photos" / ".decoded").iterdir())
    assert len(caches) == 1 and not caches[0].name.endswith(".part")  # one cache, no part folder left
    train, test = common.load_folder(tmp_path / "photos", 32)
    for name in ("node-a", "node-b"):
        a_train, a_test = torch.load(tmp_path / name, weights_only=True)
        assert torch.equal(a_train, train) and torch.equal(a_test, test)


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_folder_errors_exit_2(tmp_path, capsys, make):
    root = tmp_path / "images"
    if make == "empty":
        root.mkdir()
        (root / "readme.txt").write_text("no images here")
    with pytest.raises(common.BadInput, match=str(root)):
        common.load_folder(root, 32)
    args = argparse.Namespace(dataset="folder", data_dir=str(root), image_size=32)
    with pytest.raises(SystemExit) as e:  # load_data turns it into one error line and exit 2
        common.load_data(args)
    assert e.value.code == 2
    assert_clean_error(capsys.readouterr().err, str(root))


# ----------------------------------------------------------------------------- the exported autoencoder
def save_autoencoder(path, model, scale=0.5):
    torch.save({"autoencoder": model.config, "state_dict": model.state_dict(), "script": "test", "dataset": "shapes",
                "latent_scale_factor": scale}, path)


def test_load_autoencoder_rebuilds_the_model_in_eval_mode(tmp_path):
    torch.manual_seed(0)
    model = common.VAE(3, 32, 4, 32, spatial=True, downsample=8, arch="sd")
    save_autoencoder(tmp_path / "a.pt", model)
    loaded = common.load_autoencoder(tmp_path / "a.pt")
    assert not loaded.training and loaded.latent_scale_factor == 0.5
    assert not any(p.requires_grad for p in loaded.parameters())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x), model.eval().encode(x))


def test_bad_autoencoder_files_exit_2(tmp_path, capsys):
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    torch.save({"step": 3, "model": {}}, tmp_path / "checkpoint.pt")  # a training state, not a model
    for bad, fragment in [("broken.pt", "cannot read"), ("missing.pt", "cannot read"),
                          ("checkpoint.pt", "not an autoencoder.pt")]:
        with pytest.raises(SystemExit) as e:
            common.load_autoencoder(tmp_path / bad)
        assert e.value.code == 2
        assert_clean_error(capsys.readouterr().err, fragment, bad)


def test_init_from_loads_the_same_model_and_refuses_another(tmp_path, capsys):
    torch.manual_seed(0)
    source = common.VAE(3, 32, 4, 32, spatial=True, arch="sd")
    save_autoencoder(tmp_path / "a.pt", source)
    target = common.VAE(3, 64, 4, 32, spatial=True, arch="sd")  # another image size: the same layers
    common.load_weights(target, tmp_path / "a.pt")
    for name, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], value), name
    for other in [common.VAE(3, 32, 4, 64, spatial=True, arch="sd"),  # another width: other shapes
                  common.VAE(3, 32, 4, 32, spatial=True)]:  # the plain stack: other layers
        with pytest.raises(SystemExit) as e:
            common.load_weights(other, tmp_path / "a.pt")
        assert e.value.code == 2
        assert_clean_error(capsys.readouterr().err, "holds another model", "'arch': 'sd'", "pass its flags")
