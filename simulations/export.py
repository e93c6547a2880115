"""`fedecg export`: a run directory -> a self-contained, checksummed release bundle with a model card."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from common.bundle import WEIGHTS, latest_checkpoint, read_checkpoint, write_bundle
from common.config import to_dict
from common.expert import expert_bundle_files, load_expert_run
from common.privacy import verify_release
from common.scp import SCP_CODES
from simulations.model_card import model_card


def export_bundle(run_dir: Path, out: Path, evaluation: Path | None = None) -> Path:
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"{run_dir}: no checkpoint to export")
    _, cfg, normalizer, progress = read_checkpoint(checkpoint)
    certificate = None
    files: dict[str, bytes | Path] = {
        WEIGHTS: checkpoint / WEIGHTS,
        "config.yaml": yaml.safe_dump(to_dict(cfg), sort_keys=False).encode(),
        "normalization.json": json.dumps(normalizer.to_dict(), indent=2).encode(),
        "labels.json": json.dumps(list(SCP_CODES)).encode(),
    }
    outside_dp: dict[str, str] = {}
    if (run_dir / "privacy.json").is_file():
        problems = verify_release(run_dir)
        if problems:
            raise ValueError(f"{run_dir / 'privacy.json'} does not verify: " + "; ".join(problems))
        certificate = json.loads((run_dir / "privacy.json").read_text())
        files["privacy.json"] = run_dir / "privacy.json"
    elif cfg.privacy.enabled:
        raise FileNotFoundError(f"{run_dir}: privacy is enabled but the run wrote no privacy.json")
    report = None
    if evaluation is not None:  # only on request: it was computed with access to real records
        from common.evaluation.report import SchemaError, validate

        if not evaluation.is_file():
            raise FileNotFoundError(f"--evaluation {evaluation}: no such file")
        report = json.loads(evaluation.read_text())
        try:
            validate(report)
        except SchemaError as err:
            raise ValueError(f"{evaluation} is not a fedecg evaluation report: {err}") from err
        files["evaluation.json"] = evaluation
        outside_dp["evaluation.json"] = "computed with access to real records; not covered by privacy.json"
    audit = None
    if (run_dir / "audit.json").is_file():  # from the weights, the public candidates and the audit's own coins
        audit = json.loads((run_dir / "audit.json").read_text())
        files["audit.json"] = run_dir / "audit.json"
    expert = None
    if cfg.diffusion.expert:  # the bundle samples with its own copy of the public expert
        expert = load_expert_run(cfg.diffusion.expert, cfg, normalizer)
        named = (certificate or {}).get("public_expert") or {}
        if certificate is not None and named.get("weights_sha256") != expert.provenance["weights_sha256"]:
            raise ValueError(f"diffusion.expert={cfg.diffusion.expert}: not the public expert privacy.json names")
        files.update(expert_bundle_files(expert))
    files["MODEL_CARD.md"] = model_card(run_dir, cfg, progress, certificate, report, audit,
                                        expert=None if expert is None else expert.provenance).encode()
    return write_bundle(out, files, outside_dp_guarantee=outside_dp)
