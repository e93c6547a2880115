"""Simulated hospitals: every scheme is patient-disjoint, fold-respecting, deterministic, and round-trips as JSON."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from common.config import PartitionConfig
from common.data.labels import SUPERCLASSES
from common.data.metadata import read_metadata
from common.data.partition import make_partition, training_ids
from common.data.partition_types import Partition, PartitionError
from common.data.patient_choice import local_split as _local_split
from common.data.patient_choice import one_record_per_patient

SCHEMES = ["site", "iid", "dirichlet", "age"]
CODE_MENU = [{"NORM": 100.0}, {"IMI": 100.0}, {"NDT": 100.0}, {"CLBBB": 100.0}, {"LVH": 100.0}, {"SR": 0.0},
             {"IMI": 50.0, "LVH": 100.0}]
SUPER_OF = {"NORM": "NORM", "IMI": "MI", "NDT": "STTC", "CLBBB": "CD", "LVH": "HYP"}


def synthetic_meta(n_patients: int = 600, seed: int = 0) -> pd.DataFrame:
    """A metadata table shaped like read_metadata's, no signals: skewed sites, 1-3 records per patient,
    patient-level folds 1..10, ages incl. 300 and missing, one patient spanning a train and a test fold."""
    rng = np.random.default_rng(seed)
    rows = []
    ecg_id = 0
    site_values = np.array([0, 1, 2, 3, 4, 5, 7, 9])
    site_p = np.array([0.4, 0.25, 0.15, 0.1, 0.04, 0.03, 0.02, 0.01])
    for patient in range(n_patients):
        fold = int(rng.integers(1, 11))
        site = float(rng.choice(site_values, p=site_p))
        age = float(rng.integers(18, 95))
        count = int(rng.choice([1, 1, 1, 2, 3]))
        if patient == 7:
            fold, count = 2, 2  # a training fold, then fold 10 below
        for k in range(count):
            ecg_id += int(rng.integers(1, 4))
            codes = CODE_MENU[int(rng.integers(len(CODE_MENU)))]
            rows.append({
                "ecg_id": ecg_id, "patient_id": 10_000 + patient, "age": age + k,
                "sex": float(patient % 2), "height": np.nan, "weight": 70.0,
                "site": site if rng.random() > 0.1 else float(rng.choice(site_values)),  # some patients span sites
                "scp_codes": codes, "strat_fold": fold if patient != 7 or k == 0 else 10,
                "superclasses": tuple(c for c in SUPERCLASSES if c in {SUPER_OF.get(x) for x in codes}),
            })
    meta = pd.DataFrame(rows).set_index("ecg_id")
    meta.loc[meta.index[:3], "age"] = 300.0
    meta.loc[meta.index[5], "age"] = np.nan
    meta.loc[meta.index[6], "site"] = np.nan
    return meta


@pytest.fixture(scope="module")
def meta() -> pd.DataFrame:
    return synthetic_meta()


def cfg_for(scheme: str, **changes: object) -> PartitionConfig:
    base = PartitionConfig(scheme=scheme, num_sites=3, alpha=1.0, seed=3)
    if scheme == "age":
        base = dataclasses.replace(base, age_bands=(45.0, 65.0))
    return dataclasses.replace(base, **changes)


def check_invariants(partition: Partition, meta: pd.DataFrame, cfg: PartitionConfig) -> None:
    patient = meta["patient_id"]
    fold = meta["strat_fold"]
    holders = {s.name: set(s.train_ids) | set(s.val_ids) for s in partition.sites}
    holders["validation"] = set(partition.val_ids)
    holders["test"] = set(partition.test_ids)
    patients = {name: set(patient.loc[sorted(ids)]) for name, ids in holders.items()}
    names = list(holders)
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            assert not holders[names[a]] & holders[names[b]], (names[a], names[b])
            assert not patients[names[a]] & patients[names[b]], f"patient in {names[a]} and {names[b]}"
    for site in partition.sites:
        assert site.train_ids, site.name
        assert set(fold.loc[list(site.ids)]) <= set(cfg.train_folds)
        assert not set(patient.loc[list(site.train_ids)]) & set(patient.loc[list(site.val_ids)])
        assert list(site.train_ids) == sorted(site.train_ids)
    assert set(fold.loc[list(partition.val_ids)]) <= set(cfg.val_folds)
    assert set(fold.loc[list(partition.test_ids)]) <= set(cfg.test_folds)
    test_fold_records = set(meta.index[fold.isin(cfg.test_folds)])
    assert test_fold_records == set(partition.test_ids)  # every test record is kept out, none leaks into a site


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_scheme_is_patient_disjoint_and_respects_folds(meta, scheme):
    cfg = cfg_for(scheme)
    partition = make_partition(meta, cfg)
    check_invariants(partition, meta, cfg)
    assert len(partition.sites) == 3


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_scheme_on_the_tiny_fixture_keeps_fold_10_out_of_every_site(tiny_ptbxl, scheme):
    meta = read_metadata(tiny_ptbxl.root)
    assert 10 in set(meta["strat_fold"])
    cfg = cfg_for(scheme, local_val_fraction=0.2)
    partition = make_partition(meta, cfg)
    check_invariants(partition, meta, cfg)
    fold10 = set(meta.index[meta["strat_fold"] == 10])
    assert fold10 and fold10 == set(partition.test_ids)
    for site in partition.sites:
        assert not fold10 & set(site.ids)
    assert set(partition.val_ids) == set(meta.index[meta["strat_fold"] == 9])


def test_patient_spanning_folds_goes_wholly_to_the_test_set(meta):
    # Patient 10007 has a record in a training fold and one in fold 10.
    records = meta.index[meta["patient_id"] == 10_007]
    assert len(set(meta.loc[records, "strat_fold"])) == 2
    partition = make_partition(meta, cfg_for("iid"))
    in_sites = {i for s in partition.sites for i in s.ids}
    assert not set(records) & in_sites
    assert set(records) & set(partition.test_ids)
    assert 10_007 not in set(meta.loc[training_ids(meta, cfg_for("iid")), "patient_id"])


@pytest.mark.parametrize("scheme", SCHEMES)
def test_partitions_are_deterministic_and_independent_of_row_order(meta, scheme):
    cfg = cfg_for(scheme)
    first = make_partition(meta, cfg)
    shuffled = meta.sample(frac=1.0, random_state=5)
    assert make_partition(shuffled, cfg).to_json() == first.to_json()
    if scheme in ("iid", "dirichlet"):
        other = make_partition(meta, dataclasses.replace(cfg, seed=cfg.seed + 1))
        assert other.sites[0].train_ids != first.sites[0].train_ids


def test_site_scheme_takes_the_largest_sites_and_decides_by_the_first_record(tiny_ptbxl):
    meta = read_metadata(tiny_ptbxl.root)
    partition = make_partition(meta, cfg_for("site", num_sites=3))
    assert partition.site_names == ["site-0", "site-1", "site-2"]
    # Patient 1002 has records 5 (site 0) and 6 (site 1): both go with the first record to site-0.
    assert meta.loc[5, "site"] == 0 and meta.loc[6, "site"] == 1
    assert {5, 6} <= set(partition.site("site-0").ids)
    dropped = partition.left_out["outside the largest sites"]
    assert dropped == sum(
        1 for i in meta.index if meta.loc[i, "strat_fold"] <= 8 and not (meta.loc[i, "site"] in (0, 1, 2))
    )
    merged = make_partition(meta, cfg_for("site", num_sites=3, rest="merge"))
    assert merged.site_names == ["site-0", "site-1", "site-2", "site-rest"]
    rest_sites = set(meta.loc[list(merged.site("site-rest").ids), "site"].fillna(-1))
    assert rest_sites and rest_sites <= {3.0, -1.0}
    with pytest.raises(PartitionError, match=r"num_sites=5 but only 4 recording site\(s\)"):
        make_partition(meta, cfg_for("site", num_sites=5))


def test_iid_sites_have_equal_sizes(meta):
    partition = make_partition(meta, cfg_for("iid", num_sites=4, local_val_fraction=0.0))
    sizes = [len(s.train_ids) for s in partition.sites]
    assert max(sizes) - min(sizes) <= 3  # at most one patient's records apart


def label_skew(partition: Partition, meta: pd.DataFrame) -> float:
    """Mean total-variation distance between each site's superclass mix and the pooled mix."""
    def mix(ids: tuple[int, ...]) -> np.ndarray:
        counts = np.array([sum(c in s for s in meta.loc[list(ids), "superclasses"]) for c in SUPERCLASSES], float)
        return counts / counts.sum()
    pooled = mix(partition.train_ids())
    return float(np.mean([0.5 * np.abs(mix(s.train_ids) - pooled).sum() for s in partition.sites]))


