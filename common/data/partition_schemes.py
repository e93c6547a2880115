"""The four ways to assign training patients to sites: by recording site, iid, Dirichlet label skew, age band.

Each scheme maps the first-record table (one row per patient, index patient_id) to (assignment per patient,
site names, records left out by reason). An assignment of -1 leaves the patient out; `PUBLIC` marks a
patient of a site declared public (partition.public_sites).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from common.config import PartitionConfig
from common.data.demographics import fold_age
from common.data.labels import SUPERCLASSES
from common.data.partition_types import PartitionError

_SCHEME_STREAM = {"site": 1, "iid": 2, "dirichlet": 3, "age": 4}
_DIRICHLET_DRAWS = 100
PUBLIC = -2  # assignment of patients whose first record is at a site declared public


def _rng(cfg: PartitionConfig, purpose: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([cfg.seed, _SCHEME_STREAM[cfg.scheme], purpose]))


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
    assignment = value.map(lambda v: PUBLIC if v in public else index_of.get(v, rest)).astype(np.int64)
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


SCHEMES = {"site": _by_site_value, "iid": _iid, "dirichlet": _dirichlet, "age": _by_age}
# The metadata columns each scheme reads, beyond patient_id and strat_fold.
SCHEME_COLUMNS = {"site": ["site"], "iid": [], "dirichlet": ["superclasses"], "age": ["age"]}
