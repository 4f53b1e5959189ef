"""01_vanilla_vae.py: its ELBO pieces against torch.distributions, its schedules at their edges,
a short real run, bad input, interruption and resume, divergence."""
import json
import math
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch.distributions import Bernoulli, Normal

import common
from conftest import QUICK, ROOT, assert_clean_error, checkpoint_codes, read_rows, run_cli

CONTRACT_FILES = ["config.json", "metrics.csv", "summary.json", "recon.png", "samples.png",
                  "interpolation.png", "curves.png", "checkpoint.pt"]
SUMMARY_KEYS = ["script", "dataset", "image_size", "latent_dim", "device", "steps", "epochs", "wall_s",
                "train_images_per_s", "test_recon", "test_kl", "test_mse", "test_psnr_db", "active_units",
                "kl_per_dim", "sharpness", "test_neg_elbo"]
RUN = QUICK + ["--max-steps", "200"]


# ----------------------------------------------------------------------------- the ELBO's pieces
def test_bce_recon_is_bernoulli_negative_log_likelihood(vae01):
    torch.manual_seed(0)
    raw, x = torch.randn(4, 1, 8, 8) * 3, torch.rand(4, 1, 8, 8).round()
    expected = -Bernoulli(logits=raw).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(vae01.recon_loss(raw, x, "bce"), expected)


def test_mse_recon_is_gaussian_nll_with_variance_one_half_minus_constant(vae01):
    torch.manual_seed(0)
    raw, x = torch.randn(4, 3, 8, 8), torch.rand(4, 3, 8, 8) * 2 - 1
    nll = -Normal(torch.tanh(raw), math.sqrt(0.5)).log_prob(x).flatten(1).sum(1)
    constant = 0.5 * x[0].numel() * math.log(math.pi)  # the part the training loss drops
    torch.testing.assert_close(vae01.recon_loss(raw, x, "mse") + constant, nll)


@pytest.mark.parametrize("step,expected", [(0, 0.0), (250, 0.5), (500, 1.0), (501, 1.0), (10_000, 1.0)])
def test_linear_warmup_edges(vae01, step, expected):
    assert vae01.kl_weight(step, 2.0, 500, 0, 10_000) == pytest.approx(2.0 * expected)


@pytest.mark.parametrize("step,expected", [(0, 0.0), (125, 0.5), (250, 1.0), (499, 1.0), (500, 0.0),
                                           (625, 0.5), (999, 1.0)])
def test_cyclical_annealing_edges(vae01, step, expected):
    # 2 cycles over 1000 steps: each period of 500 ramps over its first 250 steps, then holds
    assert vae01.kl_weight(step, 1.0, 0, 2, 1000) == pytest.approx(expected)


def test_no_schedule_is_constant_beta(vae01):
    assert {vae01.kl_weight(s, 0.7, 0, 0, 100) for s in (0, 50, 99)} == {0.7}


def test_free_bits_floor_and_gradient(vae01):
    kl = torch.tensor([0.1, 0.6, 2.0], requires_grad=True)
    penalty = vae01.kl_penalty(kl, free_bits=0.5)
    assert penalty.item() == pytest.approx(0.5 + 0.6 + 2.0)
    penalty.backward()
    assert kl.grad.tolist() == [0.0, 1.0, 1.0]  # below the floor a dim is not pushed back
    assert vae01.kl_penalty(kl.detach(), 0.0).item() == pytest.approx(2.7)


# ----------------------------------------------------------------------------- a short real run
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run01")
    result = run_cli("01_vanilla_vae", *RUN, "--out", out)
    assert result.returncode == 0, result.stderr[-2000:]
    return out, result


def test_short_run_learns_to_use_z_and_writes_contract_files(quick_run):
    out, result = quick_run
    for name in CONTRACT_FILES:
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    assert set(SUMMARY_KEYS) <= set(summary) and summary["steps"] == 200
    # Independent baseline: the best a decoder that ignores z can do is the per-pixel mean image.
    _, test, _ = common.make_shapes(50_000, 5_000, 32, seed=1234)
    x = common.to_model_range(test)
    mean_image_sse = (x - x.mean(0)).pow(2).flatten(1).sum(1).mean().item()  # ~125 at 32 px
    # Measured over seeds 0-2: test_recon 33-37, 10/10 active units, PSNR 21.3 dB. Slack for other machines.
    assert summary["test_recon"] < 0.5 * mean_image_sse
    assert summary["active_units"] >= 3 and summary["test_psnr_db"] > 18
    assert summary["test_neg_elbo"] == pytest.approx(
        summary["test_recon"] + summary["test_kl"] + 0.5 * 32 * 32 * math.log(math.pi))
    mu, factors = checkpoint_codes(out)  # MIG again, from the saved model's codes
    assert summary["mig"] == pytest.approx(common.mutual_information_gap(mu, factors)[0], abs=1e-6)
    assert set(summary["mig_per_factor"]) == set(common.SHAPE_FACTORS)
    rows = read_rows(out / "metrics.csv")
    assert [r["step"] for r in rows] == list(range(20, 201, 20))
    assert {"step", "epoch", "loss", "recon", "kl", "beta", "images_per_s"} <= set(rows[0])
    assert rows[-1]["recon"] < 0.5 * rows[0]["recon"]
    config = json.loads((out / "config.json").read_text())
    assert config["args"]["max_steps"] == 200 and "torch" in config["versions"]


