"""The dataset: preprocessed PTB-XL records as aligned numpy arrays, loaded through the cache.

    cfg = load("configs/quickstart.yaml").data
    ds = load_dataset(cfg, ecg_ids=[...])          # ECGDataset of numpy arrays, cached on disk
    x12 = ds.signals12()                           # with the 4 limb leads the model does not learn

Signals are in mV at `data.sampling_rate` (100 Hz, 1000 samples for 10 s), leads MODEL_LEADS.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from common.config import DataConfig
from common.data.cache import cache_key, cache_path, load_cache, save_cache
from common.data.demographics import demographics_from_metadata, encode_demographics
from common.data.errors import DataError
from common.data.labels import labels_from_scp_codes, superclasses_from_scp_codes
from common.data.leads import derive_leads
from common.data.metadata import load_metadata, resolve_root
from common.data.records import read_signals, record_choices
from common.scp import SCP_CODES

logger = logging.getLogger(__name__)


@dataclass
class ECGDataset:
    """Preprocessed PTB-XL records; every array has N rows in the same order as `ecg_ids`."""

    ecg_ids: np.ndarray  # int64 [N]
    patient_ids: np.ndarray  # int64 [N]
    signals: np.ndarray  # float32 [N, 8, L] mV, leads MODEL_LEADS
    labels: np.ndarray  # float32 [N, 71] SCP statements, order of `codes`
    superclasses: np.ndarray  # float32 [N, 5] SUPERCLASSES
    demographics: np.ndarray  # float32 [N, 4] age, sex, height, weight; NaN where missing
    demographics_mask: np.ndarray  # bool [N, 4], True where present
    strat_fold: np.ndarray  # int64 [N]
    site: np.ndarray  # int64 [N], -1 where the site is not recorded
    codes: tuple[str, ...]  # the 71 statement codes (SCP_CODES)
    meta: pd.DataFrame  # the metadata rows, indexed by ecg_id, same order

    def __len__(self) -> int:
        return int(self.ecg_ids.shape[0])

    def subset(self, ecg_ids: Iterable[int]) -> ECGDataset:
        """The records with these ecg_ids, in the order given."""
        wanted = np.asarray(list(ecg_ids), dtype=np.int64)
        rows = _positions(self.ecg_ids, wanted, "ECGDataset.subset")
        return ECGDataset(
            ecg_ids=self.ecg_ids[rows], patient_ids=self.patient_ids[rows], signals=self.signals[rows],
            labels=self.labels[rows], superclasses=self.superclasses[rows], demographics=self.demographics[rows],
            demographics_mask=self.demographics_mask[rows], strat_fold=self.strat_fold[rows], site=self.site[rows],
            codes=self.codes, meta=self.meta.iloc[rows],
        )

    def signals12(self) -> np.ndarray:
        """float32 [N, 12, L]: the 12 standard leads derived from the 8 model leads."""
        return derive_leads(self.signals)

    def encoded_demographics(self) -> np.ndarray:
        """float32 [N, 8]: `encode_demographics` of this dataset (the model's demographic input)."""
        return encode_demographics(self.demographics, self.demographics_mask)


def _positions(available: np.ndarray, wanted: np.ndarray, where: str) -> np.ndarray:
    if len(np.unique(wanted)) != len(wanted):
        values, counts = np.unique(wanted, return_counts=True)
        raise DataError(f"{where}: duplicate ecg_ids {values[counts > 1][:10].tolist()}")
    order = np.argsort(available, kind="stable")
    found = np.searchsorted(available, wanted, sorter=order)
    found = np.minimum(found, len(available) - 1) if len(available) else found
    rows = order[found] if len(available) else found
    unknown = wanted[(rows >= len(available)) | (available[rows] != wanted)] if len(available) else wanted
    if len(unknown):
        raise DataError(f"{where}: {len(unknown)} ecg_id(s) not available: {unknown[:10].tolist()}")
    return rows



def load_dataset(cfg: DataConfig, ecg_ids: Iterable[int] | None = None, progress: bool = True) -> ECGDataset:
    """Load (or read from the cache) the records, in ecg_id order or in the order of `ecg_ids`.

    With data.on_bad_record=skip, bad records are left out (a warning lists them): use the returned
    `ecg_ids`, which may be fewer than asked.
    """
    if cfg.sampling_rate <= 0:
        raise DataError(f"data.sampling_rate={cfg.sampling_rate}: must be a positive number of Hz")
    root = resolve_root(cfg)
    meta = load_metadata(cfg)
    requested = None
    if ecg_ids is not None:
        requested = np.asarray(list(ecg_ids), dtype=np.int64)
        rows = _positions(meta.index.to_numpy(dtype=np.int64), requested,
                          f"load_dataset ({root}, max_records={cfg.max_records})")
        meta = meta.iloc[np.sort(rows)]

    choices = record_choices(root, meta, cfg.sampling_rate)
    key = cache_key(root, meta, choices, cfg)
    path = cache_path(cfg, key)
    cached = load_cache(path, key)
    if cached is None:
        ids, signals, skipped = read_signals(root, meta, choices, cfg, progress)
        save_cache(path, key, {"ecg_ids": ids, "signals": signals, "skipped_ids": skipped})
    else:
        ids, signals, skipped = cached["ecg_ids"], cached["signals"], cached["skipped_ids"]
        logger.info("loaded %d records from cache %s", len(ids), path)
        if len(skipped):
            logger.warning("%s: skipped %d bad record(s) (data.on_bad_record=skip, cached): ids %s",
                           root, len(skipped), skipped.tolist())
    meta = meta.loc[ids]
    demographics, present = demographics_from_metadata(meta)
    dataset = ECGDataset(
        ecg_ids=ids, patient_ids=meta["patient_id"].to_numpy(dtype=np.int64), signals=signals,
        labels=labels_from_scp_codes(meta["scp_codes"]), superclasses=superclasses_from_scp_codes(meta["scp_codes"]),
        demographics=demographics, demographics_mask=present,
        strat_fold=meta["strat_fold"].to_numpy(dtype=np.int64),
        site=meta["site"].fillna(-1).to_numpy(dtype=np.int64),
        codes=SCP_CODES, meta=meta,
    )
    if requested is not None:
        skipped_set = set(skipped.tolist())
        dataset = dataset.subset([i for i in requested.tolist() if i not in skipped_set])
    return dataset
