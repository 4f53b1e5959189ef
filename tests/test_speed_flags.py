"""The flags a GPU user turns on first, checked on the CPU: --compile trains every chapter to eager's losses
(04's double backward through the adaptive weight included), and --amp runs bf16 autocast on the CPU too."""
import os

import pytest

from conftest import photo_folder, read_rows, run_cli

# every chapter: 01 with a code map; 02 and 03 with a code vector (02's centring BatchNorm, 03's LPIPS); 04 with
# both, and D and lambda from step 0 (the adaptive weight's extra backward passes)
CHAPTERS = [("01_vanilla_vae", []),
            ("02_burgess_capacity", ["--latent", "vector"]),
            ("03_lpips_frozen", ["--latent", "vector", "--lpips-random-backbone"]),
            ("04_vae_gan_warmup", ["--latent", "vector", "--lpips-random-backbone", "--disc-start", "0"]),
            pytest.param("01_vanilla_vae", ["--arch", "sd"], marks=pytest.mark.slow, id="01-sd")]  # SD's blocks


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return photo_folder(tmp_path_factory.mktemp("speed") / "photos", n_train=24, n_test=8, size=16)


@pytest.mark.slow
@pytest.mark.parametrize("script, extra", CHAPTERS, ids=["01", "02", "03", "04", "01-sd"])
def test_compile_trains_to_eagers_losses(photos, tmp_path, script, extra):
    flags = ["--dataset", "folder", "--data-dir", photos, "--image-size", "16", "--batch-size", "8",
             "--max-steps", "3", "--log-every", "1", *extra]
    rows, kernels = {}, tmp_path / "inductor"  # where the compiled run's generated kernels go
    for mode in ("eager", "compiled"):
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(kernels / mode))
        result = run_cli(script, *flags, *(["--compile"] if mode == "compiled" else []), "--out", tmp_path / mode,
                         env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        rows[mode] = read_rows(tmp_path / mode / "metrics.csv")
    assert any((kernels / "compiled").rglob("*.py")) and not any((kernels / "eager").rglob("*.py"))  # inductor ran
    assert len(rows["compiled"]) == 3
    columns = ["loss", "recon", "kl"] + (["d_loss", "adv_weight"] if script.startswith("04") else [])
    for eager, compiled in zip(rows["eager"], rows["compiled"]):  # fused kernels round differently: 0.1% after 3 steps
        for c in columns:  # (lambda, a quotient of two gradient norms, 1%)
            assert compiled[c] == pytest.approx(eager[c], rel=1e-2 if c == "adv_weight" else 1e-3, abs=1e-6), c
    assert rows["compiled"][-1]["d_loss" if script.startswith("04") else "loss"] > 0


def test_amp_runs_bf16_autocast_on_the_cpu(photos, tmp_path):
    flags = ["--dataset", "folder", "--data-dir", photos, "--image-size", "16", "--batch-size", "8", "--max-steps", "3",
             "--log-every", "1"]
    rows = {}
    for amp in (False, True):
        out = tmp_path / str(amp)
        result = run_cli("01_vanilla_vae", *flags, *(["--amp"] if amp else []), "--out", out)
        assert result.returncode == 0, result.stderr[-3000:]
        rows[amp] = read_rows(out / "metrics.csv")
    for fp32, bf16 in zip(rows[False], rows[True]):  # bf16 keeps 8 bits of mantissa: about 2 digits
        assert bf16["loss"] == pytest.approx(fp32["loss"], rel=3e-2) and bf16["loss"] != fp32["loss"]
