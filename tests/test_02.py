"""02_burgess_capacity.py: the capacity schedule at its edges, the loss against a hand computation
on a real run's numbers, KL following C, C surviving a resume, and the information-free-KL guard;
the tools that explain its switch-on steps (pixel_spectrum, position_code)."""
import json
import math
import re

import pytest
import torch

import common
from conftest import QUICK, assert_clean_error, load_script, read_rows, run_cli
from tools import pictures
from tools import position_code
from tools.position_code import run_codes


@pytest.fixture(scope="module")
def cap02():
    return load_script("02_burgess_capacity")


@pytest.mark.parametrize("step,expected", [(0, 0.0), (500, 12.5), (999, 24.975), (1000, 25.0), (1001, 25.0),
                                           (10**6, 25.0)])
def test_capacity_schedule_edges(cap02, step, expected):
    assert cap02.capacity(step, 25.0, 1000) == pytest.approx(expected)


def test_capacity_without_ramp_is_constant(cap02):
    assert cap02.capacity(0, 7.0, 0) == 7.0


@pytest.fixture(scope="module")
def run02(tmp_path_factory):
    out = tmp_path_factory.mktemp("run02")
    result = run_cli("02_burgess_capacity", *QUICK, "--max-steps", "300", "--capacity-steps", "200",
                     "--capacity-max", "12", "--log-every", "10", "--out", out)
    assert result.returncode == 0, result.stderr[-2000:]
    return out