def test_dirichlet_concentration_controls_label_skew(meta):
    skewed = label_skew(make_partition(meta, cfg_for("dirichlet", alpha=0.1)), meta)
    even = label_skew(make_partition(meta, cfg_for("dirichlet", alpha=1000.0)), meta)
    assert skewed > 0.2 > 0.05 > even


def test_dirichlet_that_cannot_fill_every_site_says_so(tiny_ptbxl):
    meta = read_metadata(tiny_ptbxl.root)
    with pytest.raises(PartitionError, match="raise alpha or lower num_sites"):
        make_partition(meta, cfg_for("dirichlet", num_sites=20, alpha=0.01))


def test_age_scheme_bands_patients_by_their_first_record(meta):
    cfg = cfg_for("age")
    partition = make_partition(meta, cfg)
    assert partition.site_names == ["age-under45", "age-45to65", "age-65plus"]
    ages = meta["age"].replace(300.0, 90.0)
    bounds = [(-np.inf, 45), (45, 65), (65, np.inf)]
    for site, (low, high) in zip(partition.sites, bounds):
        site_meta = meta.loc[list(site.ids)]
        first_ids = site_meta.reset_index().sort_values("ecg_id").drop_duplicates("patient_id")["ecg_id"]
        assert all(low <= ages.loc[i] < high for i in first_ids)
    assert partition.left_out.get("age missing", 0) >= 0
    with pytest.raises(PartitionError, match=r"num_sites=4 but age_bands \[45.0, 65.0\] make 3 bands"):
        make_partition(meta, cfg_for("age", num_sites=4))
    with pytest.raises(PartitionError, match="strictly increasing"):
        make_partition(meta, cfg_for("age", age_bands=(65.0, 45.0)))


