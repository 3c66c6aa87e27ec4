import json
from pathlib import Path

import pytest

from lit_diffusion.stages.toy import DEFAULT_CONFIG, load_toy_config, run_toy

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "toy" / "spiral.yaml"


def test_shipped_config_is_the_default():
    assert load_toy_config(CONFIG) == DEFAULT_CONFIG


def test_spiral_samples_land_on_the_data(tmp_path):
    cfg = {"data": {"n_points": 2000}, "train": {"steps": 1500}, "sample": {"n_samples": 400, "ddim_steps": 20}}
    metrics = run_toy(cfg, tmp_path)
    prior = metrics["prior_mean_dist"]
    # untrained, samples stay as far from the spiral as the prior noise; trained runs land at ~0.05 vs ~0.3
    assert metrics["ddpm_mean_dist"] < 0.35 * prior, metrics
    assert metrics["ddim_mean_dist"] < 0.35 * prior, metrics
    png = tmp_path / "toy.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and metrics["plot"] == str(png)
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics


def test_config_errors_name_the_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  stpes: 10\n")
    with pytest.raises(ValueError, match=r"bad.yaml.train: unknown key 'stpes'"):
        load_toy_config(bad)
    with pytest.raises(FileNotFoundError, match="toy config not found"):
        load_toy_config(tmp_path / "missing.yaml")
    bad.write_text("train:\n  steps: 0\n")  # trained nothing and divided by zero
    with pytest.raises(ValueError, match=r"bad.yaml: train.steps must be a whole number >= 1, got 0"):
        load_toy_config(bad)
    with pytest.raises(ValueError, match=r"toy config: sample.n_samples must be a whole number >= 1, got 0"):
        load_toy_config({"sample": {"n_samples": 0}})  # wrote NaN figures
    assert load_toy_config({"sample": {"n_samples": 5}})["sample"]["n_samples"] == 5