@pytest.mark.slow
def test_logged_loss_is_recon_plus_gamma_times_gap(tmp_path):
    # With one step per row, each row holds one step's terms, so the loss can be recomputed exactly.
    result = run_cli("02_burgess_capacity", *QUICK, "--max-steps", "15", "--log-every", "1", "--gamma", "100",
                     "--capacity-steps", "10", "--capacity-max", "5", "--out", tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = read_rows(tmp_path / "metrics.csv")
    for r in rows:
        assert r["capacity"] == pytest.approx(min(5.0, 5.0 * (r["step"] - 1) / 10))  # C of the 0-based step
        assert r["loss"] == pytest.approx(r["recon"] + 100 * abs(r["kl"] - r["capacity"]), rel=1e-4, abs=1e-3)
        assert r["kl"] == pytest.approx(sum(r[f"kl_dim_{i}"] for i in range(10)), rel=1e-4, abs=1e-4)


@pytest.mark.slow
def test_kl_follows_capacity_and_carries_information(run02):
    summary = json.loads((run02 / "summary.json").read_text())
    rows = read_rows(run02 / "metrics.csv")
    # Measured (seed 0, 32 px): correlation over the ramp 0.999, final test KL 13.1 nats for C_max 12.
    assert summary["kl_capacity_correlation"] > 0.9
    ramp = [r for r in rows if r["step"] <= 200]  # correlation holds for KL = C / 2 too: the distance, in nats
    gap = sum(abs(r["kl"] - r["capacity"]) for r in ramp) / len(ramp)  # from metrics.csv's 6 significant digits
    assert summary["kl_capacity_gap"] == pytest.approx(gap, abs=1e-4)
    assert summary["kl_capacity_gap"] < 1.0
    assert abs(summary["test_kl"] - 12.0) < 3.0 and summary["capacity_final"] == 12.0
    assert rows[-1]["kl"] == pytest.approx(12.0, abs=2.0)
    # KL that tracks C could still be an information-free offset; the code must actually be used.
    assert summary["active_units"] >= 2
    # The centring closes the offset route: in training the batch mean of mu is 0, so none of the
    # logged KL is offset; at test time (BatchNorm's running statistics) only a trace of it.
    assert max(r["kl_offset"] for r in rows) < 1e-6
    assert summary["test_kl_offset"] < 0.05 * summary["test_kl"]
    _, test, _ = common.make_shapes(50_000, 5_000, 32, seed=1234)
    x = common.to_model_range(test)
    assert summary["test_recon"] < 0.8 * (x - x.mean(0)).pow(2).flatten(1).sum(1).mean().item()
    for name in ["traversals.png", "kl_per_dim.png", "curves.png", "recon.png", "samples.png"]:
        assert (run02 / name).stat().st_size > 0
    # switch_on: each dim's first logged step with KL > 0.5 nats, recomputed here from metrics.csv.
    expected = {}
    for r in rows:
        for i in range(10):
            if i not in expected and r[f"kl_dim_{i}"] > 0.5:
                expected[i] = r["step"]
    assert expected and {e["dim"]: e["step"] for e in summary["switch_on"]} == expected
    assert [e["step"] for e in summary["switch_on"]] == sorted(expected.values())
    for e in summary["switch_on"]:
        assert e["capacity"] == pytest.approx(min(12.0, 12.0 * (e["step"] - 1) / 200))  # C of its row's last step


@pytest.mark.slow
def test_without_centring_the_kl_buys_c_with_an_offset(run02, tmp_path):
    # The same run with mu uncentred: a shift of every code pays for C, and the information bound collapses.
    result = run_cli("02_burgess_capacity", *QUICK, "--max-steps", "300", "--capacity-steps", "200",
                     "--capacity-max", "12", "--log-every", "10", "--no-centring", "--out", tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    plain, centred = (json.loads((d / "summary.json").read_text()) for d in (tmp_path, run02))
    assert plain["test_kl"] == pytest.approx(centred["test_kl"], rel=0.25)  # both follow C
    assert plain["test_kl_offset"] > 0.5 * plain["test_kl"] and centred["test_kl_offset"] < 0.05 * centred["test_kl"]
    assert plain["test_info_bound"] < 0.5 * centred["test_info_bound"]


@pytest.mark.slow
def test_capacity_continues_where_a_resumed_run_stopped(run02, tmp_path, cap02):
    args = [*QUICK, "--capacity-steps", "200", "--capacity-max", "12", "--log-every", "10", "--out", str(tmp_path)]
    cap02.main([*args, "--max-steps", "120"])
    assert common.load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 120
    cap02.main(["--resume", str(tmp_path / "checkpoint.pt"), "--max-steps", "300"])
    resumed, reference = read_rows(tmp_path / "metrics.csv"), read_rows(run02 / "metrics.csv")
    assert [r["capacity"] for r in resumed] == [r["capacity"] for r in reference]
    for a, b in zip(resumed, reference):  # the whole run, not only C, continues exactly
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["kl"] == pytest.approx(b["kl"], rel=1e-5)


def test_mig_against_known_codes():
    g = torch.Generator().manual_seed(0)
    factors = torch.stack([torch.randint(0, n, (4000,), generator=g) for n in common.SHAPE_FACTORS.values()], 1)
    aligned = torch.cat([factors.float(), torch.randn(4000, 3, generator=g)], 1)  # one dim per factor
    mig, per_factor = position_code.mutual_information_gap(aligned, factors)
    assert per_factor["shape"] > 0.95 and per_factor["scale"] > 0.95  # few values: no binning loss
    assert mig > 0.75
    mixed = torch.cat([factors[:, 3:4] + factors[:, 4:5], factors[:, 3:4] - factors[:, 4:5]], 1).float()
    assert position_code.mutual_information_gap(mixed, factors)[1]["pos_x"] < 0.2  # x spread over two dims
    assert position_code.mutual_information_gap(torch.randn(4000, 6, generator=g), factors)[0] < 0.02


def test_switch_on_steps_takes_the_first_crossing():
    kl = {10: [0.1, 0.0, 0.6], 20: [0.7, 0.0, 0.2], 30: [0.2, 0.0, 0.9], 40: [0.9, 0.4, 0.9]}  # step: dims 0-2
    rows = [{"step": s, **{f"kl_dim_{i}": v for i, v in enumerate(values)}} for s, values in kl.items()]
    # dim 2 crosses first (step 10), dips, and stays at 10; dim 0 crosses at 20; dim 1 never passes 0.5
    found = pictures.switch_on(rows, 3)
    assert [(e["dim"], e["step"]) for e in found] == [(2, 10), (0, 20)]
    found = pictures.switch_on(rows, 3, threshold=0.3)
    assert [(e["dim"], e["step"]) for e in found] == [(2, 10), (0, 20), (1, 40)]


def test_factor_information_finds_the_dim_that_holds_each_factor():
    g = torch.Generator().manual_seed(0)
    factors = torch.stack([torch.randint(0, n, (4000,), generator=g) for n in common.SHAPE_FACTORS.values()], 1)
    # dim 0 is noise, dim 1 = pos_y ... dim 5 = shape
    codes = torch.cat([torch.randn(4000, 1, generator=g), factors.flip(1).float()], 1)
    info = position_code.factor_information(codes, factors)
    assert info.shape == (6, 5)
    assert info.argmax(0).tolist() == [5, 4, 3, 2, 1]  # each factor is found in its own dim
    assert info[0].max() < 0.05  # noise: only the binned estimate's small-sample bias (measured up to 0.024)
    assert info[5, 0] > 0.95 and info[1, 4] > 0.8  # shape has 3 values (no binning loss); pos_y 32 values in 20 bins


def test_pixel_spectrum_recovers_known_variances():
    from tools.pixel_spectrum import leading_variances
    g = torch.Generator().manual_seed(0)
    a, b = [torch.randint(0, 2, (4000, 1), generator=g).double() * 2 - 1 for _ in range(2)]  # +-1 each
    p1, p2 = torch.tensor([[1.0, 1, 1, 1]]) / 2, torch.tensor([[1.0, -1, 1, -1]]) / 2  # orthonormal pixel patterns
    images = (128 + 60 * a * p1 + 30 * b * p2).round().to(torch.uint8).view(4000, 1, 2, 2)
    ratios = leading_variances(images, k=4)  # variances 60^2 and 30^2 along p1 and p2, nothing else
    assert ratios[0] == 1.0 and ratios[1] == pytest.approx(0.25, abs=0.01) and max(ratios[2:]) < 1e-9


def test_position_code_tells_a_loop_from_a_line():
    from tools.position_code import curve_shape
    g = torch.Generator().manual_seed(0)
    values = torch.randint(0, 32, (6400,), generator=g)
    angle = 2 * math.pi * 0.8 * values / 31  # 0.8 of a circle, 288 degrees, over the 32 positions
    noise = 0.3 * torch.randn(6400, 6, generator=g)
    loop = noise + torch.cat([angle.cos().view(-1, 1), angle.sin().view(-1, 1), torch.zeros(6400, 4)], 1)
    rotation = torch.linalg.qr(torch.randn(6, 6, generator=g))[0]  # the loop need not lie along two dims
    first, two, turn, _ = curve_shape(loop @ rotation, values, 32)
    assert 0.3 < first < 0.7 and two > 0.97 and turn == pytest.approx(288, abs=15)
    line = noise + torch.cat([(values.float() / 31 - 0.5).view(-1, 1), torch.zeros(6400, 5)], 1)
    first, two, _, _ = curve_shape(line, values, 32)
    assert first > 0.95


@pytest.mark.slow
def test_position_code_reads_a_run_folder(run02):
    from tools.position_code import curve_shape
    result = run_cli("tools.position_code", run02, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    pattern = r"(\d+)% of its variance in one direction, (\d+)% in two; in that plane it turns (\d+) degrees"
    printed = [list(map(float, m.groups())) for m in re.finditer(pattern, result.stdout)]
    mu, factors = run_codes(run02)  # the same numbers, computed here from autoencoder.pt
    expected = [curve_shape(mu, factors[:, k], 32)[:3] for k in (3, 4)]
    assert len(printed) == 2
    for shown, (first, two, turn) in zip(printed, expected):
        assert shown == pytest.approx([100 * first, 100 * two, turn], abs=0.51)  # printed rounded
    assert (run02 / "position_code.png").stat().st_size > 0
    # which factor each switched-on dim knows most about, and MIG: against the codes computed here
    info, (mig, _) = position_code.factor_information(mu, factors), position_code.mutual_information_gap(mu, factors)
    assert float(re.search(r"MIG ([\d.]+)", result.stdout).group(1)) == pytest.approx(mig, abs=5e-4)
    told = re.findall(r"z(\d+) \(switched on at step \d+\) knows most about (\w+): ([\d.]+)", result.stdout)
    switched = json.loads((run02 / "summary.json").read_text())["switch_on"]
    assert [int(d) for d, _, _ in told] == [e["dim"] for e in switched] and told
    for d, name, share in told:
        k = int(info[int(d)].argmax())
        assert name == list(common.SHAPE_FACTORS)[k] and float(share) == pytest.approx(info[int(d), k].item(), abs=5e-3)


def test_position_code_refuses_a_run_without_true_factors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"script": "02_burgess_capacity", "args": {
        "dataset": "fashion-mnist", "image_size": 32, "latent_dim": 10, "width": 32}}))
    result = run_cli("tools.position_code", tmp_path, timeout=120)
    assert result.returncode == 2
    assert_clean_error(result.stderr, "fashion-mnist run", "only for shapes")
    assert not (tmp_path / "position_code.png").exists()


@pytest.mark.slow
def test_a_code_map_on_shapes_leaves_every_output(tmp_path):
    # The factor analysis (MIG, what each dim knows) needs one value per dim and image: a code vector.
    result = run_cli("02_burgess_capacity", "--image-size", "32", "--latent", "spatial", "--max-steps", "10",
                     "--log-every", "5", "--out", tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["kl_per_dim"]) == 4  # 4 channels, each over 8 x 8 positions
    for name in ["recon.png", "samples.png", "traversals.png", "kl_per_dim.png", "curves.png"]:
        assert (tmp_path / name).stat().st_size > 0