def test_local_validation_share_is_whole_patients(meta):
    partition = make_partition(meta, cfg_for("iid", local_val_fraction=0.2))
    pooled_val = pooled = 0
    for site in partition.sites:
        train_p = set(meta.loc[list(site.train_ids), "patient_id"])
        val_p = set(meta.loc[list(site.val_ids), "patient_id"])
        assert not train_p & val_p
        # Each patient is drawn independently (keyed hash), so the share is binomial around 0.2
        # (~150 patients per site: sd ~0.03).
        assert abs(len(val_p) / (len(val_p) + len(train_p)) - 0.2) < 0.1
        pooled_val += len(val_p)
        pooled += len(val_p) + len(train_p)
    assert abs(pooled_val / pooled - 0.2) < 0.06
    none = make_partition(meta, cfg_for("iid", local_val_fraction=0.0))
    assert all(not s.val_ids for s in none.sites)


def test_config_errors_name_the_setting(meta):
    for changes, message in (
        ({"val_folds": (8,)}, "train_folds and partition.val_folds share folds"),
        ({"local_val_fraction": 1.0}, "local_val_fraction=1.0"),
        ({"num_sites": 0}, "num_sites=0"),
        ({"train_folds": (11,)}, r"no records in partition.train_folds \[11\]"),
    ):
        with pytest.raises(PartitionError, match=message):
            make_partition(meta, cfg_for("iid", **changes))
    with pytest.raises(PartitionError, match=r"lacks columns \['site'\]"):
        make_partition(meta.drop(columns=["site"]), cfg_for("site"))


