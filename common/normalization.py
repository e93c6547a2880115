"""Normalization for federated, private training: fixed public constants, never statistics of a site's data.

Fitting per-lead statistics across sites would release an aggregate of private records outside the
DP accounting. Instead every site and the server use the same constants: zero mean (ECG leads are
baseline-centred) and a per-lead scale of typical 12-lead amplitudes, taken once from the public PTB-XL
release (standard deviation of I, II, V1-V6 in mV, rounded). Central non-private runs fit their own.
"""

from __future__ import annotations

import numpy as np

from common.data.ptbxl import MODEL_LEADS, Normalizer

# Order: I, II, V1, V2, V3, V4, V5, V6 (mV).
PUBLIC_LEAD_SCALE_MV = (0.16, 0.18, 0.22, 0.38, 0.35, 0.31, 0.29, 0.27)


def federated_normalizer() -> Normalizer:
    return Normalizer(mean=np.zeros(len(MODEL_LEADS)), std=np.array(PUBLIC_LEAD_SCALE_MV), leads=MODEL_LEADS)
