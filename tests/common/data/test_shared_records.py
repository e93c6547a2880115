"""The data layer on the real PTB-XL subset in ../shared/ptb-xl (skipped when it is absent)."""

from __future__ import annotations

import ast
import csv
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import wfdb

from common.config import DataConfig, PartitionConfig
from common.data.partition import make_partition
from common.data.dataset import ECGDataset, load_dataset
from common.data.labels import SCP_SUPERCLASS, SUPERCLASSES
from common.data.leads import MODEL_LEADS
from common.data.metadata import read_metadata
from common.scp import SCP_CODES

pytestmark = [pytest.mark.shared_data, pytest.mark.slow]
SUBSET = 400  # the first records by ecg_id: a ~2 s cold load


def raw_rows(root: Path) -> dict[int, dict[str, str]]:
    with (root / "ptbxl_database.csv").open(newline="") as handle:
        return {int(row["ecg_id"]): row for row in csv.DictReader(handle)}


@pytest.fixture(scope="module")
def real(shared_ptbxl: Path, tmp_path_factory: pytest.TempPathFactory) -> ECGDataset:
    ids = sorted(raw_rows(shared_ptbxl))[:SUBSET]
    cfg = DataConfig(root=str(shared_ptbxl), cache_dir=str(tmp_path_factory.mktemp("cache")))
    return load_dataset(cfg, ecg_ids=ids, progress=False)


def test_a_known_sample_of_a_known_record(real, shared_ptbxl):
    ds = real.subset([2])
    v1 = MODEL_LEADS.index("V1")
    own = wfdb.rdrecord(str(shared_ptbxl / "records100/00000/00002_lr")).p_signal  # [1000, 12]
    assert ds.signals[0, v1, 500] == pytest.approx(own[500, 6], abs=1e-6)
    assert ds.signals[0, v1, 500] == pytest.approx(0.331, abs=1e-6)  # looked up once in 00002_lr.dat
    assert ds.signals[0, MODEL_LEADS.index("II"), 0] == pytest.approx(0.138, abs=1e-6)


def test_derived_leads_match_the_files_own_limb_leads(real, shared_ptbxl):
    derived = real.signals12()
    worst = []
    for i, ecg_id in enumerate(real.ecg_ids):
        own = wfdb.rdrecord(str(shared_ptbxl / real.meta.loc[ecg_id, "filename_lr"])).p_signal.T
        np.testing.assert_allclose(derived[i][[0, 1, 6, 7, 8, 9, 10, 11]], own[[0, 1, 6, 7, 8, 9, 10, 11]], atol=1e-6)
        worst.append(np.abs(derived[i] - own).max(axis=1))
    worst = np.array(worst)  # [records, 12]
    # Each stored lead is rounded to 0.001 mV, so a derived lead may differ by up to 1.5 steps. A handful of
    # PTB-XL records (~0.4% of the subset) carry local inconsistencies in the source files themselves.
    within = (worst <= 0.0015 + 1e-6).all(axis=1)  # 1e-6: float32 storage of the 8 leads
    assert within.mean() >= 0.99, real.ecg_ids[~within]
    typical = np.median(worst[:, 2:6], axis=0)  # III, aVR: within one step; aVL, aVF (halves of II/I): 1.5
    assert (typical <= np.array([0.001, 0.001, 0.0015, 0.0015]) + 1e-6).all(), typical


def test_label_vectors_match_scp_codes(real, shared_ptbxl):
    rows = raw_rows(shared_ptbxl)
    for i, ecg_id in enumerate(real.ecg_ids):
        codes = ast.literal_eval(rows[int(ecg_id)]["scp_codes"])
        assert {SCP_CODES[j] for j in np.flatnonzero(real.labels[i])} == set(codes)
        expected = {SCP_SUPERCLASS[c] for c in codes if c in SCP_SUPERCLASS}
        assert {SUPERCLASSES[j] for j in np.flatnonzero(real.superclasses[i])} == expected
    assert real.labels[:, SCP_CODES.index("SR")].sum() > SUBSET / 2  # sinus rhythm dominates


def test_demographics_of_the_real_data(shared_ptbxl, tmp_path):
    rows = raw_rows(shared_ptbxl)
    over_89 = sorted(i for i, r in rows.items() if r["age"] == "300.0")[:3]
    assert over_89
    ds = load_dataset(DataConfig(root=str(shared_ptbxl), cache_dir=str(tmp_path)), ecg_ids=over_89, progress=False)
    assert (ds.demographics[:, 0] == 90.0).all() and ds.demographics_mask[:, 0].all()
    for i, ecg_id in enumerate(ds.ecg_ids):
        row = rows[int(ecg_id)]
        assert ds.demographics[i, 1] == float(row["sex"])
        assert ds.demographics_mask[i, 2] == (row["height"] != "")


@pytest.mark.parametrize("scheme", ["site", "iid", "dirichlet", "age"])
def test_every_scheme_is_patient_disjoint_and_deterministic_on_the_real_data(shared_ptbxl, scheme):
    meta = read_metadata(shared_ptbxl)
    cfg = PartitionConfig(scheme=scheme, num_sites=3, train_folds=(1, 2, 3, 4, 5, 6, 7), val_folds=(8,),
                          test_folds=(9,), seed=11)
    partition = make_partition(meta, cfg)
    owner: dict[int, str] = {}
    for name, ids in [(s.name, s.ids) for s in partition.sites] + [("val", partition.val_ids), ("test", partition.test_ids)]:
        for patient in set(meta.loc[list(ids), "patient_id"]):
            assert owner.setdefault(patient, name) == name, f"patient {patient} in {owner[patient]} and {name}"
    assert set(meta.loc[list(partition.test_ids), "strat_fold"]) == {9}
    assert make_partition(meta, cfg).to_json() == partition.to_json()
    assert make_partition(meta, dataclasses.replace(cfg, seed=12)).to_json() != partition.to_json()  # seeded splits
