"""--arch sd: Stable Diffusion's autoencoder blocks. Its KL-f8 parameter count, codes that see the whole image,
the flag checks, and short runs of every chapter that export, encode and resume exactly."""
import json

import pytest
import torch

import common
from conftest import assert_rejected, load_script, photo_folder, rows_without_speed, run_cli, whole_and_resumed


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_kl_f8_at_width_128_has_stable_diffusions_parameter_count():
    model = common.VAE(3, 256, 4, 128, spatial=True, downsample=8, arch="sd")
    assert count(model) == 83_653_863  # latent diffusion's kl-f8 Encoder + Decoder + quant_conv + post_quant_conv
    assert count(model.encoder) - count(model.encoder.quant_conv) == 34_163_592
    assert count(model.decoder) - count(model.decoder.post_quant_conv) == 49_490_179
    assert count(model.encoder.quant_conv) + count(model.decoder.post_quant_conv) == 92


@pytest.mark.parametrize("downsample,levels", [(4, 3), (8, 4)])
def test_sd_levels_and_shapes(downsample, levels):
    model = common.VAE(3, 64, 4, 32, spatial=True, downsample=downsample, arch="sd")
    assert common.sd_levels(32, downsample) == [32, 64, 128, 128][:levels]
    with torch.no_grad():
        mu, logvar = model.encode(torch.zeros(2, 3, 64, 64))
        assert mu.shape == logvar.shape == (2, 4, 64 // downsample, 64 // downsample) == (2, *model.latent_shape)
        assert model.decode(mu).shape == (2, 3, 64, 64)


def test_an_sd_code_sees_the_whole_image_a_plain_one_its_window():
    """One pixel in the top-left corner: the bottom-right code moves with the sd blocks only."""
    x = torch.zeros(1, 3, 64, 64)
    y = x.clone()
    y[..., 0, 0] = 1.0
    for arch, reaches in [("sd", True), ("plain", False)]:
        torch.manual_seed(0)
        encoder = common.VAE(3, 64, 4, 32, spatial=True, arch=arch).encoder.eval()
        with torch.no_grad():
            moved = (encoder(x)[0] - encoder(y)[0]).abs()
        assert moved[..., 0, 0].max() > 0
        assert bool(moved[..., -1, -1].max() > 0) == reaches, arch


def test_sd_flags_are_checked(tmp_path):
    out = tmp_path / "x"
    assert_rejected("01_vanilla_vae", "--arch", "sd", "--latent", "vector", "--out", out, mentions="code map")
    assert_rejected("01_vanilla_vae", "--arch", "sd", "--width", "48", "--out", out, mentions="multiple of 32")
    assert not (tmp_path / "x").exists()
    assert load_script("01_vanilla_vae").parse_args(["--arch", "sd"]).latent == "spatial"  # sd blocks: a code map


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return photo_folder(tmp_path_factory.mktemp("sd") / "photos", n_train=40, n_test=8, size=32)


SD = ["--dataset", "folder", "--image-size", "32", "--arch", "sd", "--batch-size", "8", "--log-every", "2"]


@pytest.mark.slow
@pytest.mark.parametrize("script,extra", [("01_vanilla_vae", ["--amp"]), ("02_burgess_capacity", []),
                                          ("03_lpips_frozen", ["--lpips-random-backbone"])])
def test_every_chapter_trains_sd_blocks_and_exports_them(photos, tmp_path, script, extra):
    out = tmp_path / "run"
    result = run_cli(script, *SD, "--data-dir", photos, "--max-steps", "4", *extra, "--out", out)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    model = common.load_autoencoder(out / "autoencoder.pt")
    assert summary["parameters"] == count(model) == count(common.VAE(3, 32, 4, 32, spatial=True, arch="sd"))
    assert isinstance(model.encoder, common.SDEncoder) and summary["world_size"] == 1
    if script == "01_vanilla_vae":  # tools.encode rebuilds the sd blocks from autoencoder.pt
        result = run_cli("tools.encode", out, "--data-dir", photos, "--out", tmp_path / "latents.pt")
        assert result.returncode == 0, result.stderr[-2000:]
        assert torch.load(tmp_path / "latents.pt")["latents"].shape[1:] == (4, 8, 8)


@pytest.mark.slow
def test_04_with_sd_blocks_resumes_exactly(photos, tmp_path):
    flags = [*SD, "--data-dir", photos, "--lpips-random-backbone", "--disc-start", "2"]
    whole, resumed = whole_and_resumed("04_vae_gan_warmup", flags, 6, 4, tmp_path)
    assert rows_without_speed(resumed) == rows_without_speed(whole)
    whole, legs = (json.loads((f / "summary.json").read_text()) for f in (whole, resumed))
    for key in ["test_psnr_db", "test_kl", "test_lpips", "parameters"]:
        assert legs[key] == pytest.approx(whole[key], rel=1e-6), key
