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
  (see `_local_split` for the tiny-site fallbacks).
- Patient-stable choices: the local validation split and `one_record_per_patient` decide each patient
  from a keyed hash of that patient alone, so adding or removing one patient does not change any other
  patient's holdout membership or chosen record (DP's neighbouring datasets differ in one patient only).
- Determinism: everything is a function of the table and `seed` (row order of `meta` does not matter).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from common.config import Config, PartitionConfig
from common.data.demographics import fold_age
from common.data.errors import DataError
from common.data.labels import SUPERCLASSES

PARTITION_FORMAT = "fedecg-partition"
PARTITION_VERSION = 1
_SCHEME_STREAM = {"site": 1, "iid": 2, "dirichlet": 3, "age": 4}
_DIRICHLET_DRAWS = 100


class PartitionError(DataError):
    """A partition that cannot be made as configured (the message says which setting to change)."""


@dataclass(frozen=True)
class SitePartition:
    name: str
    train_ids: tuple[int, ...]
    val_ids: tuple[int, ...]  # the site's local validation share (whole patients), never trained on

    @property
    def ids(self) -> tuple[int, ...]:
        return tuple(sorted(self.train_ids + self.val_ids))


@dataclass(frozen=True)
class Partition:
    scheme: str
    seed: int
    sites: list[SitePartition]
    val_ids: tuple[int, ...]  # global validation set (val_folds)
    test_ids: tuple[int, ...]  # test_folds; no site ever holds one of these
    config: dict[str, Any] = field(default_factory=dict)  # the PartitionConfig it was made with
    left_out: dict[str, int] = field(default_factory=dict)  # training records not in any site, by reason
    public_ids: tuple[int, ...] = ()  # training-fold records of sites declared public (public_sites): no DP

    @property
    def site_names(self) -> list[str]:
        return [s.name for s in self.sites]

    def site(self, name: str) -> SitePartition:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(f"no site {name!r}; sites: {self.site_names}")

    def train_ids(self) -> tuple[int, ...]:
        """All sites' training records (local validation shares excluded), sorted."""
        return tuple(sorted(i for s in self.sites for i in s.train_ids))

    # -- summary ---------------------------------------------------------------------------------

    def summary(self, meta: pd.DataFrame) -> pd.DataFrame:
        """Per site (and for the global validation and test sets): records, patients, superclass counts,
        age mean and quartiles, share of women. Indexed by site name."""
        groups = [(s.name, "site", s.train_ids, s.val_ids) for s in self.sites]
        groups += [("validation", "global val", self.val_ids, ()), ("test", "test", self.test_ids, ())]
        rows = []
        for name, role, train, local_val in groups:
            ids = list(train) + list(local_val)
            part = meta.loc[ids] if ids else meta.iloc[:0]
            ages = fold_age(pd.to_numeric(part["age"], errors="coerce")).dropna()
            row: dict[str, Any] = {
                "site": name, "role": role, "records": len(ids), "train": len(train), "local_val": len(local_val),
                "patients": int(part["patient_id"].nunique()),
            }
            supers = part["superclasses"] if "superclasses" in part.columns else pd.Series([()] * len(part))
            for cls in SUPERCLASSES:
                row[cls] = int(sum(cls in s for s in supers))
            row.update({
                "age_mean": round(float(ages.mean()), 1) if len(ages) else np.nan,
                "age_q25": float(ages.quantile(0.25)) if len(ages) else np.nan,
                "age_median": float(ages.median()) if len(ages) else np.nan,
                "age_q75": float(ages.quantile(0.75)) if len(ages) else np.nan,
                "female": round(float((pd.to_numeric(part["sex"], errors="coerce") == 1).mean()), 3) if len(part) else np.nan,
            })
            rows.append(row)
        return pd.DataFrame(rows).set_index("site")

    # -- JSON ------------------------------------------------------------------------------------

    def to_json(self) -> str:
        data = {
            "format": PARTITION_FORMAT, "version": PARTITION_VERSION, "scheme": self.scheme, "seed": self.seed,
            "config": self.config, "left_out": self.left_out,
            "sites": [{"name": s.name, "train_ids": list(s.train_ids), "val_ids": list(s.val_ids)} for s in self.sites],
            "val_ids": list(self.val_ids), "test_ids": list(self.test_ids), "public_ids": list(self.public_ids),
        }
        text = json.dumps(data, indent=1)
        # One line per id list instead of one line per id.
        return re.sub(r"\[\s+([-\d.,\s]+?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)

    @classmethod
    def from_json(cls, text: str) -> "Partition":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise PartitionError(f"partition JSON is not valid JSON: {err}") from err
        if not isinstance(data, dict) or data.get("format") != PARTITION_FORMAT:
            found = data.get("format") if isinstance(data, dict) else None
            raise PartitionError(f"not a {PARTITION_FORMAT} file (format={found!r})")
        if data.get("version") != PARTITION_VERSION:
            raise PartitionError(f"partition version {data.get('version')!r}, this code reads {PARTITION_VERSION}")

        def ids(value: Any, where: str) -> tuple[int, ...]:
            if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise PartitionError(f"partition JSON: {where} must be a list of integer ecg_ids")
            return tuple(value)

        try:
            sites = [SitePartition(str(s["name"]), ids(s["train_ids"], f"{s['name']}.train_ids"),
                                   ids(s["val_ids"], f"{s['name']}.val_ids")) for s in data["sites"]]
            partition = cls(scheme=str(data["scheme"]), seed=int(data["seed"]), sites=sites,
                            val_ids=ids(data["val_ids"], "val_ids"), test_ids=ids(data["test_ids"], "test_ids"),
                            config=dict(data.get("config", {})), left_out=dict(data.get("left_out", {})),
                            public_ids=ids(data.get("public_ids", []), "public_ids"))
        except (KeyError, TypeError) as err:
            raise PartitionError(f"partition JSON: missing or malformed entry {err}") from err
        _check_disjoint_ids(partition)
        return partition


# ----------------------------------------------------------------------------------------------------


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
        if any(b >= c for b, c in zip(bands, bands[1:])):
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


def _rng(cfg: PartitionConfig, purpose: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([cfg.seed, _SCHEME_STREAM[cfg.scheme], purpose]))


_PUBLIC = -2  # assignment of patients whose first record is at a site declared public


def _by_site_value(first: pd.DataFrame, train: pd.DataFrame, cfg: PartitionConfig) -> tuple[pd.Series, list[str], dict[str, int]]:
    value = first["site"].fillna(-1).astype(np.int64)
    records_per_patient = train.groupby("patient_id").size()
    per_site = records_per_patient.groupby(value).sum().drop(index=[-1, *cfg.public_sites], errors="ignore")
    ranked = sorted(per_site.index, key=lambda v: (-per_site[v], v))
    if len(ranked) < cfg.num_sites:
        raise PartitionError(
            f"partition.num_sites={cfg.num_sites} but only {len(ranked)} recording site(s) have training records "
            f"(sites {ranked}); lower num_sites or use scheme iid/dirichlet/age"
        )
    chosen = ranked[: cfg.num_sites]
    index_of = {v: k for k, v in enumerate(chosen)}
    names = [f"site-{v}" for v in chosen]
    rest = -1
    if cfg.rest == "merge":
        rest = len(chosen)
        names.append("site-rest")
    public = set(cfg.public_sites)
    assignment = value.map(lambda v: _PUBLIC if v in public else index_of.get(v, rest)).astype(np.int64)
    left_out = {}
    if cfg.rest == "drop":
        left_out["outside the largest sites"] = int(records_per_patient[assignment == -1].sum())
    return assignment, names, left_out


def _iid(first: pd.DataFrame, train: pd.DataFrame, cfg: PartitionConfig) -> tuple[pd.Series, list[str], dict[str, int]]:
    if len(first) < cfg.num_sites:
        raise PartitionError(f"partition.num_sites={cfg.num_sites} but only {len(first)} training patients")
    records_per_patient = train.groupby("patient_id").size().reindex(first.index).to_numpy()
    order = _rng(cfg, 0).permutation(len(first))
    load = np.zeros(cfg.num_sites, dtype=np.int64)
    assignment = np.empty(len(first), dtype=np.int64)
    for i in order:  # shuffled patients, each to the currently smallest site: equal record counts
        k = int(np.argmin(load))
        assignment[i] = k
        load[k] += records_per_patient[i]
    return pd.Series(assignment, index=first.index), [f"iid-{k}" for k in range(cfg.num_sites)], {}


def _dirichlet(first: pd.DataFrame, train: pd.DataFrame, cfg: PartitionConfig) -> tuple[pd.Series, list[str], dict[str, int]]:
    supers = first["superclasses"]
    frequency = {c: int(sum(c in s for s in supers)) for c in SUPERCLASSES}
    # A patient's label: the rarest superclass of their first record, so minority classes are skewed too.
    label = np.array([min(s, key=lambda c: (frequency[c], SUPERCLASSES.index(c))) if s else "none" for s in supers])
    rng = _rng(cfg, 0)
    for _ in range(_DIRICHLET_DRAWS):
        assignment = np.empty(len(first), dtype=np.int64)
        for cls in (*SUPERCLASSES, "none"):
            members = np.flatnonzero(label == cls)
            if len(members) == 0:
                continue
            shares = rng.dirichlet(np.full(cfg.num_sites, cfg.alpha))
            members = rng.permutation(members)
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
            for k, part in enumerate(np.split(members, cuts)):
                assignment[part] = k
        if len(np.unique(assignment)) == cfg.num_sites:
            return pd.Series(assignment, index=first.index), [f"dirichlet-{k}" for k in range(cfg.num_sites)], {}
    raise PartitionError(
        f"partition.alpha={cfg.alpha} with num_sites={cfg.num_sites}: {_DIRICHLET_DRAWS} Dirichlet draws all left "
        f"a site without patients ({len(first)} training patients); raise alpha or lower num_sites"
    )


def _age_band_name(low: float | None, high: float | None) -> str:
    if low is None:
        return f"age-under{high:g}"
    if high is None:
        return f"age-{low:g}plus"
    return f"age-{low:g}to{high:g}"


def _by_age(first: pd.DataFrame, train: pd.DataFrame, cfg: PartitionConfig) -> tuple[pd.Series, list[str], dict[str, int]]:
    age = fold_age(pd.to_numeric(first["age"], errors="coerce"))
    bands = list(cfg.age_bands)
    band = np.searchsorted(np.asarray(bands, dtype=np.float64), age.to_numpy(), side="right").astype(np.int64)
    band[age.isna().to_numpy()] = -1  # no age: no band
    edges = [None, *bands, None]
    names = [_age_band_name(edges[k], edges[k + 1]) for k in range(len(bands) + 1)]
    records_per_patient = train.groupby("patient_id").size().reindex(first.index)
    left_out = {"age missing": int(records_per_patient[band == -1].sum())}
    return pd.Series(band, index=first.index), names, left_out


_SCHEMES = {"site": _by_site_value, "iid": _iid, "dirichlet": _dirichlet, "age": _by_age}
_SCHEME_COLUMNS = {"site": ["site"], "iid": [], "dirichlet": ["superclasses"], "age": ["age"]}


def _keyed_hash(seed: int, purpose: str, *values: int) -> int:
    """A 64-bit keyed hash of integer `values`, keyed by `seed` and `purpose`: a pseudo-random draw per
    value tuple that depends on nothing else (not on which other patients or records exist)."""
    key = hashlib.blake2b(f"fedecg:{purpose}:{int(seed)}".encode(), digest_size=32).digest()  # any seed size
    message = b"".join(int(v).to_bytes(8, "little", signed=True) for v in values)
    return int.from_bytes(hashlib.blake2b(message, digest_size=8, key=key).digest(), "little")


def _keyed_uniform(seed: int, purpose: str, *values: int) -> float:
    """`_keyed_hash` as a uniform draw in [0, 1)."""
    return _keyed_hash(seed, purpose, *values) / 2.0**64


_LOCAL_VAL_PURPOSE = "local-val"
_ONE_RECORD_PURPOSE = "one-record-per-patient"


def _local_split(patients: np.ndarray, fraction: float, seed: int) -> tuple[set[int], set[int]]:
    """(train patients, local validation patients) of one site.

    A patient goes to local validation iff u(patient) < `fraction`, where u is a uniform in [0, 1) from a
    keyed hash of the partition seed and the patient id (the same for every site and scheme). Each
    patient's place is thus decided by that patient alone, and the validation share is `fraction` on
    average rather than exactly.

    Two fallbacks, both stable in the same sense: when `fraction` > 0, the site has two or more patients
    and none falls under the threshold, the patient with the smallest u goes to validation; and when
    every patient falls under it, the one with the largest u stays in training (a site always trains on
    someone; a one-patient site has no validation). Only these fallbacks make one patient's place depend
    on others: adding or removing a patient moves at most one other patient, and only in the degenerate
    case where at most one of the site's patients is on one side of the threshold (a tiny site, or a
    fraction near 0 or 1).
    """
    ids = sorted({int(p) for p in patients})
    if fraction <= 0 or not ids:
        return set(ids), set()
    u = {p: _keyed_uniform(seed, _LOCAL_VAL_PURPOSE, p) for p in ids}
    val = {p for p in ids if u[p] < fraction}
    if not val and len(ids) >= 2:
        val = {min(ids, key=lambda p: (u[p], p))}
    if len(val) == len(ids):
        val.discard(max(ids, key=lambda p: (u[p], p)))
    return set(ids) - val, val


def make_partition(meta: pd.DataFrame, cfg: PartitionConfig) -> Partition:
    """Split the records of `meta` (indexed by ecg_id; see `read_metadata`) into simulated hospitals."""
    if cfg.scheme not in _SCHEMES:
        raise PartitionError(f"partition.scheme={cfg.scheme!r}: expected one of {sorted(_SCHEMES)}")
    _check_config(cfg)
    columns = ["patient_id", "strat_fold", *_SCHEME_COLUMNS[cfg.scheme]]
    records = _records(meta, columns)
    group = _patient_groups(records, cfg)
    train = records[group == "train"]
    if train.empty:
        raise PartitionError(f"no records in partition.train_folds {list(cfg.train_folds)}")
    first = _first_records(train)
    assignment, names, left_out = _SCHEMES[cfg.scheme](first, train, cfg)

    record_site = train["patient_id"].map(assignment).to_numpy()
    sites = []
    for k, name in enumerate(names):
        site_records = train[record_site == k]
        if site_records.empty:
            raise PartitionError(f"site {name} ({cfg.scheme} scheme) would have no training records; "
                                 "lower partition.num_sites or change the scheme's settings")
        train_patients, val_patients = _local_split(site_records["patient_id"].unique(), cfg.local_val_fraction, cfg.seed)
        is_val = site_records["patient_id"].isin(val_patients).to_numpy()
        sites.append(SitePartition(
            name=name,
            train_ids=tuple(int(i) for i in site_records.index[~is_val]),
            val_ids=tuple(int(i) for i in site_records.index[is_val]),
        ))
    partition = Partition(
        scheme=cfg.scheme, seed=cfg.seed, sites=sites,
        public_ids=tuple(int(i) for i in train.index[record_site == _PUBLIC]),
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


def _check_disjoint_ids(partition: Partition) -> None:
    seen: dict[int, str] = {}
    holders = [(f"{s.name}", s.train_ids + s.val_ids) for s in partition.sites]
    holders += [("validation", partition.val_ids), ("test", partition.test_ids), ("public", partition.public_ids)]
    for name, ids in holders:
        for i in ids:
            if i in seen:
                raise PartitionError(f"ecg_id {i} is in both {seen[i]} and {name}")
            seen[i] = name


def _check_patient_disjoint(partition: Partition, patient_of: pd.Series) -> None:
    """Guard: no patient in two holders (sites, validation, test)."""
    _check_disjoint_ids(partition)
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


def one_record_per_patient(ecg_ids: Iterable[int], patient_ids: Iterable[int], seed: int) -> np.ndarray:
    """One record per patient, in the order of `ecg_ids` (for privacy.unit=patient).

    Each patient keeps the record with the smallest keyed hash of (seed, patient_id, ecg_id): a seeded
    pseudo-random pick that depends only on that patient's own records, not on the order of the input
    nor on which other patients are present.
    """
    ids = np.asarray(list(ecg_ids), dtype=np.int64)
    patients = np.asarray(list(patient_ids), dtype=np.int64)
    if ids.shape != patients.shape:
        raise ValueError(f"one_record_per_patient: {len(ids)} ecg_ids but {len(patients)} patient_ids")
    if len(np.unique(ids)) != len(ids):
        raise ValueError("one_record_per_patient: duplicate ecg_ids")
    best: dict[int, tuple[int, int]] = {}
    for ecg_id, patient in zip(ids.tolist(), patients.tolist()):
        rank = (_keyed_hash(seed, _ONE_RECORD_PURPOSE, patient, ecg_id), ecg_id)
        if patient not in best or rank < best[patient]:
            best[patient] = rank
    chosen = {ecg_id for _, ecg_id in best.values()}
    keep = np.fromiter((i in chosen for i in ids.tolist()), dtype=bool, count=len(ids))
    return ids[keep]
