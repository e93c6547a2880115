"""Server-held reference ECGs for monitoring: the global validation folds, where the server can read them.

In simulation the server sees the PTB-XL root; in a deployment this is a public or consented reference
set placed beside the server. Site training data are never read here.
"""

from __future__ import annotations

import functools
import logging

from common.config import Config
from common.data.dataset import ECGDataset, load_dataset
from common.data.errors import DataError
from common.data.metadata import load_metadata
from common.data.partition import make_partition

log = logging.getLogger("fedecg.server")
REFERENCE_SIZE = 64


@functools.lru_cache(maxsize=4)
def _load(cfg: Config) -> ECGDataset | None:
    try:
        meta = load_metadata(cfg.data)
    except DataError as err:
        log.info("no reference data for monitoring: %s", err)
        return None
    partition = make_partition(meta, cfg.partition)
    ids = sorted(partition.val_ids)[:REFERENCE_SIZE]
    if not ids:
        return None
    return load_dataset(cfg.data, ecg_ids=ids, progress=False)


def reference_set(cfg: Config) -> ECGDataset | None:
    return _load(cfg)
