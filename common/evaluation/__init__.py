"""Evaluation of synthetic ECGs: fidelity, clinical coherence, memorization and downstream utility.

Entry points others call:
- `quick_fidelity(synthetic12, real12)`: cheap monitoring numbers during training (fidelity.py);
- `site_memorization_metrics(model, diffusion, normalizer, train, holdout, synthetic8_mV)`: aggregate
  memorization numbers computed inside a site (memorization.py);
- `pipeline.run` (via `fedecg evaluate`): the full report. sections.py computes each section (fidelity,
  clinical over fiducials.py's delineator, memorization, utility) and returns what it computed;
  evaluation.json (schema.py, checked by report.py), the plots (plots.py) and report.md (markdown.py).
"""

from .fidelity import quick_fidelity
from .memorization import site_memorization_metrics

__all__ = ["quick_fidelity", "site_memorization_metrics"]
