"""What a partition is: SitePartition and Partition (with its summary table and its JSON file), and
PartitionError. `common.data.partition.make_partition` makes one."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from common.data.demographics import fold_age
from common.data.errors import DataError
from common.data.labels import SUPERCLASSES

PARTITION_FORMAT = "fedecg-partition"
PARTITION_VERSION = 1


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
    def from_json(cls, text: str) -> Partition:
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
        check_disjoint_ids(partition)
        return partition


def check_disjoint_ids(partition: Partition) -> None:
    seen: dict[int, str] = {}
    holders = [(f"{s.name}", s.train_ids + s.val_ids) for s in partition.sites]
    holders += [("validation", partition.val_ids), ("test", partition.test_ids), ("public", partition.public_ids)]
    for name, ids in holders:
        for i in ids:
            if i in seen:
                raise PartitionError(f"ecg_id {i} is in both {seen[i]} and {name}")
            seen[i] = name

