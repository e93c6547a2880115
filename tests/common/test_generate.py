"""Sampling: reproducible 12-lead mV signals, WFDB records as PTB-XL stores them, the `fedecg sample` request,
and `sample_like`'s synthetic PTB-XL folder (fresh ids, only the conditioning, readable by the loader)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import wfdb

from common.bundle import build_generator
from common.config import DataConfig, from_dict
from common.data.dataset import load_dataset
from common.data.demographics import demographics_from_metadata
from common.data.metadata import read_metadata, read_metadata_table
from common.normalization import Normalizer
from common.generate import LIKE_COLUMNS, generate, grid_conditions, parse_labels, sample_like, sample_records, write_record
from common.model.denoiser import build_denoiser
from common.scp import SCP_CODES
from tests.fixtures_ptbxl import HEADER_LEADS, write_metadata

# Rows of the tiny fixture covering its quirks: age 300 (5), missing age (9), missing height (3, 6)
# and weight (4, 8), a patient with two records (1, 2), folds 1..10.
LIKE_IDS = [1, 2, 3, 4, 5, 6, 8, 9, 13, 40]


@pytest.fixture(scope="module")
def tiny_generator():
    cfg = from_dict({"model": {"size": "tiny"}, "diffusion": {"timesteps": 20, "sample_steps": 2}})
    torch.manual_seed(0)
    signals = np.random.default_rng(0).normal(0.0, 0.3, size=(4, 8, 1000)).astype(np.float32)
    return build_generator(cfg, build_denoiser(cfg.model).state_dict(), Normalizer.fit(signals), Path("tiny"))


def conditions(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    labels = np.stack([parse_labels(c, SCP_CODES) for c in ["NORM", "IMI,LVH", ""][:n]])
    demographics = np.array([[67.0, 1.0, np.nan, np.nan], [45.0, 0.0, 180.0, 80.0], [np.nan] * 4][:n])
    return labels, demographics, ~np.isnan(demographics)


def test_samples_are_twelve_lead_mv_reproducible_under_the_seed(tiny_generator):
    x = generate(tiny_generator, *conditions(3), seed=5, batch_size=2, progress=False)
    assert x.shape == (3, 12, 1000) and x.dtype == np.float32 and np.isfinite(x).all()
    assert np.array_equal(x, generate(tiny_generator, *conditions(3), seed=5, batch_size=2, progress=False))
    assert not np.allclose(x, generate(tiny_generator, *conditions(3), seed=6, batch_size=2, progress=False))
    i, ii, iii, avr, avl, avf = x[:, :6].astype(np.float64).transpose(1, 0, 2)  # limb leads derived from I and II
    np.testing.assert_allclose(iii, ii - i, atol=1e-5)
    np.testing.assert_allclose(avr, -(i + ii) / 2, atol=1e-5)
    np.testing.assert_allclose(avl, i - ii / 2, atol=1e-5)
    np.testing.assert_allclose(avf, ii - i / 2, atol=1e-5)
    labels, demographics, mask = conditions(3)
    with pytest.raises(ValueError, match=r"demographics and mask of shape \(3, 4\)"):
        generate(tiny_generator, labels, demographics[:2], mask[:2], progress=False)


def test_a_record_is_written_as_ptbxl_stores_it(tmp_path):
    x = np.random.default_rng(0).normal(0.0, 0.5, size=(12, 1000)).astype(np.float32)
    x[3, 10], x[4, 20] = 40.0, -40.0  # beyond 16 bits at 1000 units per mV: clipped, not wrapped
    write_record(tmp_path / "records100" / "r1", x)
    signal, fields = wfdb.rdsamp(str(tmp_path / "records100" / "r1"))
    assert fields["fs"] == 100 and fields["sig_len"] == 1000 and fields["units"] == ["mV"] * 12
    assert [n.upper() for n in fields["sig_name"]] == [n.upper() for n in HEADER_LEADS]
    header = wfdb.rdheader(str(tmp_path / "records100" / "r1"))
    assert header.fmt == ["16"] * 12 and header.adc_gain == [1000.0] * 12
    expected = x.T.astype(np.float64)
    expected[10, 3], expected[20, 4] = 32.767, -32.767
    np.testing.assert_allclose(signal, expected, atol=0.0005 + 1e-7)  # 1 uV steps


def test_labels_are_parsed_by_statement_code_and_unknown_codes_are_refused():
    vector = parse_labels(" IMI, LVH ,,", SCP_CODES)
    assert vector.shape == (71,) and vector.sum() == 2
    assert vector[SCP_CODES.index("IMI")] == 1 and vector[SCP_CODES.index("LVH")] == 1
    assert not parse_labels(None, SCP_CODES).any() and not parse_labels("", SCP_CODES).any()
    with pytest.raises(ValueError, match="unknown SCP statement 'MI'; valid statements: NDT, NST_"):
        parse_labels("IMI,MI", SCP_CODES)  # MI is a superclass, not a statement


def test_a_sample_request_writes_its_records_and_their_conditions(tiny_generator, tmp_path):
    table = sample_records(tiny_generator, SCP_CODES, tmp_path / "out", 2, labels="IMI", age=67, sex="female",
                           seed=1, progress=False)
    back = pd.read_csv(tmp_path / "out" / "conditions.csv", keep_default_na=False)
    assert back["record"].tolist() == ["records100/synthetic_00000", "records100/synthetic_00001"]
    assert back[["labels", "age", "sex", "height", "seed"]].values.tolist() == [["IMI", 67, "female", "", 1]] * 2
    assert table["record"].tolist() == back["record"].tolist() and (tmp_path / "out" / "samples.png").is_file()
    signal, _ = wfdb.rdsamp(str(tmp_path / "out" / "records100" / "synthetic_00001"))
    assert signal.shape == (1000, 12)
    with pytest.raises(ValueError, match="unknown SCP statement"):
        sample_records(tiny_generator, SCP_CODES, tmp_path / "bad", 1, labels="NOPE", progress=False)
    with pytest.raises(ValueError, match="sex='x'"):
        sample_records(tiny_generator, SCP_CODES, tmp_path / "bad", 1, sex="x", progress=False)
    assert not (tmp_path / "bad").exists()  # a bad request writes nothing


def test_progress_grid_conditions_are_fixed_and_cycle_through_common_statements():
    labels, ages, mask, titles = grid_conditions(SCP_CODES, 10)
    assert labels.shape == (10, 71) and (labels.sum(axis=1) == 1).all()
    assert labels[8].argmax() == labels[0].argmax() == SCP_CODES.index("NORM")
    assert titles[0] == "NORM, age 60, male" and titles[1] == "IMI, age 60, female"
    assert mask.tolist() == [[True, True, False, False]] * 10 and (ages[:, 0] == 60).all()
    again = grid_conditions(SCP_CODES, 10)
    assert np.array_equal(again[0], labels) and again[3] == titles


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


@pytest.mark.slow  # samples and writes a WFDB cohort
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


@pytest.mark.slow  # samples and writes a WFDB cohort
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


@pytest.mark.slow  # samples and writes a WFDB cohort
def test_the_loader_reads_the_folder_back(liked, tmp_path):
    _, meta, out = liked
    data = load_dataset(DataConfig(root=str(out), cache_dir=str(tmp_path / "cache")), progress=False)
    assert list(data.ecg_ids) == list(range(1, len(meta) + 1))
    assert list(data.patient_ids) == list(range(1, len(meta) + 1))
    assert data.signals.shape == (len(meta), 8, 1000) and np.isfinite(data.signals).all()
    assert (data.site == -1).all()
    for k in range(len(meta)):
        assert (out / "records100" / "00000" / f"{k + 1:05d}_lr.hea").is_file()
