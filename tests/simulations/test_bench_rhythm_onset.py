"""The rhythm-onset benchmark: how much of a real record's rhythm the generator keeps from each noise level."""

import json

import pytest

from common.config import load
from simulations.benchmarks import bench_rhythm_onset
from tests.run_configs import tiny_run_config, write_public_run


def test_rows_per_start_and_a_record_started_at_step_zero_keeps_its_rhythm(tiny_ptbxl, tmp_path):
    config = tiny_run_config(tiny_ptbxl.root, tmp_path, partition={"scheme": "site", "num_sites": 2, "public_sites": [0],
                                                                    "val_folds": [9, 10], "test_folds": []},
                             diffusion={"sample_steps": 4})
    run = write_public_run(tmp_path / "untrained", load(config))  # untrained: from noise it draws no ECG
    out = tmp_path / "onset"
    assert bench_rhythm_onset.main(["--bundle", str(run), "--config", str(config), "--start", "0", "49",
                                    "--records", "3", "--out", str(out)]) == 0
    report = json.loads((out / "rhythm_onset.json").read_text())
    rows = {r["start"]: r for r in report["rows"]}
    assert list(rows) == ["real", "pure noise", "t=49", "t=0"]
    # one denoising step from abar ~ 1 returns the records: the rhythm measures are the real ones
    for key in ("regular_rhythm_fraction", "median_hr_bpm", "median_sdnn_ms"):
        assert rows["t=0"][key] == pytest.approx(rows["real"][key], rel=0.02)
    assert rows["pure noise"]["median_hr_bpm"] != pytest.approx(rows["real"]["median_hr_bpm"], rel=0.02)
    assert (out / "rhythm_onset.png").stat().st_size > 0


def test_a_start_outside_the_schedule_is_refused(tiny_ptbxl, tmp_path):
    config = tiny_run_config(tiny_ptbxl.root, tmp_path, partition={"scheme": "site", "num_sites": 2, "public_sites": [0]})
    run = write_public_run(tmp_path / "untrained", load(config))
    with pytest.raises(SystemExit):
        bench_rhythm_onset.main(["--bundle", str(run), "--config", str(config), "--start", "50", "--out", str(tmp_path / "o")])