def test_collapse_warning_names_the_remedies(tmp_path):
    # beta = 200 makes every nat of information cost more than it can save: the posterior collapses.
    result = run_cli("01_vanilla_vae", *QUICK, "--max-steps", "60", "--beta", "200", "--out", tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["active_units"] <= 1 and summary["test_kl"] < 1.0
    assert "posterior collapse" in result.stdout and "--free-bits" in result.stdout


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("args,fragment", [
    (["--epochs", "-1"], "--epochs must be at least 1"),
    (["--dataset", "folder", "--data-dir", "/nonexistent/images"], "/nonexistent/images"),
    (["--resume", "/nonexistent/checkpoint.pt"], "cannot read checkpoint"),
    (["--recon", "l1"], "invalid choice"),
    (["--kl-warmup-steps", "100", "--kl-cycles", "2"], "choose one annealing schedule"),
])
def test_bad_input_exits_2_with_one_error_line(tmp_path, args, fragment):
    result = run_cli("01_vanilla_vae", *args, "--out", tmp_path / "out")
    assert result.returncode == 2
    assert_clean_error(result.stderr, fragment)
    assert not (tmp_path / "out").exists()  # a run that cannot start leaves no folder behind


def test_empty_folder_exits_2(tmp_path, vae01, capsys):
    (tmp_path / "images").mkdir()
    with pytest.raises(SystemExit) as e:
        vae01.main(["--dataset", "folder", "--data-dir", str(tmp_path / "images"), "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    assert not (tmp_path / "o").exists()
    assert_clean_error(capsys.readouterr().err, "found 0 readable images")


# ----------------------------------------------------------------------------- interruption, resume, divergence
def test_interrupted_then_resumed_run_matches_uninterrupted(quick_run, tmp_path):
    out = tmp_path / "interrupted"
    proc = subprocess.Popen([sys.executable, "01_vanilla_vae.py", *RUN, "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ((out / "metrics.csv").exists() and len(read_rows(out / "metrics.csv")) >= 3):
        assert proc.poll() is None and time.time() < deadline, "run ended before it could be interrupted"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, stdout
    stopped_at = common.load_checkpoint(out / "checkpoint.pt")["step"]
    assert 60 <= stopped_at < 200 and "--resume" in stdout

    result = run_cli("01_vanilla_vae", "--resume", out / "checkpoint.pt")
    assert result.returncode == 0, result.stderr[-2000:]
    resumed = json.loads((out / "summary.json").read_text())
    reference = json.loads((quick_run[0] / "summary.json").read_text())
    for key in ["test_recon", "test_kl", "test_mse", "active_units", "kl_per_dim", "sharpness", "steps"]:
        assert resumed[key] == pytest.approx(reference[key], rel=1e-6), key
    rows, reference_rows = read_rows(out / "metrics.csv"), read_rows(quick_run[0] / "metrics.csv")
    drop = ["images_per_s"]
    assert [{k: v for k, v in r.items() if k not in drop} for r in rows] == \
           [{k: v for k, v in r.items() if k not in drop} for r in reference_rows]


def test_non_finite_loss_exits_3_and_keeps_the_last_good_checkpoint(tmp_path, vae01, monkeypatch, capsys):
    out = tmp_path / "run"
    vae01.main([*QUICK, "--max-steps", "40", "--out", str(out)])
    before = (out / "checkpoint.pt").read_bytes()
    calls = {"n": 0}
    real_recon_loss = vae01.recon_loss

    def poisoned(raw, x, recon):  # a non-finite loss from step 45 of the resumed run on
        calls["n"] += 1
        loss = real_recon_loss(raw, x, recon)
        return loss * float("nan") if calls["n"] > 5 else loss
    monkeypatch.setattr(vae01, "recon_loss", poisoned)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        vae01.main(["--resume", str(out / "checkpoint.pt"), "--max-steps", "100"])
    assert e.value.code == 3
    assert "diverged at step 60" in capsys.readouterr().err
    assert (out / "checkpoint.pt").read_bytes() == before
    assert common.load_checkpoint(out / "checkpoint.pt")["step"] == 40
