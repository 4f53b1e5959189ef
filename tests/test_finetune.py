"""Fine-tuning a trained autoencoder: --init-from starts a new run from its weights, --train decoder keeps its codes
bit for bit and their scale, --ema averages the weights as torch's AveragedModel does (checkpointed, resumed exactly,
evaluated and exported), and tools.evaluate scores any autoencoder.pt as the chapters score their own."""
import json

import pytest
import torch

import common
from conftest import assert_rejected, photo_folder, rows_without_speed, run_cli, whole_and_resumed

PHOTOS = ["--dataset", "folder", "--image-size", "32", "--batch-size", "8", "--log-every", "2"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A short 01 run with Stable Diffusion's blocks on a small folder: the model to fine-tune."""
    root = tmp_path_factory.mktemp("finetune")
    data = photo_folder(root / "photos", n_train=40, n_test=8, size=32)
    result = run_cli("01_vanilla_vae", *PHOTOS, "--data-dir", data, "--arch", "sd", "--max-steps", "4",
                     "--out", root / "source")
    assert result.returncode == 0, result.stderr[-2000:]
    return data, root / "source"


def codes(model_file, data):
    """mu of the folder's test images, from an autoencoder.pt."""
    model = common.load_autoencoder(model_file)
    _, test = common.load_folder(data, 32)
    with torch.no_grad():
        return model.encode(test.float() / 127.5 - 1)[0]


@pytest.mark.slow
def test_the_decoder_alone_learns_and_the_codes_stay_the_same(source, tmp_path):
    data, out = source
    imported = torch.load(out / "autoencoder.pt", weights_only=True)
    imported["latent_scale_factor"] = 0.18215  # as tools.sd_vae import gives Stable Diffusion's model
    torch.save(imported, tmp_path / "imported.pt")
    result = run_cli("04_vae_gan_warmup", *PHOTOS, "--data-dir", data, "--arch", "sd", "--init-from",
                     tmp_path / "imported.pt", "--train", "decoder", "--ema", "0.9", "--disc-start", "2",
                     "--lpips-random-backbone", "--max-steps", "6", "--out", tmp_path / "tuned")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--train decoder: the KL trains nothing" in result.stdout
    before = torch.load(out / "autoencoder.pt", weights_only=True)["state_dict"]
    after = torch.load(tmp_path / "tuned" / "autoencoder.pt", weights_only=True)["state_dict"]
    for name, value in before.items():
        if name.startswith("encoder."):  # the encoder and the conv before the code: untouched, bit for bit
            assert torch.equal(after[name], value), name
    assert not torch.equal(after["decoder.conv_out.weight"], before["decoder.conv_out.weight"])
    assert torch.equal(codes(tmp_path / "tuned" / "autoencoder.pt", data), codes(out / "autoencoder.pt", data))
    checkpoint = torch.load(tmp_path / "tuned" / "checkpoint.pt", weights_only=True)
    trained = len(checkpoint["optimizer"]["param_groups"][0]["params"])
    assert trained == len([n for n in before if n.startswith("decoder.")])  # the optimizer holds the decoder alone
    for name, value in after.items():  # autoencoder.pt holds the moving average, not the last weights
        assert torch.equal(checkpoint["ema"]["module." + name], value), name
    summary = json.loads((tmp_path / "tuned" / "summary.json").read_text())
    assert summary["steps"] == 6
    # the codes are the imported ones, so is their scale: a diffusion model trained on its latents still fits
    assert summary["latent_scale_factor"] == 0.18215
    assert common.load_autoencoder(tmp_path / "tuned" / "autoencoder.pt").latent_scale_factor == 0.18215


@pytest.mark.slow
def test_ema_is_torchs_average_of_the_weights_and_resumes_exactly(source, tmp_path):
    data, _ = source
    flags = [*PHOTOS, "--data-dir", data, "--ema", "0.75", "--checkpoint-every", "1"]
    states = []
    for steps in (1, 2):  # the same run stopped after one step and after two
        result = run_cli("01_vanilla_vae", *flags, "--max-steps", steps, "--out", tmp_path / str(steps))
        assert result.returncode == 0, result.stderr[-2000:]
        states.append(torch.load(tmp_path / str(steps) / "checkpoint.pt", weights_only=True))
    first, second = states
    assert first["ema"]["n_averaged"] == 1 and second["ema"]["n_averaged"] == 2
    for name, weight in first["model"].items():
        if weight.is_floating_point():
            torch.testing.assert_close(first["ema"]["module." + name], weight)  # the first update copies
            expected = 0.75 * first["ema"]["module." + name] + 0.25 * second["model"][name]  # then decays
            torch.testing.assert_close(second["ema"]["module." + name], expected, rtol=1e-6, atol=1e-7)
    # a run of 6 steps, and one of 4 resumed to 6: the same rows, the same average
    whole, resumed = whole_and_resumed("01_vanilla_vae", flags, 6, 4, tmp_path)
    assert rows_without_speed(resumed) == rows_without_speed(whole)
    whole, resumed = (torch.load(d / "autoencoder.pt", weights_only=True)["state_dict"] for d in (whole, resumed))
    for name, value in whole.items():
        assert torch.equal(resumed[name], value), name


def test_a_frozen_encoder_keeps_its_batchnorm_statistics(tmp_path):
    # 02's code vector is centred by a BatchNorm, whose statistics the evaluation recomputes after training; with the
    # encoder frozen they stay the loaded ones, and so do the codes
    flags = ["--image-size", "32", "--log-every", "2"]
    result = run_cli("02_burgess_capacity", *flags, "--max-steps", "4", "--out", tmp_path / "source")
    assert result.returncode == 0, result.stderr[-2000:]
    result = run_cli("02_burgess_capacity", *flags, "--max-steps", "4", "--init-from",
                     tmp_path / "source" / "autoencoder.pt", "--train", "decoder", "--out", tmp_path / "tuned")
    assert result.returncode == 0, result.stderr[-2000:]
    before, after = (torch.load(tmp_path / d / "autoencoder.pt", weights_only=True)["state_dict"]
                     for d in ("source", "tuned"))
    assert "encoder.to_mu.0.running_mean" in before
    for name, value in before.items():
        if name.startswith("encoder."):
            assert torch.equal(after[name], value), name
    assert not torch.equal(after["decoder.conv_out.weight"], before["decoder.conv_out.weight"])


def test_init_from_another_model_exits_2(source, tmp_path):
    data, out = source
    assert_rejected("01_vanilla_vae", *PHOTOS, "--data-dir", data, "--init-from", out / "autoencoder.pt",
                    "--out", tmp_path / "x", mentions="holds another model")  # the plain stack, not sd
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_tools_evaluate_scores_a_run_as_the_run_did(source, tmp_path):
    data, out = source
    result = run_cli("tools.evaluate", out, "--out", tmp_path / "evaluation.json")
    assert result.returncode == 0, result.stderr[-2000:]
    found = json.loads((tmp_path / "evaluation.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    for key in ["test_psnr_db", "test_ssim", "test_mse", "test_recon", "test_kl", "test_kl_offset", "test_kl_scale",
                "test_info_bound", "spectrum_error", "hf_power_ratio", "latent_scale_factor", "active_units"]:
        assert found[key] == pytest.approx(summary[key], rel=1e-5, abs=1e-7), key  # the same 8 test images
    # any autoencoder.pt, on any folder of the right channels
    result = run_cli("tools.evaluate", out / "autoencoder.pt", "--dataset", "folder", "--data-dir", data,
                     "--image-size", "64", "--out", tmp_path / "at64.json")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "at64.json").read_text())["image_size"] == 64
    result = run_cli("tools.evaluate", out / "autoencoder.pt", "--out", tmp_path / "shapes.json")  # shapes: grey
    assert result.returncode == 2 and "3-channel images, shapes has 1" in result.stderr