def test_json_round_trip_keeps_exact_ids(meta, tmp_path):
    partition = make_partition(meta, cfg_for("dirichlet"))
    path = tmp_path / "partition.json"
    path.write_text(partition.to_json())
    restored = Partition.from_json(path.read_text())
    assert restored == partition
    assert restored.config["scheme"] == "dirichlet" and restored.config["train_folds"] == list(range(1, 9))
    with pytest.raises(PartitionError, match="not a fedecg-partition file"):
        Partition.from_json('{"sites": []}')
    broken = partition.to_json().replace('"val_ids": [', '"val_ids": ["x", ', 1)
    with pytest.raises(PartitionError, match="list of integer ecg_ids"):
        Partition.from_json(broken)


def test_summary_counts_match_the_partition(meta):
    partition = make_partition(meta, cfg_for("site"))
    table = partition.summary(meta)
    assert list(table.index) == [*partition.site_names, "validation", "test"]
    for site in partition.sites:
        row = table.loc[site.name]
        part = meta.loc[list(site.ids)]
        assert row["records"] == len(site.ids) and row["train"] == len(site.train_ids)
        assert row["patients"] == part["patient_id"].nunique()
        assert row["MI"] == sum("MI" in s for s in part["superclasses"])
        assert row["female"] == pytest.approx((part["sex"] == 1).mean(), abs=1e-3)
        assert row["age_q25"] <= row["age_median"] <= row["age_q75"] <= 90
    assert table.loc["test", "records"] == len(partition.test_ids)


def test_one_record_per_patient(meta):
    ids = meta.index.to_numpy()
    patients = meta["patient_id"].to_numpy()
    chosen = one_record_per_patient(ids, patients, seed=0)
    assert len(chosen) == len(set(patients))
    assert len(set(meta.loc[chosen, "patient_id"])) == len(chosen)
    assert list(chosen) == [i for i in ids if i in set(chosen)]  # input order kept
    reverse = one_record_per_patient(ids[::-1], patients[::-1], seed=0)
    assert set(reverse) == set(chosen)  # the draw does not depend on the order
    assert set(one_record_per_patient(ids, patients, seed=1)) != set(chosen)
    with pytest.raises(ValueError, match="ecg_ids but"):
        one_record_per_patient(ids, patients[:-1], seed=0)


def test_training_ids_are_every_training_fold_record(meta):
    cfg = cfg_for("site")
    ids = training_ids(meta, cfg)
    fold = meta.loc[ids, "strat_fold"]
    assert fold.isin(cfg.train_folds).all() and ids == sorted(ids)
    partition = make_partition(meta, cfg)
    assert set(partition.train_ids()) < set(ids)


# -- patient-stable choices (DP's neighbouring datasets differ in one patient) -------------------------


def holdout_of(partition: Partition, meta: pd.DataFrame) -> dict[int, bool]:
    """Per patient held by a site: True if in the site's local validation share."""
    out: dict[int, bool] = {}
    for site in partition.sites:
        out.update({int(p): False for p in meta.loc[list(site.train_ids), "patient_id"]})
        out.update({int(p): True for p in meta.loc[list(site.val_ids), "patient_id"]})
    return out


