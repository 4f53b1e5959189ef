"""The trained autoencoder taken home: autoencoder.pt, common.load_autoencoder, tools.encode, --downsample,
and --data-dir refused where nothing reads it."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import common
from conftest import ROOT, assert_clean_error, assert_rejected, load_script, photo_folder, rows_without_speed, run_cli


@pytest.fixture(scope="module")
def photo_run(tmp_path_factory):
    """A short 01 run on a folder of 32 px photos (a code map), as a user would make one."""
    root = tmp_path_factory.mktemp("autoencoder")
    data = photo_folder(root / "photos", n_train=48, n_test=16, size=40)
    out = root / "run"
    result = run_cli("01_vanilla_vae", "--dataset", "folder", "--data-dir", data, "--image-size", "32",
                     "--max-steps", "30", "--batch-size", "16", "--log-every", "10", "--out", out)
    assert result.returncode == 0, result.stderr[-2000:]
    return data, out


@pytest.mark.slow
def test_resume_from_the_memory_mapped_folder_matches_the_uninterrupted_run(photo_run, tmp_path):
    # photo_run's 30 steps again in two legs (20 + 10, at row ends), the second read from the folder's cache
    # (made by photo_run); the first leg's checkpoint is made to look older than --downsample: its flags lack it
    data, reference = photo_run
    out, cache = tmp_path / "two_legs", {p: p.stat().st_mtime_ns for p in (data / ".decoded").rglob("*.u8")}
    result = run_cli("01_vanilla_vae", "--dataset", "folder", "--data-dir", data, "--image-size", "32",
                     "--max-steps", "20", "--batch-size", "16", "--log-every", "10", "--out", out)
    assert result.returncode == 0, result.stderr[-2000:]
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    del saved["args"]["downsample"]
    torch.save(saved, out / "checkpoint.pt")
    result = run_cli("01_vanilla_vae", "--resume", out / "checkpoint.pt", "--max-steps", "30")
    assert result.returncode == 0, result.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in (data / ".decoded").rglob("*.u8")} == cache != {}  # mapped, not decoded
    resumed, expected = (json.loads((d / "summary.json").read_text()) for d in (out, reference))
    for key in ["test_recon", "test_kl", "test_mse", "spectrum_error", "latent_scale_factor", "steps"]:
        assert resumed[key] == pytest.approx(expected[key], rel=1e-6), key
    assert rows_without_speed(out) == rows_without_speed(reference)


def test_autoencoder_pt_holds_the_model_alone(photo_run):
    _, out = photo_run
    saved = torch.load(out / "autoencoder.pt", weights_only=True)
    assert set(saved) == {"autoencoder", "state_dict", "script", "dataset", "latent_scale_factor"}  # no optimizer, RNG
    summary = json.loads((out / "summary.json").read_text())
    assert saved["latent_scale_factor"] == summary["latent_scale_factor"]
    assert saved["autoencoder"]["spatial"] and saved["autoencoder"]["downsample"] == 4
    assert (out / "autoencoder.pt").stat().st_size < 0.5 * (out / "checkpoint.pt").stat().st_size  # Adam's moments


def test_decode_of_encode_reproduces_the_runs_own_reconstructions(photo_run):
    data, out = photo_run
    model = common.load_autoencoder(out / "autoencoder.pt")
    assert not model.training
    test = torch.stack([common.read_image(p, 32) for p in sorted((data / "test").glob("*.png"))])
    with torch.no_grad():
        mu, logvar = model.encode(test.float() / 127.5 - 1)
        images = model.decode(mu)
    assert mu.shape == logvar.shape == (16, 4, 8, 8) and images.shape == (16, 3, 32, 32)
    assert images.min() >= -1 and images.max() <= 1
    # recon.png: 8 originals above their 8 reconstructions, two rows of pairs, tiles enlarged 2x, 2 px padding
    grid = torch.from_numpy(np.array(Image.open(out / "recon.png").convert("RGB"))).permute(2, 0, 1)
    side = 64 + 2
    for i in range(16):
        row, col = 2 * (i // 8) + 1, i % 8  # the reconstruction row under its originals
        tile = grid[:, 2 + row * side:2 + row * side + 64:2, 2 + col * side:2 + col * side + 64:2].float() / 255
        original = grid[:, 2 + (row - 1) * side:2 + (row - 1) * side + 64:2, 2 + col * side:2 + col * side + 64:2]
        assert torch.equal(original, test[i])  # the tile is the test image we encoded
        assert (tile - (images[i] + 1) / 2).abs().max() <= 1 / 255 + 1e-4, i  # equal up to the PNG's 8 bits


def test_the_readmes_snippet_decodes_latents_in_a_folder_with_only_common_py(photo_run, tmp_path):
    # The README's "Back to pictures" snippet, run as written, in a folder holding common.py and the run's files
    data, out = photo_run
    readme = (ROOT / "README.md").read_text()
    snippet = readme.split("Back to pictures:", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert len(snippet.strip().splitlines()) == 5
    shutil.copy(ROOT / "common.py", tmp_path / "common.py")
    (tmp_path / "runs" / "mine").mkdir(parents=True)
    shutil.copy(out / "autoencoder.pt", tmp_path / "runs" / "mine" / "autoencoder.pt")
    result = run_cli("tools.encode", out, "--data-dir", data / "test", "--out", tmp_path / "latents.pt")
    assert result.returncode == 0, result.stderr[-2000:]
    result = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True,
                            env={"PATH": "", "PYTHONPATH": ""}, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".py") == ["common.py"]  # no chapter, no tools
    decoded = np.array(Image.open(tmp_path / "decoded.png").convert("RGB"))
    assert decoded.shape == (4 * 34 + 2, 4 * 34 + 2, 3)  # 16 images of 32 px, 4 a row, 2 px padding
    model = common.load_autoencoder(out / "autoencoder.pt")  # the first image: the test photo's reconstruction
    x = common.read_image(sorted((data / "test").glob("*.png"))[0], 32)
    expected = (model.decode(model.encode(x[None].float() / 127.5 - 1)[0])[0] + 1) / 2 * 255
    assert np.abs(decoded[2:34, 2:34].transpose(2, 0, 1) - expected.numpy()).max() <= 1.0


def test_tools_encode_writes_scaled_codes_with_unit_std_on_the_training_images(photo_run, tmp_path):
    data, out = photo_run
    result = run_cli("tools.encode", out, "--data-dir", data / "train", "--out", tmp_path / "latents.pt")
    assert result.returncode == 0, result.stderr[-2000:]
    saved = torch.load(tmp_path / "latents.pt", weights_only=True)
    files = sorted(str(p) for p in (data / "train").glob("*.png"))
    assert saved["files"] == files and saved["latents"].shape == (48, 4, 8, 8)
    # latent_scale_factor is 1 / std of mu over the run's training images: here exactly those images
    assert saved["latents"].std().item() == pytest.approx(1.0, rel=1e-4)
    model = common.load_autoencoder(out / "autoencoder.pt")
    with torch.no_grad():  # independently: the first file, read with PIL here, encoded by hand
        x = torch.from_numpy(np.array(Image.open(files[0]).convert("RGB").resize((32, 32), Image.BICUBIC)))
        x = x.permute(2, 0, 1)
        expected = model.encode(x[None].float() / 127.5 - 1)[0][0] * model.latent_scale_factor
    torch.testing.assert_close(saved["latents"][0], expected)


def test_tools_encode_refuses_a_checkpoint_or_a_mismatched_file(photo_run, tmp_path):
    data, out = photo_run
    result = run_cli("tools.encode", out / "checkpoint.pt", "--data-dir", data, "--out", tmp_path / "l.pt")
    assert result.returncode == 2 and not (tmp_path / "l.pt").exists()
    assert_clean_error(result.stderr, "is not an autoencoder.pt")
    saved = torch.load(out / "autoencoder.pt", weights_only=True)
    saved["autoencoder"]["latent_dim"] = 8  # a description its weights do not fit
    torch.save(saved, tmp_path / "autoencoder.pt")
    result = run_cli("tools.encode", tmp_path, "--data-dir", data, "--out", tmp_path / "l.pt")
    assert result.returncode == 2 and not (tmp_path / "l.pt").exists()
    assert_clean_error(result.stderr, "does not fit")


def test_downsample_8_gives_stable_diffusions_f8_code_map():
    model = common.VAE(3, 256, 4, 8, spatial=True, downsample=8)
    with torch.no_grad():
        mu, logvar = model.encode(torch.zeros(2, 3, 256, 256))
        assert mu.shape == logvar.shape == (2, 4, 32, 32) == (2, *model.latent_shape)
        assert model.decode(mu).shape == (2, 3, 256, 256)
    flags = ["--dataset", "folder", "--image-size", "256", "--downsample", "8"]
    assert load_script("01_vanilla_vae").parse_args(flags).downsample == 8
    c = load_script("02_burgess_capacity").parse_args(flags).capacity_max
    assert c == 1.5 * 4 * 32 * 32  # C_max follows the map: 1.5 nats per code value
    assert common.VAE(3, 64, 4, 8, spatial=True).latent_shape == (4, 16, 16)  # the default stays f4


def test_downsample_8_run_and_its_autoencoder(tmp_path):
    data = photo_folder(tmp_path / "photos", n_train=40, n_test=8, size=32)
    result = run_cli("02_burgess_capacity", "--dataset", "folder", "--data-dir", data, "--image-size", "32",
                     "--downsample", "8", "--max-steps", "4", "--batch-size", "8", "--log-every", "2",
                     "--out", tmp_path / "run")
    assert result.returncode == 0, result.stderr[-2000:]
    model = common.load_autoencoder(tmp_path / "run" / "autoencoder.pt")
    assert model.latent_shape == (4, 4, 4)
    assert Image.open(tmp_path / "run" / "samples.png").size[0] > 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["args"]["capacity_max"] == 1.5 * 4 * 4 * 4


def test_data_dir_with_shapes_or_downsample_with_a_code_vector_exit_2(tmp_path):
    assert_rejected("01_vanilla_vae", "--data-dir", tmp_path, "--out", tmp_path / "x", mentions="--dataset folder")
    assert_rejected("01_vanilla_vae", "--downsample", "8", "--out", tmp_path / "x", mentions="code map")
    assert not (tmp_path / "x").exists()
