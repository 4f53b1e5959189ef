"""tools/ladder.py and the photo set-up it is made for: a folder with train/ and test/, a spatial
latent by default, and the ladder's scores against each run's own summary.json."""
import json
import re
import shutil
import sys

import pytest
import torch

from conftest import ROOT, assert_clean_error, photo_folder, run_cli


@pytest.fixture(scope="module")
def photo_runs(tmp_path_factory):
    """A 01 and a 03 run on a small folder of smooth random colour images split into train/ and test/."""
    root = photo_folder(tmp_path_factory.mktemp("photos"), 48, 8, size=48)
    runs = {}
    for script, extra in [("01_vanilla_vae", []), ("03_lpips_frozen", ["--lpips-random-backbone"])]:
        out = root.parent / f"{root.name}-{script}"
        result = run_cli(script, "--dataset", "folder", "--data-dir", root, "--image-size", "32", "--batch-size", "16",
                         "--max-steps", "12", "--log-every", "4", *extra, "--out", out)
        assert result.returncode == 0, result.stderr[-2000:]
        runs[script] = out
    return runs


@pytest.mark.slow
def test_photo_folders_get_a_spatial_latent(photo_runs):
    config = json.loads((photo_runs["01_vanilla_vae"] / "config.json").read_text())
    assert config["args"]["latent"] == "spatial" and config["args"]["latent_dim"] == 4
    assert config["args"]["decoder_std"] == 0.1  # photos' default: detail priced near the errors' sigma
    summary = json.loads((photo_runs["01_vanilla_vae"] / "summary.json").read_text())
    assert len(summary["kl_per_dim"]) == 4  # one per channel of the code map
    assert summary["test_kl"] == pytest.approx(sum(summary["kl_per_dim"]), rel=1e-5)


@pytest.mark.slow
def test_ladder_scores_match_each_runs_summary(photo_runs, tmp_path):
    figure = tmp_path / "ladder.png"
    result = run_cli("tools.ladder", photo_runs["01_vanilla_vae"], photo_runs["03_lpips_frozen"], "--out", figure,
                     "--lpips-random-backbone", "--show", "0", "3")
    assert result.returncode == 0, result.stderr[-2000:]
    from PIL import Image
    with Image.open(figure) as img:  # 2 shown + 2 enlarged columns: (1.3 x 4 + 2.4) inches at 110 dpi
        assert img.size[0] == round(110 * (1.3 * 4 + 2.4))
    lines = [line for line in result.stdout.splitlines() if "PSNR" in line]
    assert len(lines) == 2
    for line, script in zip(lines, ["01_vanilla_vae", "03_lpips_frozen"]):
        summary = json.loads((photo_runs[script] / "summary.json").read_text())
        psnr, lpips_value, spectrum = map(float, re.search(
            r"PSNR ([\d.]+) dB  LPIPS-alex ([-\d.]+)  spectrum error ([\d.]+)", line).groups())
        # Rebuilt from autoencoder.pt and scored by the tool: the same numbers the run reported.
        assert psnr == pytest.approx(summary["test_psnr_db"], abs=0.01)
        assert spectrum == pytest.approx(summary["spectrum_error"], abs=0.002)
        if "test_lpips" in summary:  # the same random backbone as the run's (seed 0)
            assert lpips_value == pytest.approx(summary["test_lpips"], abs=2e-4)


@pytest.mark.slow
def test_ladder_shows_the_test_images_asked_for(photo_runs, tmp_path, monkeypatch):
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor
    from tools import ladder
    drawn = {}
    monkeypatch.setattr(ladder, "draw", lambda path, rows, labels, picks, zoom, side: drawn.update(
        rows=rows, picks=picks, zoom=zoom))  # what the figure would be drawn from
    monkeypatch.setattr(sys, "argv", ["ladder", str(photo_runs["01_vanilla_vae"]), "--show", "5", "2",
                                      "--lpips-random-backbone", "--out", str(tmp_path / "unused.png")])
    ladder.main()
    args = json.loads((photo_runs["01_vanilla_vae"] / "config.json").read_text())["args"]
    files = sorted((ROOT / args["data_dir"] / "test").glob("*.png"))  # read here, not through common.load_data
    size = (args["image_size"], args["image_size"])
    by_hand = torch.stack([pil_to_tensor(Image.open(f).convert("RGB").resize(size)) / 255 for f in files])
    for column, asked in enumerate([5, 2]):
        shown = drawn["rows"][0][drawn["picks"][column]]  # the original drawn in that column
        nearest = (by_hand - shown).pow(2).flatten(1).sum(1).argmin().item()
        assert nearest == asked  # is the file asked for, in the order asked
    assert set(drawn["zoom"]) <= {5, 2}  # the 4x patches come from the images shown


