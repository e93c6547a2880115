"""Every kind of bad PTB-XL input gives a DataError naming the record, the file and the fault, or is
skipped (and logged with its id) under data.on_bad_record=skip. Never a silently wrong array."""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from common.config import DataConfig
from common.data.dataset import load_dataset
from common.data.errors import DataError
from common.data.metadata import load_metadata, read_metadata
from tests.fixtures_ptbxl import HEADER_LEADS, TinyPtbxl, derive12, write_metadata, write_record


def config(tiny: TinyPtbxl, tmp_path: Path, on_bad_record: str = "error") -> DataConfig:
    return DataConfig(root=str(tiny.root), cache_dir=str(tmp_path / "cache"), on_bad_record=on_bad_record)


def lr(tiny: TinyPtbxl, ecg_id: int) -> Path:
    return tiny.root / tiny.row(ecg_id)["filename_lr"]


def missing_dat(tiny: TinyPtbxl) -> None:
    lr(tiny, 4).with_suffix(".dat").unlink()


def truncated_dat(tiny: TinyPtbxl) -> None:
    os.truncate(lr(tiny, 6).with_suffix(".dat"), 10000)


def truncated_dat_on_a_frame_boundary(tiny: TinyPtbxl) -> None:
    os.truncate(lr(tiny, 8).with_suffix(".dat"), 12000)  # 500 whole frames of 12 samples


def wrong_sampling_rate(tiny: TinyPtbxl) -> None:
    x250 = np.repeat(tiny.signals8[10].T, 5, axis=0)[::2]  # 10 s at 250 Hz
    write_record(lr(tiny, 10), derive12(x250), fs=250)


def unexpected_lead_names(tiny: TinyPtbxl) -> None:
    names = HEADER_LEADS[:-1] + ["X1"]
    write_record(lr(tiny, 11), derive12(tiny.signals8[11].T), fs=100, sig_name=names)


def nan_in_signal(tiny: TinyPtbxl) -> None:
    x = derive12(tiny.signals8[13].T)
    x[10, 8] = np.nan  # V3, sample 10
    write_record(lr(tiny, 13), x, fs=100)


def wrong_units(tiny: TinyPtbxl) -> None:
    write_record(lr(tiny, 14), derive12(tiny.signals8[14].T), fs=100, units="uV")


def row_without_record(tiny: TinyPtbxl) -> None:
    for ext in (".hea", ".dat"):
        lr(tiny, 20).with_suffix(ext).unlink()


def malformed_scp_codes(tiny: TinyPtbxl) -> None:
    tiny.rows[21]["scp_codes"] = "{'NORM': 100.0"  # ecg_id 22, cut off (tiny.rows is this test's copy)
    write_metadata(tiny.root, tiny.rows)


def unknown_scp_code(tiny: TinyPtbxl) -> None:
    tiny.rows[22]["scp_codes"] = {"NORMAL": 100.0}  # ecg_id 23
    write_metadata(tiny.root, tiny.rows)


CASES: list[tuple[Callable[[TinyPtbxl], None], int, str]] = [
    (missing_dat, 4, r"ecg_id 4: records100/00000/00004_lr: signal file records100/00000/00004_lr\.dat is missing"),
    (truncated_dat, 6, r"ecg_id 6: records100/00000/00006_lr: .*00006_lr\.dat is truncated: 10000 bytes, expected 24000"),
    (truncated_dat_on_a_frame_boundary, 8, r"ecg_id 8: .*00008_lr\.dat is truncated: 12000 bytes, expected 24000"),
    (wrong_sampling_rate, 10, r"ecg_id 10: records100/00000/00010_lr: sampling rate 250 Hz, expected 100 Hz"),
    (unexpected_lead_names, 11, r"ecg_id 11: records100/00000/00011_lr: unexpected lead names .*'X1'"),
    (nan_in_signal, 13, r"ecg_id 13: records100/00000/00013_lr: non-finite sample .* lead V3 at sample 10"),
    (wrong_units, 14, r"ecg_id 14: records100/00000/00014_lr: unexpected units \['uV'\]"),
    (row_without_record, 20, r"ecg_id 20: no record file: records100/00000/00020_lr\.hea nor records500/00000/00020_hr\.hea exists"),
    (malformed_scp_codes, 22, r"ecg_id 22: scp_codes is not a Python dict literal"),
    (unknown_scp_code, 23, r"ecg_id 23: scp_codes names unknown statement 'NORMAL'"),
]


