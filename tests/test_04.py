"""04_vae_gan_warmup.py: the adaptive weight against two separate backward passes, the warm-up gate, hinge values,
spectral norm by default, the collapse monitor on synthetic series and on a real spike, warnings and D's start kept
across a resume, the L1 pixel loss, and a short run that leaves every contract file."""
import json
import os

import pytest
import torch
import torch.nn as nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

import common
from conftest import QUICK, assert_rejected, load_script, read_rows, run_cli


@pytest.fixture(scope="module")
def gan04():
    return load_script("04_vae_gan_warmup")


def test_adaptive_weight_matches_two_separate_backward_passes(gan04):
    torch.manual_seed(0)
    model = common.VAE(1, 32, 4, 8, "mse")
    disc = gan04.PatchDiscriminator(1, 8)
    x = torch.rand(6, 1, 32, 32) * 2 - 1
    mu, logvar = model.encoder(x)
    raw = model.decoder(mu + torch.exp(0.5 * logvar) * torch.randn_like(mu))
    rec = (torch.tanh(raw) - x).pow(2).flatten(1).sum(1).mean()
    adv = -disc(torch.tanh(raw)).mean()
    weight, clamped = gan04.adaptive_weight(rec, adv, model.decoder.conv_out.weight, disc_weight=0.5)
    # Independent: two ordinary backward passes, reading .grad of the last layer each time.
    last = model.decoder.conv_out.weight
    model.zero_grad()
    rec.backward(retain_graph=True)
    g_rec = last.grad.clone()
    model.zero_grad()
    adv.backward()
    g_adv = last.grad.clone()
    expected = (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0, 1e4) * 0.5
    assert weight.item() == pytest.approx(expected.item(), rel=1e-5) and not clamped
    assert not weight.requires_grad  # detached: lambda itself is not trained
    # The point of lambda: the weighted adversarial gradient at W is disc_weight times the reconstruction's,
    # less the little that the 1e-4 in the denominator takes when ||g_adv|| is small.
    ratio = (weight * g_adv.norm() / g_rec.norm()).item()
    assert ratio <= 0.5 and ratio == pytest.approx(0.5 * g_adv.norm().item() / (g_adv.norm().item() + 1e-4), rel=1e-4)


def test_adaptive_weight_is_clamped_and_says_so(gan04):
    w = torch.ones(3, requires_grad=True)
    weight, clamped = gan04.adaptive_weight((w * 1e6).sum(), (w * 0.0).sum(), w, disc_weight=0.5)
    assert weight.item() == 0.5e4 and clamped
    weight, clamped = gan04.adaptive_weight((w * 3.0).sum(), (w * 1.0).sum(), w, disc_weight=0.5)
    assert weight.item() == pytest.approx(0.5 * 3 / (1 + 1e-4 / 3 ** 0.5)) and not clamped


def test_hinge_loss_on_known_logits(gan04):
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    # real: relu(1-2)=0, relu(0.5)=0.5, relu(2)=2 -> mean 5/6; fake: relu(-1)=0, relu(1)=1, relu(2)=2 -> mean 1
    assert gan04.hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 1.0))


