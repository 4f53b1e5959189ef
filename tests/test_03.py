"""03_lpips_frozen.py: LPIPS frozen whole (no gradient, not in the optimizer, weights unchanged,
never negative), the unfrozen incident detected, the loss against a hand computation, and a run without any backbone
file (the loading order: test_lpips_weights.py)."""
import json
import re

import pytest
import torch

import common
from conftest import QUICK, assert_clean_error, assert_rejected, load_script, read_rows, run_cli
from tools.lpips_weights import load_lpips


@pytest.fixture(scope="module")
def lp03():
    return load_script("03_lpips_frozen")


@pytest.fixture(scope="module")
def perceptual(lp03):
    return load_lpips("alex", random_backbone=True, device=torch.device("cpu"))[0].eval().requires_grad_(False)


def test_lpips_as_built_leaves_its_lin_heads_trainable():
    # the trap 03 closes: lpips.LPIPS freezes its backbone only
    built = load_lpips("alex", random_backbone=True, device=torch.device("cpu"))[0]
    assert not any(p.requires_grad for p in built.net.parameters())
    assert all(p.requires_grad for p in built.lins.parameters())


def test_no_gradient_reaches_lpips(lp03, perceptual):
    assert sum(p.numel() for p in perceptual.lins.parameters()) == 1152  # the heads lpips leaves trainable
    reconstruction = torch.rand(4, 1, 32, 32, requires_grad=True)
    x = torch.rand(4, 1, 32, 32) * 2 - 1
    assert not perceptual.training  # a fixed metric: eval mode, so the lin heads' dropout is off
    perceptual.train()  # even if something switches it to train mode, nothing in it may learn
    common.lpips_distance(perceptual, torch.tanh(reconstruction), x).sum().backward()
    assert reconstruction.grad is not None and reconstruction.grad.abs().sum() > 0  # the decoder does learn
    assert all(p.grad is None and not p.requires_grad for p in perceptual.parameters())
    perceptual.eval()


def test_lpips_distance_handles_grey_and_small_images(lp03, perceptual):
    x = torch.rand(3, 1, 16, 16) * 2 - 1  # 16 px would fail AlexNet's pooling without enlarging
    assert torch.allclose(common.lpips_distance(perceptual, x, x), torch.zeros(3), atol=1e-6)
    y = (x + 0.5 * torch.randn_like(x)).clamp(-1, 1)
    d = common.lpips_distance(perceptual, y, x)
    assert d.shape == (3,) and (d > 0).all()


@pytest.fixture(scope="module")
def frozen_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run03")
    result = run_cli("03_lpips_frozen", *QUICK, "--lpips-random-backbone", "--max-steps", "150",
                     "--capacity-steps", "100", "--capacity-max", "10", "--log-every", "1", "--decoder-std", "0.5",
                     "--out", out)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "RANDOM backbone" in result.stdout  # said plainly
    return out


@pytest.mark.slow
def test_frozen_run_leaves_lpips_untouched(frozen_run, perceptual):
    summary = json.loads((frozen_run / "summary.json").read_text())
    assert summary["lpips_trainable_params"] == 0 and summary["lpips_backbone"] == "random"
    assert summary["lpips_incident_step"] is None
    checkpoint = common.load_checkpoint(frozen_run / "checkpoint.pt")
    # The optimizer holds exactly the VAE's parameters, none of LPIPS's.
    vae = common.VAE(1, 32, 10, 32, "mse", channel_mean=torch.zeros(1), centre_mu=True)
    assert len(checkpoint["optimizer"]["param_groups"][0]["params"]) == len(list(vae.parameters()))
    # The lin heads after 150 steps are the ones the lpips package ships.
    for name, value in perceptual.lins.state_dict().items():
        assert torch.equal(checkpoint["lpips_lins"][name], value), name
    rows = read_rows(frozen_run / "metrics.csv")
    assert min(r["lpips"] for r in rows) >= 0 and min(r["lpips_lin_min"] for r in rows) >= 0
    assert rows[-1]["lpips"] < rows[0]["lpips"]  # and the decoder does learn to lower it


@pytest.mark.slow
def test_logged_loss_adds_scaled_lpips(frozen_run):
    # One step per row: loss = recon + lpips_weight * (C*H*W) * LPIPS / (2 sigma^2) + gamma * |KL - C|,
    # recon already divided by 2 sigma^2 (sigma 0.5 here): LPIPS is priced like squared error.
    rows = read_rows(frozen_run / "metrics.csv")
    for r in rows:
        expected = r["recon"] + 1.0 * 32 * 32 * r["lpips"] / (2 * 0.5 ** 2) + 100 * abs(r["kl"] - r["capacity"])
        assert r["loss"] == pytest.approx(expected, rel=1e-4, abs=1e-3)


@pytest.mark.slow
def test_unfrozen_lpips_incident_is_detected(tmp_path):
    result = run_cli("03_lpips_frozen", *QUICK, "--lpips-random-backbone", "--unfreeze-lpips", "--max-steps", "150",
                     "--capacity-steps", "100", "--capacity-max", "10", "--out", tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["lpips_trainable_params"] == 1152
    # The released heads have weights of exactly 0, so Adam's first step takes some below zero.
    assert summary["lpips_incident_step"] == 1 and "LPIPS INCIDENT at step 1: a lin weight went below zero" in \
        result.stdout
    # Measured (seed 0, 32 px, CPU): an image's LPIPS first went below zero at step 61; 2x slack.
    step = int(re.search(r"LPIPS INCIDENT at step (\d+): an image's LPIPS went below zero", result.stdout).group(1))
    assert 1 < step <= 120
    rows = read_rows(tmp_path / "metrics.csv")
    assert rows[-1]["lpips_lin_min"] < 0


def test_a_run_without_the_backbone_leaves_no_folder(lp03, offline_home, capsys):
    with pytest.raises(SystemExit) as stop:
        lp03.main([*QUICK, "--max-steps", "5", "--out", str(offline_home / "run")])
    assert stop.value.code == 2
    assert_clean_error(capsys.readouterr().err, "alexnet-owt-7be5be79.pth", "python -m tools.lpips_weights")
    assert not (offline_home / "run").exists()


def test_bad_lpips_flags_exit_2(tmp_path):
    assert_rejected("03_lpips_frozen", "--lpips-weight", "-1", "--out", tmp_path, mentions="--lpips-weight")
    assert_rejected("03_lpips_frozen", "--lpips-net", "resnet", "--out", tmp_path, mentions="--lpips-net")
