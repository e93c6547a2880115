"""Simulated hospitals: patient-disjoint, fold-respecting partitions of PTB-XL.

    meta = load_metadata(cfg.data)
    partition = make_partition(meta, cfg.partition)
    partition.sites[0].train_ids, partition.val_ids, partition.test_ids

Rules shared by every scheme:
- Folds: records in `train_folds` go to sites, `val_folds` form one global validation set, `test_folds`
  never reach a site. A patient whose records span groups goes wholly to the most protected one
  (test, then validation, then training); their records in the other groups' folds are left out.
  (PTB-XL's strat_fold is patient-consistent, so this only matters for other tables.)
- Patients: a patient's training records all go to one site, decided by their first record (lowest
  ecg_id): its `site` value, its age band or its label. So sites are patient-disjoint, which is what
  lets each site's DP guarantee cover its patients (parallel composition).
- Local validation: a patient is kept out of their site's training for local validation iff a keyed hash
  of (seed, patient) falls under `local_val_fraction`, so about that share of each site's patients
  (see `patient_choice.local_split` for the tiny-site fallbacks).
- Patient-stable choices: the local validation split and `one_record_per_patient` decide each patient
  from a keyed hash of that patient alone, so adding or removing one patient does not change any other
  patient's holdout membership or chosen record (DP's neighbouring datasets differ in one patient only).
- Determinism: everything is a function of the table and `seed` (row order of `meta` does not matter).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import asdict

import numpy as np
import pandas as pd

from common.config import Config, PartitionConfig
from common.data.partition_schemes import PUBLIC, SCHEME_COLUMNS, SCHEMES
from common.data.partition_types import (
    Partition,
    PartitionError,
    SitePartition,
    check_disjoint_ids,
)
from common.data.patient_choice import local_split


def _check_config(cfg: PartitionConfig) -> None:
    if cfg.num_sites < 1:
        raise PartitionError(f"partition.num_sites={cfg.num_sites}: need at least one site")
    if cfg.seed < 0:
        raise PartitionError(f"partition.seed={cfg.seed}: must be a non-negative integer")
    groups = {"train_folds": set(cfg.train_folds), "val_folds": set(cfg.val_folds), "test_folds": set(cfg.test_folds)}
    names = list(groups)
    for a in range(3):
        for b in range(a + 1, 3):
            shared = groups[names[a]] & groups[names[b]]
            if shared:
                raise PartitionError(f"partition.{names[a]} and partition.{names[b]} share folds {sorted(shared)}")
    if not groups["train_folds"]:
        raise PartitionError("partition.train_folds is empty: sites would have nothing to train on")
    if not 0.0 <= cfg.local_val_fraction < 1.0:
        raise PartitionError(f"partition.local_val_fraction={cfg.local_val_fraction}: must be in [0, 1)")
    if cfg.public_sites and cfg.scheme != "site":
        raise PartitionError(f"partition.public_sites={list(cfg.public_sites)}: only the site scheme has sites to declare public")
    if cfg.scheme == "dirichlet" and not cfg.alpha > 0:
        raise PartitionError(f"partition.alpha={cfg.alpha}: the Dirichlet concentration must be positive")
    if cfg.scheme == "age":
        bands = list(cfg.age_bands)
        if any(b >= c for b, c in itertools.pairwise(bands)):
            raise PartitionError(f"partition.age_bands={bands}: cut points must be strictly increasing")
        if cfg.num_sites != len(bands) + 1:
            raise PartitionError(
                f"partition.num_sites={cfg.num_sites} but age_bands {bands} make {len(bands) + 1} bands; "
                f"set num_sites to {len(bands) + 1} or change age_bands"
            )


def _records(meta: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    missing = [c for c in columns if c not in meta.columns]
    if missing:
        raise PartitionError(f"metadata lacks columns {missing} (use common.data.metadata.read_metadata)")
    table = meta.loc[:, list(columns)].copy()
    table.index = pd.Index(table.index.astype(np.int64), name="ecg_id")
    return table.sort_index()


def _patient_groups(records: pd.DataFrame, cfg: PartitionConfig) -> pd.Series:
    """Per record: 'test', 'val', 'train' or '' (unused), with each patient wholly in its most protected group."""
    fold = records["strat_fold"]
    rank = np.select([fold.isin(cfg.test_folds), fold.isin(cfg.val_folds), fold.isin(cfg.train_folds)], [3, 2, 1], 0)
    patient_rank = pd.Series(rank, index=records.index).groupby(records["patient_id"]).transform("max")
    group = pd.Series(np.array(["", "train", "val", "test"])[patient_rank.to_numpy()], index=records.index)
    # Only the records in the group's own folds are used.
    own = np.select([group == "test", group == "val", group == "train"],
                    [fold.isin(cfg.test_folds), fold.isin(cfg.val_folds), fold.isin(cfg.train_folds)], False)
    return group.where(own, "")


def _first_records(train: pd.DataFrame) -> pd.DataFrame:
    """One row per patient: their first (lowest ecg_id) training record; index patient_id, sorted."""
    first = train.reset_index().sort_values("ecg_id").drop_duplicates("patient_id")
    return first.set_index("patient_id").sort_index()


def make_partition(meta: pd.DataFrame, cfg: PartitionConfig) -> Partition:
    """Split the records of `meta` (indexed by ecg_id; see `read_metadata`) into simulated hospitals."""
    if cfg.scheme not in SCHEMES:
        raise PartitionError(f"partition.scheme={cfg.scheme!r}: expected one of {sorted(SCHEMES)}")
    _check_config(cfg)
    columns = ["patient_id", "strat_fold", *SCHEME_COLUMNS[cfg.scheme]]
    records = _records(meta, columns)
    group = _patient_groups(records, cfg)
    train = records[group == "train"]
    if train.empty:
        raise PartitionError(f"no records in partition.train_folds {list(cfg.train_folds)}")
    first = _first_records(train)
    assignment, names, left_out = SCHEMES[cfg.scheme](first, train, cfg)

    record_site = train["patient_id"].map(assignment).to_numpy()
    sites = []
    for k, name in enumerate(names):
        site_records = train[record_site == k]
        if site_records.empty:
            raise PartitionError(f"site {name} ({cfg.scheme} scheme) would have no training records; "
                                 "lower partition.num_sites or change the scheme's settings")
        _, val_patients = local_split(site_records["patient_id"].unique(), cfg.local_val_fraction, cfg.seed)
        is_val = site_records["patient_id"].isin(val_patients).to_numpy()
        sites.append(SitePartition(
            name=name,
            train_ids=tuple(int(i) for i in site_records.index[~is_val]),
            val_ids=tuple(int(i) for i in site_records.index[is_val]),
        ))
    partition = Partition(
        scheme=cfg.scheme, seed=cfg.seed, sites=sites,
        public_ids=tuple(int(i) for i in train.index[record_site == PUBLIC]),
        val_ids=tuple(int(i) for i in records.index[group == "val"]),
        test_ids=tuple(int(i) for i in records.index[group == "test"]),
        config={k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()},
        left_out={k: v for k, v in left_out.items() if v},
    )
    _check_patient_disjoint(partition, records["patient_id"])
    return partition


def count_sites(cfg: Config) -> int:
    """The number of sites (SuperNodes) of the configured partition, counted from the partition itself:
    partition.rest=merge adds a site to partition.num_sites."""
    from common.data.metadata import load_metadata

    return len(make_partition(load_metadata(cfg.data), cfg.partition).sites)


def _check_patient_disjoint(partition: Partition, patient_of: pd.Series) -> None:
    """Guard: no patient in two holders (sites, validation, test)."""
    check_disjoint_ids(partition)
    owner: dict[int, str] = {}
    holders = [(s.name, s.train_ids + s.val_ids) for s in partition.sites]
    holders += [("validation", partition.val_ids), ("test", partition.test_ids), ("public", partition.public_ids)]
    for name, ids in holders:
        for patient in set(patient_of.loc[list(ids)].tolist()):
            if owner.setdefault(patient, name) != name:
                raise PartitionError(f"internal error: patient {patient} is in both {owner[patient]} and {name}")


def training_ids(meta: pd.DataFrame, cfg: PartitionConfig) -> list[int]:
    """Every record in the training folds (the central baseline's data), with the same fold rules as
    `make_partition` (patients spanning folds go to the most protected group), sorted by ecg_id."""
    _check_config(cfg)
    records = _records(meta, ["patient_id", "strat_fold"])
    group = _patient_groups(records, cfg)
    return [int(i) for i in records.index[group == "train"]]
