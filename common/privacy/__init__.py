"""Everything DP: accounting (accounting.py), the Opacus engine and secret randomness (engine.py), per-sample
gradient samplers (samplers.py), the site's lifetime ledger (ledger.py) and the certificate (certificate.py).

The model and the diffusion process know nothing of Opacus; common/train.py calls `make_private` when it is
given a budget.
"""

from common.privacy.accounting import (
    HEADLINE_RELATION,
    SiteBudget,
    calibrate_noise,
    epsilon_of,
    plan_budget,
    sample_rate_for,
)
from common.privacy.certificate import build_certificate, verify_certificate, verify_release, write_certificate
from common.privacy.engine import DPRandomness, make_private
from common.privacy.ledger import LedgerError, SiteLedger

__all__ = [
    "HEADLINE_RELATION",
    "DPRandomness",
    "LedgerError",
    "SiteBudget",
    "SiteLedger",
    "build_certificate",
    "calibrate_noise",
    "epsilon_of",
    "make_private",
    "plan_budget",
    "sample_rate_for",
    "verify_certificate",
    "verify_release",
    "write_certificate",
]
