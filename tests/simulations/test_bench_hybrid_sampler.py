"""The two-denoiser benchmark, with a rhythm-conditioned high checkpoint like the shipped expert."""

import json

import numpy as np

from common.config import from_dict, load, to_dict
from common.rhythm import RhythmTable
from simulations.benchmarks import bench_hybrid_sampler
from tests.run_configs import tiny_run_config, write_public_run


def test_a_rhythm_conditioned_high_checkpoint_samples_with_its_own_table(tiny_ptbxl, tmp_path):
    config = tiny_run_config(tiny_ptbxl.root, tmp_path, partition={"scheme": "site", "num_sites": 2, "public_sites": [0],
                                                                    "val_folds": [9, 10], "test_folds": []},
                             diffusion={"sample_steps": 4})
    low = write_public_run(tmp_path / "low", load(config))
    high_cfg = from_dict({**to_dict(load(config)), "model": {"size": "unet", "channels": 8, "rhythm": True}})
    table = RhythmTable(100, (("SR",),), np.array([0.8]), np.array([0.0]))
    high = write_public_run(tmp_path / "high", high_cfg, rhythm=table)
    out = tmp_path / "hybrid"
    assert bench_hybrid_sampler.main(["--low", str(low), "--high", str(high), "--switch", "25", "--config", str(config),
                                      "--records", "3", "--out", str(out)]) == 0
    rows = json.loads((out / "hybrid.json").read_text())
    assert [r["sampler"] for r in rows] == ["low alone", "high alone", "switch at t=25, DDIM 4 eta 0"]
    assert all(np.isfinite(r["ilce_ratio"]) for r in rows)
