"""01_vanilla_vae.py: its ELBO pieces against torch.distributions, its schedules at their edges, a short real run, its
metrics rows, the collapse warning, bad input, checkpoints, resume, divergence."""
import json
import math

import pytest
import torch
from torch.distributions import Bernoulli, Normal

import common
from conftest import QUICK, assert_clean_error, assert_rejected, load_script, read_rows, run_cli
from tools.position_code import run_codes

CONTRACT_FILES = ["config.json", "metrics.csv", "summary.json", "recon.png", "samples.png",
                  "interpolation.png", "curves.png", "checkpoint.pt"]
SUMMARY_KEYS = ["script", "dataset", "image_size", "latent_dim", "device", "steps", "epochs", "wall_s",
                "train_images_per_s", "test_recon", "test_kl", "test_mse", "test_psnr_db", "active_units",
                "kl_per_dim", "hf_power_ratio", "spectrum_error", "test_kl_offset",
                "test_neg_elbo", "informative_dims"]
RUN = QUICK + ["--max-steps", "200"]


# ----------------------------------------------------------------------------- the ELBO's pieces
def test_bce_recon_is_bernoulli_negative_log_likelihood(vae01):
    torch.manual_seed(0)
    raw, x = torch.randn(4, 1, 32, 32) * 3, torch.rand(4, 1, 32, 32).round()
    expected = -Bernoulli(logits=raw).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(vae01.recon_loss(raw, x, common.VAE(1, 32, 4, 8, recon="bce"), 1.0), expected)


@pytest.mark.parametrize("std", [math.sqrt(0.5), 0.12])
def test_mse_recon_is_gaussian_nll_minus_its_constant(vae01, std):
    torch.manual_seed(0)
    raw, x = torch.randn(4, 3, 32, 32), torch.rand(4, 3, 32, 32) * 2 - 1
    nll = -Normal(torch.tanh(raw), std).log_prob(x).flatten(1).sum(1)
    constant = x[0].numel() * math.log(std * math.sqrt(2 * math.pi))  # the part the training loss drops
    torch.testing.assert_close(vae01.recon_loss(raw, x, common.VAE(3, 32, 4, 8), std) + constant, nll)
    sd = common.VAE(3, 32, 4, 32, spatial=True, arch="sd")  # Stable Diffusion's decoder: its mean is raw, no tanh
    torch.testing.assert_close(vae01.recon_loss(raw, x, sd, std), -Normal(raw, std).log_prob(x).flatten(1).sum(1)
                               - constant)
    if std ** 2 == pytest.approx(0.5):  # variance 1/2: every pixel adds (x - m)^2 + log(pi) / 2 > 0
        assert constant == pytest.approx(0.5 * x[0].numel() * math.log(math.pi))


@pytest.mark.parametrize("step,expected", [(0, 0.0), (250, 0.5), (500, 1.0), (501, 1.0), (10_000, 1.0)])
def test_linear_warmup_edges(vae01, step, expected):
    assert vae01.kl_weight(step, 2.0, 500, 0) == pytest.approx(2.0 * expected)


@pytest.mark.parametrize("step,expected", [(0, 0.0), (125, 0.5), (250, 1.0), (499, 1.0), (500, 0.0),
                                           (625, 0.5), (999, 1.0)])
def test_cyclical_annealing_edges(vae01, step, expected):
    # cycles of 500 steps: each ramps over its first 250 steps, then holds
    assert vae01.kl_weight(step, 1.0, 0, 500) == pytest.approx(expected)


def test_no_schedule_is_constant_beta(vae01):
    assert {vae01.kl_weight(s, 0.7, 0, 0) for s in (0, 50, 99)} == {0.7}


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