@pytest.mark.parametrize("scheme", SCHEMES)
def test_removing_one_patient_changes_no_other_patients_holdout(meta, scheme):
    cfg = cfg_for(scheme, local_val_fraction=0.2)
    before = holdout_of(make_partition(meta, cfg), meta)
    in_val = sorted(p for p, v in before.items() if v)
    in_train = sorted(p for p, v in before.items() if not v)
    for removed in (in_val[0], in_val[len(in_val) // 2], in_train[0], in_train[-1]):
        after = holdout_of(make_partition(meta[meta["patient_id"] != removed], cfg), meta)
        assert removed not in after
        common = set(before) & set(after)
        assert len(common) >= len(before) - 1
        changed = sorted(p for p in common if before[p] != after[p])
        assert not changed, f"removing patient {removed} moved patients {changed}"


def test_removing_one_patient_changes_no_other_patients_chosen_record(meta):
    ids = meta.index.to_numpy()
    patients = meta["patient_id"].to_numpy()
    chosen = set(one_record_per_patient(ids, patients, seed=4).tolist())
    counts = meta.groupby("patient_id").size()
    multi = [int(p) for p in counts.index[counts > 1]]
    for removed in (multi[0], multi[len(multi) // 2], multi[-1], int(counts.index[counts == 1][0])):
        keep = patients != removed
        after = set(one_record_per_patient(ids[keep], patients[keep], seed=4).tolist())
        assert after == chosen - set(ids[~keep].tolist())
    # Removing one of a patient's other records does not change their pick either.
    patient = multi[0]
    records = set(meta.index[meta["patient_id"] == patient])
    spare = sorted(records - chosen)[0]
    keep = ids != spare
    assert set(one_record_per_patient(ids[keep], patients[keep], seed=4).tolist()) == chosen


def test_holdout_and_record_choice_are_seeded(meta):
    cfg = cfg_for("age", local_val_fraction=0.2)
    first = holdout_of(make_partition(meta, cfg), meta)
    assert holdout_of(make_partition(meta, cfg), meta) == first
    assert holdout_of(make_partition(meta.sample(frac=1.0, random_state=2), cfg), meta) == first
    other = holdout_of(make_partition(meta, dataclasses.replace(cfg, seed=cfg.seed + 1)), meta)
    assert set(other) == set(first) and other != first
    ids = meta.index.to_numpy()
    patients = meta["patient_id"].to_numpy()
    picks = one_record_per_patient(ids, patients, seed=9)
    assert list(one_record_per_patient(ids, patients, seed=9)) == list(picks)
    assert list(one_record_per_patient(ids, patients, seed=10)) != list(picks)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_local_val_share_is_roughly_the_fraction(seed):
    patients = np.arange(5_000, 5_400)
    for fraction in (0.1, 0.25):
        train, val = _local_split(patients, fraction, seed)
        assert train | val == set(patients.tolist()) and not train & val
        assert abs(len(val) / len(patients) - fraction) < 0.07  # binomial, n=400: sd <= 0.022
    assert _local_split(patients, 0.0, seed) == (set(patients.tolist()), set())


def test_local_split_fallbacks_are_stable():
    # One patient: never validated. Two or more: at least one in validation, at least one in training.
    assert _local_split(np.array([7]), 0.5, 0) == ({7}, set())
    small = np.arange(100, 106)
    train, val = _local_split(small, 1e-9, 0)  # nobody under the threshold: the smallest u goes to validation
    assert len(val) == 1 and len(train) == 5
    train_hi, val_hi = _local_split(small, 1.0 - 1e-9, 0)  # everybody under it: the largest u stays in training
    assert len(train_hi) == 1 and len(val_hi) == 5
    # The fallback picks do not depend on the order or on an unrelated patient removed.
    assert _local_split(small[::-1], 1e-9, 0) == (train, val)
    spare = sorted(train)[0]
    assert _local_split(small[small != spare], 1e-9, 0)[1] == val


def test_public_sites_form_a_patient_disjoint_pretraining_pool(tiny_ptbxl):
    meta = read_metadata(tiny_ptbxl.root)
    cfg = PartitionConfig(scheme="site", num_sites=2, public_sites=(0,), local_val_fraction=0.0)
    partition = make_partition(meta, cfg)
    assert partition.public_ids and "site-0" not in partition.site_names
    public_patients = set(meta.loc[list(partition.public_ids), "patient_id"])
    for site in partition.sites:
        assert not public_patients & set(meta.loc[list(site.ids), "patient_id"])
    assert Partition.from_json(partition.to_json()).public_ids == partition.public_ids
    with pytest.raises(PartitionError, match="only the site scheme"):
        make_partition(meta, PartitionConfig(scheme="iid", public_sites=(0,)))
