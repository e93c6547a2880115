"""The quality-per-minute benchmark: real pretraining runs, scored snapshot by snapshot, one curve per preset."""

import csv

import pytest

from simulations.benchmarks import bench_quality_curve
from tests.run_configs import tiny_run_config


@pytest.mark.slow  # a whole (tiny) pretraining run and sampling per snapshot
def test_each_preset_gets_a_scored_point_per_snapshot(tiny_ptbxl, tmp_path):
    config = tiny_run_config(tiny_ptbxl.root, tmp_path, partition={"scheme": "site", "num_sites": 2, "public_sites": [0],
                                                                    "val_folds": [9, 10], "test_folds": []},
                             train={"batch_size": 4, "warmup_steps": 2, "lr_decay": "cosine", "num_samples": 1})
    out = tmp_path / "curve"
    assert bench_quality_curve.main(["--config", str(config), "--models", "tiny", "--minutes", "0.02",
                                     "--points", "2", "--records", "2", "--out", str(out)]) == 0
    with (out / "curve.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    steps = [int(r["step"]) for r in rows]
    assert len(rows) == 2 and steps[1] == 2 * steps[0] > 0  # a mid-run EMA snapshot, then the final weights
    assert float(rows[1]["minutes"]) > float(rows[0]["minutes"]) > 0
    assert all(float(r["ilce_ratio"]) > 0 for r in rows) and (out / "curve.png").stat().st_size > 0
    assert (out / "tiny" / "base.json").is_file()  # the pretraining path itself ran


def test_too_few_held_out_records_is_a_clear_error(tiny_ptbxl, tmp_path):
    config = tiny_run_config(tiny_ptbxl.root, tmp_path, partition={"scheme": "site", "num_sites": 2, "public_sites": [0]})
    with pytest.raises(ValueError, match="--records 50"):
        bench_quality_curve.main(["--config", str(config), "--models", "tiny", "--records", "50", "--out", str(tmp_path / "c")])