@pytest.mark.slow
def test_short_run_learns_to_use_z_and_writes_contract_files(quick_run):
    out, result = quick_run
    for name in CONTRACT_FILES:
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    assert set(SUMMARY_KEYS) <= set(summary) and summary["steps"] == 200
    # Independent baseline: the best a decoder that ignores z can do is the per-pixel mean image.
    _, test, _ = common.make_shapes(50_000, 5_000, 32)
    x = common.to_model_range(test)
    mean_image_sse = (x - x.mean(0)).pow(2).flatten(1).sum(1).mean().item()  # ~125 at 32 px
    # Measured over seeds 0-2: test_recon 33-37, 10/10 active units, PSNR 21.3 dB. Slack for other machines.
    assert summary["test_recon"] < 0.5 * mean_image_sse
    assert summary["active_units"] >= 3 and summary["test_psnr_db"] > 18
    assert summary["test_neg_elbo"] == pytest.approx(
        summary["test_recon"] + summary["test_kl"] + 0.5 * 32 * 32 * math.log(math.pi))
    # The decoder std that fits the test error, and the beta that the run's std amounts to there.
    assert summary["decoder_std_fit"] == pytest.approx(math.sqrt(summary["test_recon"] / (32 * 32)))  # sigma^2 = 1/2
    assert summary["effective_beta"] == pytest.approx(0.5 / summary["decoder_std_fit"] ** 2)
    mu, factors = run_codes(out)  # autoencoder.pt's codes of the whole test set reproduce the run's test KL split
    assert summary["eval_images"] == min(5000, 200 * 64 // 4)  # sized to the run: a quarter of the images trained on
    mu = mu[:summary["eval_images"]].double()
    assert summary["test_kl_offset"] == pytest.approx(0.5 * mu.mean(0).pow(2).sum().item(), rel=1e-3, abs=1e-6)
    rows = read_rows(out / "metrics.csv")
    assert [r["step"] for r in rows] == list(range(20, 201, 20))
    assert {"step", "epoch", "loss", "recon", "kl", "kl_offset", "beta", "images_per_s"} <= set(rows[0])
    assert rows[-1]["recon"] < 0.5 * rows[0]["recon"]
    config = json.loads((out / "config.json").read_text())
    assert config["args"]["max_steps"] == 200 and "torch" in config["versions"]


@pytest.mark.slow
@pytest.mark.parametrize("beta,collapses", [(50, True), (1, False)])
def test_collapse_warning_names_collapse_and_only_collapse(tmp_path, beta, collapses):
    # beta = 50 prices each nat of information above what it saves: the code carries almost nothing,
    # even though a lenient count (Var(mu) > 0.01) would still call every dim active.
    result = run_cli("01_vanilla_vae", "--max-steps", "300", "--beta", beta, "--out", tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["test_kl"] < 1.0) == collapses
    assert summary["informative_dims"] == sum(kl > 0.1 for kl in summary["kl_per_dim"])
    assert ("posterior collapse" in result.stdout and "--free-bits" in result.stdout) == collapses


# ----------------------------------------------------------------------------- rows, and runs too short to judge
def test_a_row_is_the_mean_of_its_steps(tmp_path, vae01):
    # the same 6 steps logged every step and every 3 steps: a 3-step row is the mean of the three 1-step rows
    for every in (1, 3):
        vae01.main([*QUICK, "--max-steps", "6", "--log-every", str(every), "--out", str(tmp_path / str(every))])
    single, triple = read_rows(tmp_path / "1" / "metrics.csv"), read_rows(tmp_path / "3" / "metrics.csv")
    assert [r["step"] for r in triple] == [3, 6]
    for k in ["loss", "recon", "kl", "kl_offset", "info_bound", "beta", "kl_dim_0"]:
        for row, steps in zip(triple, (single[:3], single[3:])):
            assert row[k] == pytest.approx(sum(r[k] for r in steps) / 3, rel=1e-4, abs=1e-7), k


def test_a_run_too_short_to_judge_collapse_says_so_and_does_not_warn(tmp_path):
    result = run_cli("01_vanilla_vae", *QUICK, "--max-steps", "20", "--out", tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["test_kl"] < 1.0  # a collapse by the warning's rule, but 20 steps cannot tell
    assert "too short to judge posterior collapse" in result.stdout and "warning" not in result.stdout
    assert summary["eval_images"] == 320  # a quarter of the 1,280 images trained on


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("args,fragment", [
    (["--epochs", "-1"], "--epochs: must be at least 1, got -1"),
    (["--decoder-std", "0"], "--decoder-std: must be above 0.0"),
    (["--decoder-std", "nan"], "--decoder-std: must be above 0.0, got nan"),  # nan < 0 is False: it passes ranges
    (["--beta", "inf"], "--beta: must be at least 0.0, got inf"),
    (["--lr", "nan"], "--lr: must be above 0.0, got nan"),
    (["--free-bits=-inf"], "--free-bits: must be at least 0.0"),
    (["--batch-size", "x"], "--batch-size: not a number: x"),
    (["--max-step", "10"], "unrecognized arguments: --max-step"),  # no abbreviations: --resume would ignore them
    (["--recon", "l1"], "invalid choice"),
    (["--dataset", "folder", "--data-dir", "/nonexistent/images"], "/nonexistent/images"),
    (["--data-dir", "data"], "shapes is drawn by code"),
    (["--resume", "/nonexistent/checkpoint.pt"], "cannot read /nonexistent/checkpoint.pt"),
    (["--kl-warmup-steps", "100", "--kl-cycle-steps", "200"], "choose one annealing schedule"),
    (["--train", "decoder"], "--init-from"),
    (["--ema", "1"], "--ema is a decay"),
    (["--init-from", "/nonexistent/autoencoder.pt"], "cannot read /nonexistent/autoencoder.pt"),
    (["--latent", "spatial", "--arch", "sd", "--width", "48"], "multiple of 32"),
    (["--latent", "vector", "--arch", "sd"], "code map"),
])
def test_bad_input_exits_2_with_one_error_line(tmp_path, args, fragment):
    assert_rejected("01_vanilla_vae", *args, "--out", tmp_path / "out", mentions=fragment)
    assert not (tmp_path / "out").exists()  # a run that cannot start leaves no folder behind


def test_empty_folder_exits_2(tmp_path, vae01, capsys):
    (tmp_path / "images").mkdir()
    with pytest.raises(SystemExit) as e:
        vae01.main(["--dataset", "folder", "--data-dir", str(tmp_path / "images"), "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    assert not (tmp_path / "o").exists()
    assert_clean_error(capsys.readouterr().err, "found 0 readable images")


# ----------------------------------------------------------------------------- checkpoints, resume, divergence
def test_a_save_that_dies_midway_leaves_the_last_checkpoint_whole(tmp_path, vae01, monkeypatch):
    real_save, saves = torch.save, []

    def crash_on_the_second(obj, f):  # the second checkpoint dies after writing part of its file
        saves.append(f)
        if len(saves) == 2:
            open(f, "wb").write(b"half a checkpoint")
            raise OSError("disk full")
        real_save(obj, f)
    monkeypatch.setattr(torch, "save", crash_on_the_second)
    with pytest.raises(OSError):
        vae01.main([*QUICK, "--max-steps", "6", "--checkpoint-every", "3", "--out", str(tmp_path)])
    monkeypatch.setattr(torch, "save", real_save)
    assert common.load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 3  # the first, whole


def test_resume_refuses_another_model_and_keeps_the_run(tmp_path, vae01, capsys):
    vae01.main([*QUICK, "--max-steps", "2", "--out", str(tmp_path)])
    config, before = (tmp_path / "config.json").read_text(), (tmp_path / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # --width changes every layer: the saved weights cannot load
        vae01.main(["--resume", str(tmp_path / "checkpoint.pt"), "--width", "16", "--max-steps", "4"])
    assert e.value.code == 2
    assert_clean_error(capsys.readouterr().err, "does not fit this model", "size mismatch")
    assert (tmp_path / "config.json").read_text() == config and (tmp_path / "checkpoint.pt").read_bytes() == before
    with pytest.raises(SystemExit) as e:  # a checkpoint of another chapter
        load_script("02_burgess_capacity").main(["--resume", str(tmp_path / "checkpoint.pt")])
    assert e.value.code == 2
    assert_clean_error(capsys.readouterr().err, "written by 01_vanilla_vae.py, not 02_burgess_capacity.py")



@pytest.mark.slow
def test_resumed_run_matches_an_uninterrupted_one(quick_run, tmp_path):
    out = tmp_path / "two_legs"
    result = run_cli("01_vanilla_vae", *QUICK, "--max-steps", "100", "--out", out)  # stops at step 100
    assert result.returncode == 0, result.stderr[-2000:]
    result = run_cli("01_vanilla_vae", "--resume", out / "checkpoint.pt", "--max-steps", "200")
    assert result.returncode == 0, result.stderr[-2000:]
    resumed = json.loads((out / "summary.json").read_text())
    reference = json.loads((quick_run[0] / "summary.json").read_text())
    for key in ["test_recon", "test_kl", "test_mse", "active_units", "kl_per_dim", "spectrum_error", "steps"]:
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

    def poisoned(raw, x, model, decoder_std):  # a non-finite loss from step 46 of the resumed run on
        calls["n"] += 1
        loss = real_recon_loss(raw, x, model, decoder_std)
        return loss * float("nan") if calls["n"] > 5 else loss
    monkeypatch.setattr(vae01, "recon_loss", poisoned)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        vae01.main(["--resume", str(out / "checkpoint.pt"), "--max-steps", "100"])
    assert e.value.code == 3
    assert "diverged at step 60" in capsys.readouterr().err
    assert (out / "checkpoint.pt").read_bytes() == before
    assert common.load_checkpoint(out / "checkpoint.pt")["step"] == 40