@pytest.mark.parametrize("damage, ecg_id, message", CASES, ids=[c[0].__name__ for c in CASES])
def test_bad_input_is_a_clear_error(tiny_ptbxl, tmp_path, damage, ecg_id, message):
    damage(tiny_ptbxl)
    with pytest.raises(DataError, match=message) as info:
        load_dataset(config(tiny_ptbxl, tmp_path), progress=False)
    assert "on_bad_record=skip" in str(info.value)  # says how to proceed


@pytest.mark.parametrize("damage, ecg_id, message", CASES, ids=[c[0].__name__ for c in CASES])
def test_bad_input_is_skipped_and_logged_on_request(tiny_ptbxl, tmp_path, caplog, damage, ecg_id, message):
    damage(tiny_ptbxl)
    with caplog.at_level(logging.WARNING, logger="common.data"):
        ds = load_dataset(config(tiny_ptbxl, tmp_path, on_bad_record="skip"), progress=False)
    assert ecg_id not in ds.ecg_ids.tolist() and len(ds) == 39
    assert f"skipped 1 bad record(s)" in caplog.text and f"[{ecg_id}]" in caplog.text
    # The good records are untouched.
    for i, kept in enumerate(ds.ecg_ids):
        np.testing.assert_allclose(ds.signals[i], tiny_ptbxl.signals8[int(kept)], atol=1e-6)


def test_skip_collects_every_bad_record_and_the_warm_load_reports_them_again(tiny_ptbxl, tmp_path, caplog):
    for damage, _, _ in CASES:
        damage(tiny_ptbxl)
    bad = {ecg_id for _, ecg_id, _ in CASES}
    cfg = config(tiny_ptbxl, tmp_path, on_bad_record="skip")
    with caplog.at_level(logging.WARNING, logger="common.data"):
        ds = load_dataset(cfg, progress=False)
        assert set(ds.ecg_ids.tolist()) == set(range(1, 41)) - bad
        caplog.clear()
        again = load_dataset(cfg, progress=False)
    assert np.array_equal(again.ecg_ids, ds.ecg_ids)
    record_level = sorted(bad - {22, 23})  # the two metadata faults are dropped when the table is read
    assert f"skipped {len(record_level)} bad record(s)" in caplog.text and str(record_level) in caplog.text
    # Asking for a skipped record by id: it is simply absent from the result (and logged).
    subset = load_dataset(cfg, ecg_ids=[3, 6, 2], progress=False)
    assert subset.ecg_ids.tolist() == [3, 2]


def test_table_level_faults(tiny_ptbxl, tmp_path):
    table = tiny_ptbxl.root / "ptbxl_database.csv"
    rows = list(csv.reader(table.open()))
    rows[3][0] = rows[2][0]  # duplicate ecg_id
    with table.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    with pytest.raises(DataError, match="duplicate ecg_id"):
        read_metadata(tiny_ptbxl.root)
    with table.open("w", newline="") as handle:
        csv.writer(handle).writerows([[c for j, c in enumerate(r) if j != rows[0].index("strat_fold")] for r in rows])
    with pytest.raises(DataError, match=r"missing columns \['strat_fold'\]"):
        read_metadata(tiny_ptbxl.root)
    statements = tiny_ptbxl.root / "scp_statements.csv"
    lines = statements.read_text().splitlines()
    statements.write_text("\n".join(lines[:-1]) + "\n")  # drop the last statement
    with pytest.raises(DataError, match=r"differ from PTB-XL's 71 \(unknown \[\], missing \['TRIGU'\]\)"):
        read_metadata(tiny_ptbxl.root)


def test_bad_on_bad_record_value_and_bad_max_records(tiny_ptbxl, tmp_path):
    rows = [dict(r) for r in tiny_ptbxl.rows]
    rows[0]["sex"] = 2
    write_metadata(tiny_ptbxl.root, rows)
    with pytest.raises(DataError, match=r"ecg_id 1: sex is not 0 \(male\) or 1 \(female\)"):
        read_metadata(tiny_ptbxl.root)
    with pytest.raises(DataError, match="max_records=0"):
        load_metadata(DataConfig(root=str(tiny_ptbxl.root), max_records=0, on_bad_record="skip"))