def test_spectral_norm_on_by_default(gan04):
    convs = [m for m in gan04.PatchDiscriminator(3, 8).modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 4 and all(nn.utils.parametrize.is_parametrized(c, "weight") for c in convs)
    plain = [m for m in gan04.PatchDiscriminator(3, 8, spectral_norm=False).modules() if isinstance(m, nn.Conv2d)]
    assert not any(nn.utils.parametrize.is_parametrized(c, "weight") for c in plain)
    assert gan04.PatchDiscriminator(3, 8)(torch.zeros(2, 3, 64, 64)).shape == (2, 1, 7, 7)  # a logit per patch


def _rows(recon, norm=None, peak=None, every=50):
    """Metrics rows: recon, the decoder's gradient norm (the row's mean) and its largest single step."""
    norm = norm or [30.0] * len(recon)
    peak = peak or [2 * n for n in norm]  # a healthy row's largest step: about twice its mean
    return [{"step": every * (i + 1), "recon": recon[i], "dec_grad_norm": norm[i], "dec_grad_norm_max": peak[i],
             "adv_rec_grad_ratio": 0.0} for i in range(len(recon))]


def test_collapse_monitor_fires_on_spike_and_rebound(gan04):
    flat = _rows([100.0] * 20)
    for i in range(2, 21):
        assert gan04.collapse_symptoms(flat[:i], disc_start_step=500) == {}  # quiet on a flat series
    spike = _rows([100.0] * 20, norm=[30.0] * 19 + [600.0], peak=[60.0] * 19 + [600.0])
    assert set(gan04.collapse_symptoms(spike, disc_start_step=0)) == {"gradient spike"}
    assert gan04.collapse_symptoms(spike, disc_start_step=1000) == {}  # the same spike before D acts: not D's doing
    rebound = _rows([100.0] * 10 + [120.0, 160.0])
    assert gan04.collapse_symptoms(rebound[:11], disc_start_step=500) == {}  # +20%: not yet
    assert set(gan04.collapse_symptoms(rebound, disc_start_step=500)) == {"recon rebound"}
    # D on from step 0 (the unguarded demo): measured against recon's best since the start.
    early = _rows([500.0, 300.0, 250.0, 400.0])
    assert set(gan04.collapse_symptoms(early, disc_start_step=0)) == {"recon rebound"}
    assert gan04.collapse_symptoms(early[:3], disc_start_step=0) == {}
    rising = _rows([100.0] * 8, norm=[10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0, 1280.0], peak=[1.0] * 8)
    assert gan04.collapse_symptoms(rising[:7], disc_start_step=0) == {}  # read from the row's peak, not its mean
    rebound_before_d = _rows([100.0] * 10 + [160.0])  # rows up to step 550
    assert gan04.collapse_symptoms(rebound_before_d, disc_start_step=1000) == {}  # before D: not a GAN symptom


def test_a_single_step_spike_is_seen(gan04, tmp_path, monkeypatch):
    # One step's decoder gradient norm at 50x the others, injected where 04 measures it: the row's mean dilutes it over
    # the row's 10 steps, its peak does not, and the monitor warns of a spike on that row and on no other.
    real_clip, calls = torch.nn.utils.clip_grad_norm_, []

    def clip_and_spike(params, max_norm):
        calls.append(real_clip(params, max_norm))
        return calls[-1] * 50 if len(calls) == 25 else calls[-1]
    monkeypatch.setattr(gan04.nn.utils, "clip_grad_norm_", clip_and_spike)
    gan04.main([*QUICK, "--lpips-random-backbone", "--max-steps", "40", "--disc-start", "0", "--log-every", "10",
                "--out", str(tmp_path)])
    rows = read_rows(tmp_path / "metrics.csv")
    assert rows[2]["dec_grad_norm_max"] == pytest.approx(50 * calls[24].item(), rel=1e-5)  # step 25, in row 30
    assert rows[2]["dec_grad_norm"] < rows[2]["dec_grad_norm_max"] / 5  # the mean: a tenth of it, plus the rest
    warnings = json.loads((tmp_path / "summary.json").read_text())["collapse_warnings"]
    assert [w for w in warnings if "gradient spike" in w] == [next(w for w in warnings if w.startswith("step 30:"))]


def test_a_warning_survives_a_kill_right_after_its_checkpoint(gan04, tmp_path, monkeypatch):
    # The naive GAN at 32 px first warns on the row of step 5; the run is stopped just after the checkpoint of that
    # same step is written, resumed, and must end with the warnings of the run that was never stopped.
    flags = [*QUICK, "--lpips-random-backbone", "--max-steps", "30", "--capacity-steps", "15", "--log-every", "5",
             "--checkpoint-every", "5", "--disc-weight", "0.5", "--disc-start", "0", "--no-adaptive-weight",
             "--no-spectral-norm"]
    gan04.main([*flags, "--out", str(tmp_path / "whole")])
    real_replace = os.replace

    def replace_then_die(src, dst):
        real_replace(src, dst)
        if torch.load(dst, weights_only=True)["step"] == 5:
            raise KeyboardInterrupt  # a kill between the checkpoint and the next step
    monkeypatch.setattr(os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        gan04.main([*flags, "--out", str(tmp_path / "killed")])
    monkeypatch.setattr(os, "replace", real_replace)
    assert common.load_checkpoint(tmp_path / "killed" / "checkpoint.pt")["warnings_seen"]  # step 5's, saved
    gan04.main(["--resume", str(tmp_path / "killed" / "checkpoint.pt")])
    whole, killed = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("whole", "killed"))
    assert killed["collapse_warnings"] == whole["collapse_warnings"] and any(
        w.startswith("step 5:") for w in whole["collapse_warnings"])


def test_collapse_monitor_flags_d_outpulling_the_reconstruction(gan04):
    # D switched on from step 0 gives the other symptoms only collapsing rows as a baseline; its pull on
    # the decoder, measured against the reconstruction's, needs none.
    rows = _rows([100.0] * 3)
    for r, ratio in zip(rows, [0.4, 0.9, 1.6]):
        r["adv_rec_grad_ratio"] = ratio
    assert gan04.collapse_symptoms(rows[:2], disc_start_step=0) == {}
    # even at the first row
    assert set(gan04.collapse_symptoms(rows[2:], disc_start_step=0)) == {"D outpulls the reconstruction"}
    assert gan04.collapse_symptoms(_rows([100.0], norm=[1e6]), disc_start_step=0) == {}  # no spike without rows before
    assert set(gan04.collapse_symptoms(rows, disc_start_step=0)) == {"D outpulls the reconstruction"}


@pytest.fixture(scope="module")
def run04(tmp_path_factory):
    out = tmp_path_factory.mktemp("run04")
    result = run_cli("04_vae_gan_warmup", *QUICK, "--lpips-random-backbone", "--max-steps", "100",
                     "--disc-start", "60", "--capacity-steps", "50", "--capacity-max", "5", "--log-every", "10",
                     "--out", out)
    assert result.returncode == 0, result.stderr[-2000:]
    return out


@pytest.mark.slow
def test_short_run_leaves_every_contract_file(run04):
    for name in ["config.json", "metrics.csv", "summary.json", "recon.png", "samples.png", "interpolation.png",
                 "curves.png", "checkpoint.pt", "traversals.png"]:
        assert (run04 / name).stat().st_size > 0, name
    summary = json.loads((run04 / "summary.json").read_text())
    assert summary["disc_start_step"] == 60 and summary["lpips_trainable_params"] == 0
    assert isinstance(summary["collapse_warnings"], list) and summary["max_dec_grad_norm"] > 0
    rows = read_rows(run04 / "metrics.csv")
    for column in ["d_loss", "g_loss", "adv_weight", "disc_factor", "dec_grad_norm", "logits_real", "logits_fake",
                   "lpips", "capacity"]:
        assert column in rows[0], column
    before, after = [r for r in rows if r["step"] <= 60], [r for r in rows if r["step"] > 60]
    assert all(r["disc_factor"] == 0 and r["d_loss"] == 0 and r["adv_weight"] == 0 for r in before)
    assert all(r["disc_factor"] == 1 and r["d_loss"] > 0 and r["adv_weight"] > 0 for r in after)
    # D's pull over the whole decoder is measured on each logged step once D is on, and is not the
    # 0.5 that the adaptive weight fixes at the last layer alone.
    assert all(r["adv_rec_grad_ratio"] == 0 for r in before)
    assert all(r["adv_rec_grad_ratio"] > 0 for r in after)
    assert any(abs(r["adv_rec_grad_ratio"] - 0.5) > 0.05 for r in after)


def test_adv_rec_grad_ratio_against_separate_backward_passes(gan04):
    torch.manual_seed(0)
    decoder = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4))
    out = decoder(torch.randn(6, 3))
    rec, adv = out.pow(2).sum(), 0.3 * out[:, :2].sum()
    ratio = gan04.adv_rec_grad_ratio(rec, adv, list(decoder.parameters()))
    norms = []
    for loss in (rec, adv):  # each gradient on its own, flattened into one vector
        decoder.zero_grad()
        loss.backward(retain_graph=True)
        norms.append(torch.cat([p.grad.flatten() for p in decoder.parameters()]).norm())
    assert ratio.item() == pytest.approx((norms[1] / norms[0]).item(), rel=1e-5)