@pytest.mark.slow
def test_ladder_refuses_runs_on_different_data(photo_runs, tmp_path):
    config = json.loads((photo_runs["01_vanilla_vae"] / "config.json").read_text())["args"]
    other = tmp_path / "smaller"  # the same photos at 16 px: other data
    assert run_cli("01_vanilla_vae", "--dataset", "folder", "--data-dir", config["data_dir"], "--image-size", "16",
                   "--batch-size", "16", "--max-steps", "2", "--out", other).returncode == 0
    result = run_cli("tools.ladder", photo_runs["01_vanilla_vae"], other)
    assert result.returncode == 2 and result.stderr.startswith("error:") and "different data" in result.stderr
    result = run_cli("tools.ladder", photo_runs["01_vanilla_vae"], "--show", "0", "40")  # the folder has 8 test images
    assert result.returncode == 2 and result.stderr.startswith("error:") and "numbered 0 to 7" in result.stderr


@pytest.mark.slow
def test_ladder_refuses_weights_its_arguments_do_not_describe(photo_runs, tmp_path):
    saved = torch.load(photo_runs["01_vanilla_vae"] / "autoencoder.pt", weights_only=True)
    saved["autoencoder"]["width"] *= 2  # a description its weights do not fit
    (tmp_path / "changed").mkdir()
    torch.save(saved, tmp_path / "changed" / "autoencoder.pt")
    shutil.copy(photo_runs["01_vanilla_vae"] / "config.json", tmp_path / "changed")
    result = run_cli("tools.ladder", tmp_path / "changed")
    assert result.returncode == 2 and result.stderr.startswith("error:") and "does not fit" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_zoomed_patch_is_where_the_detail_is():
    from tools.ladder import busiest_patch
    image = torch.zeros(3, 64, 64)
    image[:, 40:52, 8:20] = torch.rand(3, 12, 12, generator=torch.Generator().manual_seed(0))  # texture in one place
    top, left = busiest_patch(image, 16)
    assert top <= 40 and 52 <= top + 16 and left <= 8 and 20 <= left + 16


@pytest.mark.parametrize("h, w", [(512, 512), (172, 448), (1411, 1411), (660, 550)])
def test_photo_tiles_never_trains_on_a_test_pixel(h, w):
    from tools.photo_tiles import crop_boxes
    boxes = crop_boxes(h, w, 125, 25, torch.Generator().manual_seed(0))
    seen = {split: torch.zeros(h, w, dtype=torch.bool) for split in ("train", "test")}  # pixels each split covers
    for split, top, left, side in boxes:
        assert top >= 0 and left >= 0 and top + side <= h and left + side <= w  # inside the photo
        assert min(h, w) // 4 <= side <= min(h, w) // 3
        seen[split][top:top + side, left:left + side] = True
    assert [split for split, *_ in boxes].count("test") == 25 and len(boxes) == 150
    assert not (seen["train"] & seen["test"]).any()
    assert seen["test"][:, : w - min(h, w) // 3].sum() == 0  # test crops come from the right-hand strip only


def test_photo_tiles_will_not_mix_a_new_split_with_old_crops(tmp_path):
    old = photo_folder(tmp_path / "tiles", 2, 1, size=8)  # a folder that already holds train/ and test/ crops
    before = sorted(p.name for p in old.rglob("*.png"))
    result = run_cli("tools.photo_tiles", old)
    assert result.returncode == 2
    assert_clean_error(result.stderr, "already holds crops", str(old))
    assert sorted(p.name for p in old.rglob("*.png")) == before  # nothing added or removed
