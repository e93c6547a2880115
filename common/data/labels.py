"""Labels: the 71 SCP statements as multi-hot vectors, and the 5 diagnostic superclasses.

A statement counts as present when it is listed in `scp_codes`, whatever its likelihood (0 means
"unknown likelihood" in PTB-XL, not "absent"); this is the convention of the PTB-XL paper and its example
code. Superclasses NORM, MI, STTC, CD, HYP come from `diagnostic_class` of the diagnostic statements.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from common.data.errors import DataError
from common.scp import SCP_CODES

SUPERCLASSES: tuple[str, ...] = ("NORM", "MI", "STTC", "CD", "HYP")
NUM_STATEMENTS = len(SCP_CODES)
# diagnostic_class of PTB-XL's 44 diagnostic statements (scp_statements.csv); files are checked against it.
SCP_SUPERCLASS: dict[str, str] = {
    **dict.fromkeys(["NDT", "NST_", "DIG", "LNGQT", "ISC_", "ISCAL", "ISCIN", "ISCIL", "ISCAS", "ISCLA", "ANEUR",
                     "EL", "ISCAN"], "STTC"),
    "NORM": "NORM",
    **dict.fromkeys(["IMI", "ASMI", "ILMI", "AMI", "ALMI", "INJAS", "LMI", "INJAL", "IPLMI", "IPMI", "INJIN",
                     "INJLA", "PMI", "INJIL"], "MI"),
    **dict.fromkeys(["LVH", "LAO/LAE", "RVH", "RAO/RAE", "SEHYP"], "HYP"),
    **dict.fromkeys(["LAFB", "IRBBB", "1AVB", "IVCD", "CRBBB", "CLBBB", "LPFB", "WPW", "ILBBB", "3AVB", "2AVB"], "CD"),
}


def superclasses_of(codes: Iterable[str]) -> tuple[str, ...]:
    """The superclasses of a record's statements, in SUPERCLASSES order."""
    found = {SCP_SUPERCLASS.get(code) for code in codes}
    return tuple(c for c in SUPERCLASSES if c in found)


def labels_from_scp_codes(scp_codes: Iterable[dict[str, float]], codes: Sequence[str] = SCP_CODES) -> np.ndarray:
    """Multi-hot float32 [N, len(codes)]: 1 where the statement is listed in scp_codes (any likelihood)."""
    column = {code: i for i, code in enumerate(codes)}
    rows = list(scp_codes)
    labels = np.zeros((len(rows), len(column)), dtype=np.float32)
    for i, record_codes in enumerate(rows):
        for code in record_codes:
            if code not in column:
                raise DataError(f"row {i}: scp_codes names unknown statement {code!r}")
            labels[i, column[code]] = 1.0
    return labels


def superclasses_from_scp_codes(scp_codes: Iterable[dict[str, float]]) -> np.ndarray:
    """Multi-hot float32 [N, 5] over SUPERCLASSES, from the diagnostic statements listed in scp_codes."""
    rows = list(scp_codes)
    out = np.zeros((len(rows), len(SUPERCLASSES)), dtype=np.float32)
    for i, record_codes in enumerate(rows):
        for code in record_codes:
            if code in SCP_SUPERCLASS:
                out[i, SUPERCLASSES.index(SCP_SUPERCLASS[code])] = 1.0
    return out
