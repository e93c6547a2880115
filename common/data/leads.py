"""Lead names and lead algebra: the model learns 8 independent leads, the other 4 are derived exactly.

III, aVR, aVL, aVF are linear combinations of I and II (Einthoven/Goldberger), so they are never learned.
Functions here take numpy arrays or torch tensors (lead axis -2) and return the same kind.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

LEAD_NAMES: tuple[str, ...] = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
MODEL_LEADS: tuple[str, ...] = ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6")
MODEL_LEAD_INDEX: tuple[int, ...] = tuple(LEAD_NAMES.index(name) for name in MODEL_LEADS)


def is_torch(x: Any) -> bool:
    """True for a torch tensor; never imports torch (numpy-only callers stay light)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def derive_leads(x8: Any) -> Any:
    """12 leads (I, II, III, aVR, aVL, aVF, V1..V6) from the 8 model leads (I, II, V1..V6); lead axis -2.

    Exact: III = II - I, aVR = -(I + II) / 2, aVL = I - II / 2, aVF = II - I / 2. numpy or torch in, same out.
    """
    if x8.ndim < 2 or x8.shape[-2] != len(MODEL_LEADS):
        raise ValueError(f"derive_leads: expected [..., 8, L] (leads {', '.join(MODEL_LEADS)}), got shape {tuple(x8.shape)}")
    lead_i, lead_ii, chest = x8[..., 0:1, :], x8[..., 1:2, :], x8[..., 2:, :]
    limb = [lead_i, lead_ii, lead_ii - lead_i, -(lead_i + lead_ii) / 2, lead_i - lead_ii / 2, lead_ii - lead_i / 2, chest]
    if is_torch(x8):
        return sys.modules["torch"].cat(limb, dim=-2)
    return np.concatenate(limb, axis=-2)


def select_model_leads(x12: Any) -> Any:
    """The 8 model leads (I, II, V1..V6) out of 12 standard-order leads; lead axis -2."""
    if x12.ndim < 2 or x12.shape[-2] != len(LEAD_NAMES):
        raise ValueError(f"select_model_leads: expected [..., 12, L], got shape {tuple(x12.shape)}")
    return x12[..., list(MODEL_LEAD_INDEX), :]
