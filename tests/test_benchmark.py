"""tools/benchmark.py measures what it says: the outside-the-model timer counts exactly the steps of
its window and finds a delay planted in the data path; the conventional baseline sees the same
pixels as our loop; the quality comparison's -ELBO is the textbook formula. No speed thresholds."""
import math
import time

import pytest
import torch

import common
from tools import benchmark


def _measure(monkeypatch, tmp_path, delay):
    if delay:
        original = common.Batches.__call__

        def slow(self, step):
            time.sleep(delay)
            return original(self, step)
        monkeypatch.setattr(common.Batches, "__call__", slow)
    return benchmark.measure_script("01_vanilla_vae", 32, torch.device("cpu"), warmup=5, steps=20, out=tmp_path)


@pytest.mark.slow
def test_outside_timer_counts_the_window_and_finds_a_planted_delay(monkeypatch, tmp_path):
    plain = _measure(monkeypatch, tmp_path, delay=0.0)
    assert plain["counts"]["Batches.__call__"] == 20 and plain["counts"]["Run.log"] == 20
    assert 0 < plain["outside_s"] < plain["window_s"]
    assert plain["images_per_s"] == pytest.approx(20 * 64 / plain["window_s"])
    slow = _measure(monkeypatch, tmp_path, delay=0.02)  # 20 steps x 20 ms = 0.4 s more in the data path
    extra = (slow["by_part"]["Batches.__call__"] * slow["window_s"]
             - plain["by_part"]["Batches.__call__"] * plain["window_s"])
    assert 0.38 < extra < 0.6
    assert slow["outside_share"] > plain["outside_share"]


def test_window_must_close(tmp_path):
    timer = benchmark.OutsideTimer(warmup=5, steps=100, device=torch.device("cpu"))
    with pytest.raises(RuntimeError, match="never closed"):
        timer.result()


def test_conventional_dataset_gives_our_pixels():
    images = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    data = benchmark.ToTensorImages(images)
    for i in range(4):
        assert torch.equal(data[i], images[i].float() / 255)
    rgb = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    assert torch.equal(benchmark.ToTensorImages(rgb)[1], rgb[1].float() / 255)


def test_neg_elbo_is_bce_plus_kl():
    x = torch.tensor([[0.0, 1.0, 0.5]])
    logits, mu, logvar = torch.tensor([[0.0, 2.0, -1.0]]), torch.tensor([[1.0]]), torch.tensor([[0.0]])
    p = torch.sigmoid(logits)[0]
    bce = -sum(x[0, i] * math.log(p[i]) + (1 - x[0, i]) * math.log(1 - p[i]) for i in range(3))
    kl = 0.5 * (1.0 ** 2 + 1.0 - 1.0 - 0.0)  # 0.5 (mu^2 + s^2 - 1 - log s^2)
    assert benchmark.neg_elbo(logits, x, mu, logvar).item() == pytest.approx(float(bce) + kl, rel=1e-5)