@pytest.mark.slow
def test_discriminator_untouched_before_the_start(gan04, tmp_path):
    states = []
    for steps in (10, 40):  # the same run stopped at two steps, both before D's start at 1000
        out = tmp_path / str(steps)
        gan04.main([*QUICK, "--lpips-random-backbone", "--max-steps", str(steps), "--disc-start", "1000",
                    "--log-every", "10", "--out", str(out)])
        states.append(common.load_checkpoint(out / "checkpoint.pt"))
    assert not torch.equal(states[0]["model"]["decoder.conv_out.weight"], states[1]["model"]["decoder.conv_out.weight"])
    for name, value in states[0]["disc"].items():  # D, spectral norm's power-iteration vectors included
        assert torch.equal(states[1]["disc"][name], value), name
    assert states[1]["disc_optimizer"]["state"] == {}  # D's optimizer never stepped
    rows = read_rows(tmp_path / "40" / "metrics.csv")
    assert all(r["disc_factor"] == 0 and r["g_loss"] == 0 for r in rows)


def test_bad_disc_flags_exit_2(tmp_path):
    assert_rejected("04_vae_gan_warmup", "--disc-start", "soon", "--out", tmp_path, mentions="--disc-start")
    assert_rejected("04_vae_gan_warmup", "--disc-weight", "-1", "--out", tmp_path, mentions="--disc-weight")


