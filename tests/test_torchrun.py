"""torchrun with 2 processes (gloo, on the CPU) takes the step one process takes on the same global batch: the same
loss terms and the same averaged gradient; bad input and divergence end every process; a 2-process run resumes exactly.
Long runs: --checkpoint-every survives SIGKILL, --eval-every scores the model without changing its training."""
import json
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import common
from conftest import QUICK, ROOT, photo_folder, read_rows, run_cli

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def torchrun(script, *args, timeout=300):
    return subprocess.run([*TORCHRUN, f"{script}.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def gradient_differences(a, b, key):
    """||g_a - g_b|| / ||g_a||, over each parameter, of the first gradient that two checkpoints' optimizers `key` saw:
    after one Adam step, exp_avg = (1 - beta1) g. The weights themselves are no fair comparison: Adam's first step is
    about lr * sign(g), and an element whose gradient is near 0 flips with another CPU's summation order."""
    a, b = (torch.load(p, weights_only=True)[key]["state"] for p in (a, b))
    return {k: ((a[k]["exp_avg"] - b[k]["exp_avg"]).norm() / a[k]["exp_avg"].norm().clamp(min=1e-12)).item()
            for k in a}


def without(rows, *columns):
    return [{k: v for k, v in r.items() if k not in columns} for r in rows]


@pytest.mark.slow
@pytest.mark.parametrize("script,extra,optimizers", [
    ("01_vanilla_vae", [], ["optimizer"]),
    ("03_lpips_frozen", ["--lpips-random-backbone", "--unfreeze-lpips", "--latent", "spatial"],  # lin heads
     ["optimizer"]),  # outside DDP; a code map: a vector's centring takes each slice's statistics on a CPU
    ("04_vae_gan_warmup", ["--disc-start", "0", "--lpips-random-backbone", "--latent", "spatial"],
     ["optimizer", "disc_optimizer"])])
def test_two_processes_take_one_processs_step(tmp_path, script, extra, optimizers):
    flags = [*QUICK, "--max-steps", "1", "--log-every", "1", *extra]
    one, two = run_cli(script, *flags, "--out", tmp_path / "one"), torchrun(script, *flags, "--out", tmp_path / "two")
    assert one.returncode == 0 and two.returncode == 0, (one.stderr + two.stderr)[-3000:]
    for key in optimizers:  # DDP's averaged gradient of the global batch's loss (its KL mean and its noise)
        worst = max(gradient_differences(tmp_path / "one" / "checkpoint.pt", tmp_path / "two" / "checkpoint.pt", key)
                    .items(), key=lambda item: item[1])
        assert worst[1] < 1e-4, (key, worst)  # float32 sums in another order: measured up to 2e-6 here
    rows = [read_rows(tmp_path / f / "metrics.csv")[0] for f in ("one", "two")]
    for column in ["loss", "recon", "kl"] + (["adv_weight", "d_loss", "adv_rec_grad_ratio"] if "04" in script else []):
        assert rows[1][column] == pytest.approx(rows[0][column], rel=1e-5), column
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2 and two.stdout.count("training images") == 1  # one voice: rank 0's


def exit_codes(result):
    """The exit codes torchrun reports for its failed processes."""
    return set(map(int, re.findall(r"exitcode\s*:\s*(-?\d+)", result.stderr)))


def test_bad_input_ends_every_process_with_exit_2(tmp_path):
    started = time.time()
    odd = torchrun("01_vanilla_vae", *QUICK, "--batch-size", "63", "--out", tmp_path / "odd", timeout=120)
    (tmp_path / "empty").mkdir()  # only rank 0 reads the folder: the other process learns of the error from it
    empty = torchrun("01_vanilla_vae", "--dataset", "folder", "--data-dir", tmp_path / "empty", "--out",
                     tmp_path / "e", timeout=120)
    for result, fragment in [(odd, "must split evenly over 2 processes"), (empty, "readable images")]:
        assert result.returncode != 0 and "]: Traceback" not in result.stderr, result.stderr  # none from a process
        assert result.stderr.count("error: ") == 1 and fragment in result.stderr, result.stderr
        assert exit_codes(result) == {2}
    assert time.time() - started < 90 and not (tmp_path / "odd").exists() and not (tmp_path / "e").exists()


def test_a_non_finite_loss_ends_every_process_with_exit_3(tmp_path):
    result = torchrun("01_vanilla_vae", *QUICK, "--decoder-std", "1e-30", "--max-steps", "5", "--log-every", "1",
                      "--out", tmp_path / "run", timeout=120)
    assert result.stderr.count("error: training diverged at step 1") == 1, result.stderr[-3000:]
    assert exit_codes(result) == {3}


@pytest.mark.slow
def test_a_two_process_run_resumes_exactly(tmp_path):
    flags = [*QUICK, "--log-every", "10"]
    whole = torchrun("02_burgess_capacity", *flags, "--max-steps", "40", "--out", tmp_path / "whole")
    legs = torchrun("02_burgess_capacity", *flags, "--max-steps", "20", "--out", tmp_path / "legs")
    assert whole.returncode == 0 and legs.returncode == 0, (whole.stderr + legs.stderr)[-3000:]
    legs = torchrun("02_burgess_capacity", "--resume", tmp_path / "legs" / "checkpoint.pt", "--max-steps", "40")
    assert legs.returncode == 0, legs.stderr[-3000:]
    assert without(read_rows(tmp_path / "legs" / "metrics.csv"), "images_per_s") == \
           without(read_rows(tmp_path / "whole" / "metrics.csv"), "images_per_s")
    a, b = (json.loads((tmp_path / f / "summary.json").read_text()) for f in ("whole", "legs"))
    assert {k: v for k, v in a.items() if k not in ("wall_s", "train_images_per_s")} == \
           {k: v for k, v in b.items() if k not in ("wall_s", "train_images_per_s")}


@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_from_its_last_checkpoint_and_ends_as_if_never_killed(tmp_path):
    flags = [*QUICK, "--max-steps", "160", "--log-every", "10", "--checkpoint-every", "30"]
    reference = run_cli("01_vanilla_vae", *flags, "--out", tmp_path / "whole")
    assert reference.returncode == 0, reference.stderr[-2000:]
    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "01_vanilla_vae.py", *map(str, flags), "--out", str(out)], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:  # SIGKILL as soon as a checkpoint from within the epoch is there
        if (out / "checkpoint.pt").exists() and common.load_checkpoint(out / "checkpoint.pt")["step"] >= 60:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    step = common.load_checkpoint(out / "checkpoint.pt")["step"]
    assert step % 30 == 0 and 60 <= step < 160, step  # mid-epoch: an epoch here is 781 steps
    result = run_cli("01_vanilla_vae", "--resume", out / "checkpoint.pt")
    assert result.returncode == 0, result.stderr[-2000:]
    assert without(read_rows(out / "metrics.csv"), "images_per_s") == \
           without(read_rows(tmp_path / "whole" / "metrics.csv"), "images_per_s")
    a, b = (json.loads((f / "summary.json").read_text()) for f in (tmp_path / "whole", out))
    assert {k: v for k, v in a.items() if k not in ("wall_s", "train_images_per_s")} == \
           {k: v for k, v in b.items() if k not in ("wall_s", "train_images_per_s")}


@pytest.mark.slow
def test_eval_every_scores_the_model_and_leaves_training_alone(tmp_path):
    data = photo_folder(tmp_path / "photos", n_train=40, n_test=8, size=32)
    flags = ["--dataset", "folder", "--data-dir", data, "--image-size", "32", "--batch-size", "8", "--log-every", "2",
             "--lpips-random-backbone"]
    watched = run_cli("03_lpips_frozen", *flags, "--max-steps", "8", "--eval-every", "4", "--out", tmp_path / "w")
    plain = run_cli("03_lpips_frozen", *flags, "--max-steps", "8", "--out", tmp_path / "p")
    short = run_cli("03_lpips_frozen", *flags, "--max-steps", "4", "--out", tmp_path / "s")
    assert watched.returncode == plain.returncode == short.returncode == 0, watched.stderr[-2000:]
    assert without(read_rows(tmp_path / "w" / "metrics.csv"), "images_per_s") == \
           without(read_rows(tmp_path / "p" / "metrics.csv"), "images_per_s")
    rows = read_rows(tmp_path / "w" / "eval.csv")
    assert [r["step"] for r in rows] == [4]  # the last step's scores are summary.json's
    model = common.load_autoencoder(tmp_path / "s" / "autoencoder.pt")  # the model as it was at step 4
    _, test = common.load_folder(data, 32)
    x = test.float() / 127.5 - 1
    with torch.no_grad():
        mse = ((model.decode(model.encode(x)[0]) - x) / 2).pow(2).flatten(1).mean(1).mean().item()
    assert rows[0]["test_psnr_db"] == pytest.approx(10 * torch.log10(torch.tensor(1 / mse)).item(), rel=1e-4)
    assert "test_lpips" in rows[0] and (tmp_path / "w" / "recon.png").exists()
