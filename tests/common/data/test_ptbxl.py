"""PTB-XL reading on the tiny fixture: location, metadata, labels, demographics, leads, cache."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import wfdb

from common.config import DataConfig
from common.data import cache, records
from common.data.dataset import load_dataset
from common.data.demographics import demographics_from_request, encode_demographics
from common.data.errors import DataError
from common.data.labels import SUPERCLASSES
from common.data.leads import derive_leads, select_model_leads
from common.data.metadata import read_metadata, read_scp_statements, resolve_root
from common.scp import SCP_CODES
from tests.fixtures_ptbxl import TinyPtbxl, derive12, make_tiny_ptbxl, scp_rows, write_metadata, write_record


def config(tiny: TinyPtbxl, tmp_path: Path, **overrides: object) -> DataConfig:
    return DataConfig(root=str(tiny.root), cache_dir=str(tmp_path / "cache"), **overrides)


def expected_superclasses(codes: dict[str, float]) -> set[str]:
    # From the fixture's own statement table, independent of the loader's constant.
    table = {code: cls for code, kinds, cls, _ in scp_rows() if "d" in kinds}
    return {table[c] for c in codes if c in table}


# -- location ---------------------------------------------------------------------------------------


def test_resolve_root_uses_config_then_env_and_names_ptbxl_dir(tiny_ptbxl, tmp_path, monkeypatch):
    monkeypatch.delenv("PTBXL_DIR", raising=False)
    with pytest.raises(DataError, match="PTBXL_DIR"):
        resolve_root(DataConfig())
    monkeypatch.setenv("PTBXL_DIR", str(tiny_ptbxl.root))
    assert resolve_root(DataConfig()) == tiny_ptbxl.root.resolve()

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no ptbxl_database.csv"):
        resolve_root(DataConfig(root=str(empty)))
    monkeypatch.setenv("PTBXL_DIR", str(empty))
    with pytest.raises(DataError, match="PTBXL_DIR=.*no ptbxl_database.csv"):
        resolve_root(DataConfig())
    assert resolve_root(DataConfig(root=str(tiny_ptbxl.root))) == tiny_ptbxl.root.resolve()


# -- metadata and labels ----------------------------------------------------------------------------


def test_read_metadata_parses_scp_codes_and_keeps_rows(tiny_ptbxl):
    meta = read_metadata(tiny_ptbxl.root)
    assert meta.index.tolist() == list(range(1, 41))
    assert meta["patient_id"].dtype == np.int64
    for row in tiny_ptbxl.rows:
        assert meta.loc[row["ecg_id"], "scp_codes"] == row["scp_codes"]
        assert set(meta.loc[row["ecg_id"], "superclasses"]) == expected_superclasses(row["scp_codes"])
    assert meta.loc[5, "age"] == 300.0  # the table keeps PTB-XL's code; demographics map it


def test_labels_are_multi_hot_in_scp_statements_order_any_likelihood(tiny_ptbxl, tmp_path):
    ds = load_dataset(config(tiny_ptbxl, tmp_path), progress=False)
    assert ds.codes == SCP_CODES == tuple(code for code, *_ in scp_rows())
    for i, ecg_id in enumerate(ds.ecg_ids):
        codes = tiny_ptbxl.row(int(ecg_id))["scp_codes"]
        assert {ds.codes[j] for j in np.flatnonzero(ds.labels[i])} == set(codes)
        assert {SUPERCLASSES[j] for j in np.flatnonzero(ds.superclasses[i])} == expected_superclasses(codes)
    # {'IMI': 50, 'ABQRS': 0, 'SR': 0}: likelihood 0 still counts; IMI is a myocardial infarction.
    row = ds.subset([1])
    assert row.labels[0, SCP_CODES.index("SR")] == 1 and row.labels[0, SCP_CODES.index("ABQRS")] == 1
    assert row.superclasses[0].tolist() == [0, 1, 0, 0, 0]


# -- demographics -----------------------------------------------------------------------------------


def test_demographics_values_and_presence_mask(tiny_ptbxl, tmp_path):
    ds = load_dataset(config(tiny_ptbxl, tmp_path), progress=False)
    by_id = {int(e): i for i, e in enumerate(ds.ecg_ids)}
    assert ds.demographics.dtype == np.float32 and ds.demographics_mask.dtype == bool
    assert ds.demographics[by_id[5], 0] == 90.0 and ds.demographics_mask[by_id[5], 0]  # age 300 -> 90
    assert np.isnan(ds.demographics[by_id[9], 0]) and not ds.demographics_mask[by_id[9], 0]
    for row in tiny_ptbxl.rows:
        i = by_id[row["ecg_id"]]
        for col, name in ((2, "height"), (3, "weight")):
            assert ds.demographics_mask[i, col] == (row[name] is not None)
            if row[name] is not None:
                assert ds.demographics[i, col] == row[name]
        assert ds.demographics[i, 1] == row["sex"]
        assert ds.site[i] == (-1 if row["site"] is None else row["site"])
    assert (ds.site == -1).sum() == 1
    assert np.array_equal(ds.demographics_mask, ~np.isnan(ds.demographics))


def test_encode_demographics_standardizes_zeroes_missing_and_appends_presence_bits():
    values = np.array([[60.0, 1.0, 167.0, np.nan], [77.0, 0.0, np.nan, 100.0]])
    mask = ~np.isnan(values)
    encoded = encode_demographics(values, mask)
    assert encoded.dtype == np.float32 and encoded.shape == (2, 8)
    np.testing.assert_allclose(encoded[0], [0, 1, 0, 0, 1, 1, 1, 0])
    np.testing.assert_allclose(encoded[1], [1, -1, 0, 2, 1, 1, 0, 1])
    # A value present in `values` but marked missing is ignored, not leaked.
    hidden = encode_demographics(np.array([[80.0, 1.0, 180.0, 90.0]]), np.array([[True, False, False, False]]))
    np.testing.assert_allclose(hidden[0], [20 / 17, 0, 0, 0, 1, 0, 0, 0], rtol=1e-6)
    with pytest.raises(ValueError, match="weight of row 0 is NaN but marked present"):
        encode_demographics(values, np.ones_like(mask))
    with pytest.raises(ValueError, match=r"shape \[N, 4\]"):
        encode_demographics(values[:, :3], mask[:, :3])


def test_demographics_from_request_accepts_names_and_codes_and_refuses_nonsense():
    values, present = demographics_from_request(age=95, sex="Female", weight=70)
    assert values.tolist()[:2] == [90.0, 1.0] and np.isnan(values[2]) and values[3] == 70.0
    assert present.tolist() == [True, True, False, True]
    assert demographics_from_request(sex="male")[0][1] == 0.0
    assert demographics_from_request(sex="m")[0][1] == 0.0
    assert demographics_from_request(sex=1)[0][1] == 1.0
    nothing_values, nothing = demographics_from_request()
    assert not nothing.any()
    assert not encode_demographics(nothing_values[None], nothing[None]).any()  # all zeros = nothing known
    for bad, message in (({"sex": "x"}, "sex='x'"), ({"sex": 2}, "sex=2"), ({"age": -3}, "age=-3"),
                         ({"height": 900}, "height=900"), ({"weight": float("nan")}, "weight=nan"),
                         ({"age": "sixty"}, "age='sixty'")):
        with pytest.raises(ValueError, match=message):
            demographics_from_request(**bad)


# -- leads ------------------------------------------------------------------------------------------


def test_derive_leads_is_exact_for_numpy_and_torch():
    rng = np.random.default_rng(0)
    x8 = rng.normal(size=(3, 8, 50))
    x12 = derive_leads(x8)
    assert x12.shape == (3, 12, 50)
    expected = np.stack([derive12(x.T).T for x in x8])
    np.testing.assert_array_equal(x12, expected)
    np.testing.assert_array_equal(select_model_leads(x12), x8)

    t12 = derive_leads(torch.from_numpy(x8))
    assert isinstance(t12, torch.Tensor)
    np.testing.assert_array_equal(t12.numpy(), expected)
    t32 = derive_leads(torch.from_numpy(x8).float())
    assert t32.dtype == torch.float32
    single = derive_leads(x8[0])  # [8, L] works too
    np.testing.assert_array_equal(single, expected[0])
    with pytest.raises(ValueError, match=r"\[\.\.\., 8, L\]"):
        derive_leads(rng.normal(size=(2, 12, 10)))


# -- dataset ----------------------------------------------------------------------------------------


def test_load_dataset_returns_the_written_signals_and_derives_the_files_own_leads(tiny_ptbxl, tmp_path):
    ds = load_dataset(config(tiny_ptbxl, tmp_path), progress=False)
    assert len(ds) == 40
    assert ds.ecg_ids.dtype == np.int64 and ds.patient_ids.dtype == np.int64
    assert ds.signals.shape == (40, 8, 1000) and ds.signals.dtype == np.float32
    assert ds.labels.shape == (40, 71) and ds.superclasses.shape == (40, 5)
    assert ds.strat_fold.tolist() == [r["strat_fold"] for r in tiny_ptbxl.rows]
    assert ds.meta.index.tolist() == ds.ecg_ids.tolist()
    for i, ecg_id in enumerate(ds.ecg_ids):
        np.testing.assert_allclose(ds.signals[i], tiny_ptbxl.signals8[int(ecg_id)], atol=1e-6)
    # The 12 leads derived from the 8 agree with the file's own III, aVR, aVL, aVF to its 0.001 mV quantization.
    x12 = ds.signals12()
    for i in (0, 17, 39):
        own = wfdb.rdrecord(str(tiny_ptbxl.record_base(int(ds.ecg_ids[i])))).p_signal.T
        assert np.abs(x12[i] - own).max() <= 0.0005 + 1e-6


def test_subset_and_ecg_ids_keep_the_requested_order(tiny_ptbxl, tmp_path):
    cfg = config(tiny_ptbxl, tmp_path)
    ds = load_dataset(cfg, ecg_ids=[7, 3, 12], progress=False)
    assert ds.ecg_ids.tolist() == [7, 3, 12] and ds.meta.index.tolist() == [7, 3, 12]
    np.testing.assert_allclose(ds.signals[0], tiny_ptbxl.signals8[7], atol=1e-6)
    part = ds.subset([12, 7])
    assert part.ecg_ids.tolist() == [12, 7] and part.patient_ids.tolist() == [ds.patient_ids[2], ds.patient_ids[0]]
    with pytest.raises(DataError, match=r"not available: \[99\]"):
        ds.subset([99])
    with pytest.raises(DataError, match="duplicate ecg_ids"):
        ds.subset([7, 7])
    with pytest.raises(DataError, match=r"not available: \[99\]"):
        load_dataset(cfg, ecg_ids=[1, 99], progress=False)
    limited = config(tiny_ptbxl, tmp_path, max_records=10)
    assert load_dataset(limited, progress=False).ecg_ids.tolist() == list(range(1, 11))
    with pytest.raises(DataError, match="max_records=10"):
        load_dataset(limited, ecg_ids=[20], progress=False)


def test_record_only_at_500_hz_is_resampled_to_100_hz(tmp_path):
    tiny = make_tiny_ptbxl(tmp_path / "ptb-xl", hr_only_ids=(7,))
    assert not (tiny.root / tiny.row(7)["filename_lr"]).with_suffix(".hea").exists()
    ds = load_dataset(config(tiny, tmp_path), ecg_ids=[6, 7], progress=False)
    assert ds.signals.shape == (2, 8, 1000)
    # Band-limited content (< 20 Hz) survives 500 -> 100 Hz; the ends carry the filter's edge effects.
    np.testing.assert_allclose(ds.signals[1][:, 50:-50], tiny.signals8[7][:, 50:-50], atol=0.01)


# -- cache ------------------------------------------------------------------------------------------


def count_record_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    reads: list[str] = []
    real = records._read_record

    def counting(root, column, rel, target_rate):
        reads.append(rel)
        return real(root, column, rel, target_rate)

    monkeypatch.setattr(records, "_read_record", counting)
    return reads


def test_warm_load_comes_from_the_cache(tiny_ptbxl, tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "_RACY_SECONDS", 0.0)  # key by file times only, as for files not just written
    reads = count_record_reads(monkeypatch)
    cfg = config(tiny_ptbxl, tmp_path)
    cold = load_dataset(cfg, progress=False)
    assert len(reads) == 40
    warm = load_dataset(cfg, progress=False)
    assert len(reads) == 40
    assert np.array_equal(cold.signals, warm.signals) and np.array_equal(cold.labels, warm.labels)
    cache_files = list((tmp_path / "cache").glob("*.npz"))
    assert len(cache_files) == 1
    with np.load(cache_files[0], allow_pickle=False) as data:  # plain arrays, no pickles
        assert data["signals"].shape == (40, 8, 1000)
    load_dataset(cfg, ecg_ids=[1, 2], progress=False)  # another selection has its own key
    assert len(reads) == 42


@pytest.mark.parametrize("racy_seconds", [0.0, cache._RACY_SECONDS])
def test_record_changed_in_place_invalidates_the_cache(tiny_ptbxl, tmp_path, monkeypatch, racy_seconds):
    monkeypatch.setattr(cache, "_RACY_SECONDS", racy_seconds)
    reads = count_record_reads(monkeypatch)
    cfg = config(tiny_ptbxl, tmp_path)
    before = load_dataset(cfg, progress=False)
    base = tiny_ptbxl.record_base(12)
    dat = base.with_suffix(".dat")
    old = os.stat(dat)
    # Same size, same mtime: only the contents change (e.g. a restore that keeps timestamps).
    new8 = np.round(tiny_ptbxl.signals8[12].T * -0.5, 3)
    write_record(base, derive12(new8), fs=100)
    os.utime(dat, ns=(old.st_atime_ns, old.st_mtime_ns))
    assert os.stat(dat).st_size == old.st_size and os.stat(dat).st_mtime_ns == old.st_mtime_ns
    after = load_dataset(cfg, progress=False)
    assert len(reads) == 80
    row = after.ecg_ids.tolist().index(12)
    np.testing.assert_allclose(after.signals[row], new8.T, atol=1e-6)
    assert not np.allclose(before.signals[row], after.signals[row])


def test_metadata_change_invalidates_the_cache(tiny_ptbxl, tmp_path, monkeypatch):
    reads = count_record_reads(monkeypatch)
    cfg = config(tiny_ptbxl, tmp_path)
    load_dataset(cfg, progress=False)
    rows = [dict(r) for r in tiny_ptbxl.rows]
    rows[0]["scp_codes"] = {"CLBBB": 100.0}
    write_metadata(tiny_ptbxl.root, rows)
    changed = load_dataset(cfg, progress=False)
    assert len(reads) == 80
    assert changed.labels[0, SCP_CODES.index("CLBBB")] == 1 and changed.labels[0].sum() == 1


def test_a_damaged_cache_file_is_rebuilt_not_trusted(tiny_ptbxl, tmp_path, monkeypatch, caplog):
    reads = count_record_reads(monkeypatch)
    cfg = config(tiny_ptbxl, tmp_path)
    good = load_dataset(cfg, ecg_ids=[1, 2, 3], progress=False)
    (cache_file,) = (tmp_path / "cache").glob("*.npz")
    cache_file.write_bytes(cache_file.read_bytes()[:100])
    again = load_dataset(cfg, ecg_ids=[1, 2, 3], progress=False)
    assert len(reads) == 6 and np.array_equal(good.signals, again.signals)
    assert "unreadable cache file" in caplog.text


def test_the_statement_table_built_without_data_is_accepted_and_matches_the_real_one(tmp_path, monkeypatch):
    import tests.fixtures_ptbxl as fixtures

    real = fixtures.SHARED_PTBXL / "scp_statements.csv"
    monkeypatch.setattr(fixtures, "SHARED_PTBXL", tmp_path / "absent")  # as on a machine without the data
    fixtures.write_scp_statements(tmp_path)
    built = read_scp_statements(tmp_path)
    assert tuple(built.index) == SCP_CODES
    if real.is_file():
        official = read_scp_statements(real.parent)
        for column in ("diagnostic", "form", "rhythm", "diagnostic_class", "diagnostic_subclass"):
            assert built[column].fillna("").astype(str).tolist() == official[column].fillna("").astype(str).tolist()