@pytest.mark.slow
def test_resume_continues_d_and_its_start(gan04, tmp_path):
    # D starts during the first leg; the resumed leg must continue D, its optimizer, the start step and
    # the running maximum of the gradient norm exactly where a straight run has them (CPU: bit-exact).
    args = [*QUICK, "--lpips-random-backbone", "--disc-start", "20", "--log-every", "10"]
    gan04.main([*args, "--max-steps", "60", "--out", str(tmp_path / "straight")])
    gan04.main([*args, "--max-steps", "30", "--out", str(tmp_path / "resumed")])
    gan04.main(["--resume", str(tmp_path / "resumed" / "checkpoint.pt"), "--max-steps", "60"])
    straight, resumed = (read_rows(tmp_path / name / "metrics.csv") for name in ("straight", "resumed"))
    assert [r["step"] for r in resumed] == [r["step"] for r in straight]
    for a, b in zip(resumed, straight):
        for key in ["loss", "recon", "d_loss", "adv_weight", "logits_fake"]:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)
    summaries = [json.loads((tmp_path / name / "summary.json").read_text()) for name in ("straight", "resumed")]
    assert summaries[0]["disc_start_step"] == summaries[1]["disc_start_step"] == 20
    # (the largest gradient norm is read from the rows, which a resumed run takes back from metrics.csv: 6 digits)
    assert summaries[1]["max_dec_grad_norm"] == pytest.approx(summaries[0]["max_dec_grad_norm"], rel=1e-5)


