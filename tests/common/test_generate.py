"""`sample_like` writes a synthetic PTB-XL folder: fresh ids, only the conditioning, readable by the loader."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from common.bundle import build_generator
from common.config import DataConfig, from_dict
from common.data.dataset import load_dataset
from common.data.demographics import demographics_from_metadata
from common.data.metadata import read_metadata, read_metadata_table
from common.normalization import Normalizer
from common.generate import LIKE_COLUMNS, sample_like
from common.model.denoiser import build_denoiser
from common.scp import SCP_CODES
from tests.fixtures_ptbxl import write_metadata

pytestmark = pytest.mark.slow  # samples and writes WFDB cohorts: left out of make test-fast

# Rows of the tiny fixture covering its quirks: age 300 (5), missing age (9), missing height (3, 6)
# and weight (4, 8), a patient with two records (1, 2), folds 1..10.
LIKE_IDS = [1, 2, 3, 4, 5, 6, 8, 9, 13, 40]


@pytest.fixture(scope="module")
def tiny_generator():
    cfg = from_dict({"model": {"size": "tiny"}, "diffusion": {"timesteps": 20, "sample_steps": 2}})
    torch.manual_seed(0)
    signals = np.random.default_rng(0).normal(0.0, 0.3, size=(4, 8, 1000)).astype(np.float32)
    return build_generator(cfg, build_denoiser(cfg.model).state_dict(), Normalizer.fit(signals), Path("tiny"))


@pytest.fixture
def like_table(tiny_ptbxl, tmp_path):
    """A real-format table: rows of the tiny fixture with PTB-XL-sized ids (none in 1..N)."""
    rows = []
    for row in tiny_ptbxl.rows:
        if row["ecg_id"] in LIKE_IDS:
            rows.append(dict(row, ecg_id=20_000 + row["ecg_id"], patient_id=17_000 + row["patient_id"],
                             report=f"report of record {row['ecg_id']}"))
    folder = tmp_path / "like"
    folder.mkdir()
    write_metadata(folder, rows)
    return rows, folder / "ptbxl_database.csv"


@pytest.fixture
def liked(like_table, tiny_ptbxl, tiny_generator, tmp_path):
    rows, path = like_table
    meta = read_metadata_table(path)
    out = sample_like(tiny_generator, meta, SCP_CODES, tmp_path / "synthetic", seed=3, progress=False,
                      scp_statements=tiny_ptbxl.root / "scp_statements.csv")
    return rows, meta, out


def test_the_table_has_fresh_ids_and_only_the_allowed_columns(liked):
    rows, meta, out = liked
    raw = pd.read_csv(out / "ptbxl_database.csv")
    assert tuple(raw.columns) == LIKE_COLUMNS
    n = len(meta)
    assert raw["ecg_id"].tolist() == list(range(1, n + 1))
    assert raw["patient_id"].tolist() == list(range(1, n + 1))
    real_ids = {int(r["ecg_id"]) for r in rows}
    real_patients = {int(r["patient_id"]) for r in rows}
    assert not set(raw["ecg_id"]) & real_ids and not set(raw["patient_id"]) & real_patients
    text = (out / "ptbxl_database.csv").read_text()
    for real in real_ids | real_patients:
        assert not re.search(rf"\b{real}\b", text), f"real id {real} in the synthetic table"
    for row in rows:
        for value in (row["report"], row["recording_date"], row["device"]):
            assert value not in text
    assert raw["site"].isna().all() and raw["filename_hr"].isna().all()
    assert (raw["synthetic"] == 1).all()
    assert "synthetic: true" in (out / "README.txt").read_text()
    assert (out / "scp_statements.csv").is_file()


def test_conditioning_values_match_the_input_rows(liked):
    _, meta, out = liked
    back = read_metadata(out)
    assert [dict(c) for c in back["scp_codes"]] == [dict(c) for c in meta["scp_codes"]]
    values, present = demographics_from_metadata(meta)
    back_values, back_present = demographics_from_metadata(back)
    np.testing.assert_array_equal(back_present, present)  # missing stays missing
    np.testing.assert_array_equal(back_values[present], values[present])
    position = {int(i): k for k, i in enumerate(meta.index)}
    assert meta.loc[20_005, "age"] == 300.0 and back.loc[position[20_005] + 1, "age"] == 90.0  # as the model got it
    assert np.isnan(meta.loc[20_009, "age"]) and np.isnan(back.loc[position[20_009] + 1, "age"])
    assert back["strat_fold"].tolist() == meta["strat_fold"].tolist()


def test_the_loader_reads_the_folder_back(liked, tmp_path):
    _, meta, out = liked
    data = load_dataset(DataConfig(root=str(out), cache_dir=str(tmp_path / "cache")), progress=False)
    assert list(data.ecg_ids) == list(range(1, len(meta) + 1))
    assert list(data.patient_ids) == list(range(1, len(meta) + 1))
    assert data.signals.shape == (len(meta), 8, 1000) and np.isfinite(data.signals).all()
    assert (data.site == -1).all()
    for k in range(len(meta)):
        assert (out / "records100" / "00000" / f"{k + 1:05d}_lr.hea").is_file()