@pytest.mark.slow
def test_d_starts_half_way_by_default_and_a_run_too_short_says_so(tmp_path):
    flags = [*QUICK, "--lpips-random-backbone", "--max-steps", "40", "--log-every", "10"]
    result = run_cli("04_vae_gan_warmup", *flags, "--capacity-steps", "10", "--out", tmp_path / "half")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "step 20: the discriminator starts" in result.stdout
    assert [r["disc_factor"] for r in read_rows(tmp_path / "half" / "metrics.csv")] == [0, 0, 1, 1]
    summary = json.loads((tmp_path / "half" / "summary.json").read_text())
    assert summary["disc_start_step"] == 20 and summary["disc_steps"] == 20
    # C reaches C_max at step 100, after the run's end: D would start there, so it never acts, and the run says so
    result = run_cli("04_vae_gan_warmup", *flags, "--capacity-steps", "100", "--out", tmp_path / "late")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "D would start at step 100, after the run's end" in result.stdout
    assert json.loads((tmp_path / "late" / "summary.json").read_text())["disc_steps"] == 0


@pytest.mark.slow
def test_a_resumed_run_keeps_its_default_d_start_when_it_gets_longer(gan04, tmp_path):
    # D's default start is half the run; a resumed run given more steps keeps the start it began with
    args = [*QUICK, "--lpips-random-backbone", "--log-every", "10", "--capacity-steps", "10", "--out", str(tmp_path)]
    gan04.main([*args, "--max-steps", "40"])
    gan04.main(["--resume", str(tmp_path / "checkpoint.pt"), "--max-steps", "60"])
    assert json.loads((tmp_path / "summary.json").read_text())["disc_start_step"] == 20  # not 30


@pytest.mark.slow
def test_disc_start_given_with_resume_overrides_the_saved_one(gan04, tmp_path):
    # Flags given with --resume override the saved ones: also the step at which D starts.
    args = [*QUICK, "--lpips-random-backbone", "--log-every", "10", "--out", str(tmp_path)]
    gan04.main([*args, "--max-steps", "20", "--disc-start", "1000"])
    gan04.main(["--resume", str(tmp_path / "checkpoint.pt"), "--max-steps", "40", "--disc-start", "30"])
    rows = read_rows(tmp_path / "metrics.csv")
    assert [r["disc_factor"] for r in rows] == [0, 0, 0, 1]  # D on from step 30 (rows at 10, 20, 30, 40)
    assert json.loads((tmp_path / "summary.json").read_text())["disc_start_step"] == 30


@pytest.mark.slow
def test_adversarial_term_is_priced_like_the_pixel_terms(tmp_path):
    # L_adv = -P mean D(x_hat) / (2 sigma^2), as LPIPS is priced; --no-adaptive-weight: lambda = --disc-weight.
    # Each metrics row here is one step, so its loss must add up from the row's own terms.
    result = run_cli("04_vae_gan_warmup", *QUICK, "--lpips-random-backbone", "--max-steps", "4", "--disc-start", "0",
                     "--no-adaptive-weight", "--disc-weight", "3", "--decoder-std", "0.5", "--log-every", "1",
                     "--out", tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    pixels, price = 32 * 32, 1 / (2 * 0.5 ** 2)  # one grey 32 px image; 1 / (2 sigma^2)
    for r in read_rows(tmp_path / "metrics.csv"):
        assert r["adv_weight"] == 3 and r["g_loss"] != 0  # D acts from step 0
        expected = (r["recon"] + 100 * abs(r["kl"] - r["capacity"]) + pixels * r["lpips"] * price
                    + 3 * pixels * r["g_loss"] * price)
        assert r["loss"] == pytest.approx(expected, rel=1e-4, abs=1e-2), r["step"]


def test_l1_pixel_loss(gan04):
    mean, x = torch.rand(3, 2, 4, 4) * 2 - 1, torch.rand(3, 2, 4, 4) * 2 - 1
    torch.testing.assert_close(gan04.recon_loss(mean, x, 0.5, "l1"), (mean - x).abs().sum((1, 2, 3)) / 0.5)
    torch.testing.assert_close(gan04.recon_loss(mean, x, 0.5), (mean - x).pow(2).sum((1, 2, 3)) / 0.5)


def test_no_spectral_norm_flag_gives_a_plain_discriminator(gan04):
    args = gan04.parse_args(["--no-spectral-norm"])
    disc = gan04.PatchDiscriminator(1, 8, spectral_norm=not args.no_spectral_norm)
    convs = [m for m in disc.modules() if isinstance(m, nn.Conv2d)]
    assert convs and not any(nn.utils.parametrize.is_parametrized(m, "weight") for m in convs)
    assert not gan04.parse_args([]).no_spectral_norm and gan04.parse_args([]).disc_weight == 0.1


def test_a_spike_is_seen_when_d_acts_from_step_0(gan04):
    # D from step 0: the rows before the spike are D's too; the first row has no baseline and no warning
    rows = _rows([500.0, 480.0, 470.0], norm=[300.0, 320.0, 310.0], peak=[400.0, 450.0, 9000.0])
    assert gan04.collapse_symptoms(rows[:1], disc_start_step=0) == {}
    assert set(gan04.collapse_symptoms(rows, disc_start_step=0)) == {"gradient spike"}


@pytest.mark.slow
def test_grad_clip_bounds_the_decoder_gradient_the_optimizer_sees(gan04, tmp_path):
    decoder = len(list(common.VAE(1, 32, 10, 32, centre_mu=True).decoder.parameters()))
    seen = {}

    def record(optimizer, args, kwargs):  # before every optimizer step: the VAE's ends with the decoder's parameters
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if optimizer.defaults["betas"] == (0.9, 0.999):  # not D's (0.5, 0.9)
            seen.setdefault("norms", []).append(torch.stack([p.grad.norm() for p in params[-decoder:]]).norm().item())
    handle = register_optimizer_step_pre_hook(record)
    try:
        for clip in [0.0, 1.0]:
            seen.clear()
            gan04.main([*QUICK, "--max-steps", "6", "--log-every", "1", "--disc-start", "0", "--lpips-random-backbone",
                        "--grad-clip", str(clip), "--out", str(tmp_path / str(clip))])
            logged = [r["dec_grad_norm"] for r in read_rows(tmp_path / str(clip) / "metrics.csv")]
            assert min(logged) > 1.0  # the norm before clipping: the clip binds at every step
            if clip:
                assert max(seen["norms"]) <= 1.0 + 1e-5
            else:
                assert seen["norms"] == pytest.approx(logged, rel=1e-5)
    finally:
        handle.remove()


def test_r1_penalty_against_finite_differences(gan04):
    """E_real ||grad_x D(x)||^2, D(x) an image's mean patch logit, against central differences in float64."""
    torch.manual_seed(0)
    disc = gan04.PatchDiscriminator(1, 2, spectral_norm=False).double()
    x = torch.randn(2, 1, 16, 16, dtype=torch.float64, requires_grad=True)
    penalty = gan04.r1_penalty(disc(x), x)
    grad, eps = torch.zeros_like(x), 1e-6
    with torch.no_grad():
        for i in range(x.numel()):
            step = torch.zeros(x.numel(), dtype=torch.float64)
            step[i] = eps
            step = step.view_as(x)
            change = disc(x + step).flatten(1).mean(1) - disc(x - step).flatten(1).mean(1)
            grad.view(-1)[i] = change[i // x[0].numel()] / (2 * eps)
    assert penalty.item() == pytest.approx(grad.pow(2).flatten(1).sum(1).mean().item(), rel=1e-6)
    penalty.backward()  # create_graph: the penalty trains D's weights (a bias does not move grad_x D)
    assert all(p.grad.abs().sum() > 0 for name, p in disc.named_parameters() if name.endswith("weight"))


def test_clip_and_r1_flags_are_checked(tmp_path):
    assert_rejected("04_vae_gan_warmup", "--grad-clip", "-1", "--out", tmp_path / "x", mentions="--grad-clip")
    assert_rejected("04_vae_gan_warmup", "--r1-gamma", "1", "--compile", "--out", tmp_path / "x", mentions="--compile")
