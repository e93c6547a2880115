"""report.md: a short human-readable report of evaluation.json, one section per metric family, with its plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from .clinical import REGULAR_RR_TOLERANCE
from .report import to_jsonable


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


Image = Callable[[str], str]  # plot name -> markdown image line ("" when the plot was not made)


def write_markdown(report: dict[str, Any], out_dir: str | Path) -> Path:
    """A short human-readable report with every section and its plots."""
    r = to_jsonable(report)
    plots = r.get("plots", {})

    def img(name: str) -> str:
        return f"\n![{name}]({plots[name]})\n" if name in plots else ""

    lines = [
        *_header(r),
        *_fidelity(r["fidelity"], img),
        *_clinical(r["clinical"], img),
        *_memorization(r["memorization"], img),
        *_utility(r["utility"], img),
        "Definitions: see the docstrings of common/evaluation/*.py.",
        "",
    ]
    path = Path(out_dir) / "report.md"
    path.write_text("\n".join(lines))
    return path


def _header(r: dict[str, Any]) -> list[str]:
    i = r["inputs"]
    return [
        "# Synthetic ECG evaluation",
        "",
        f"Mode `{r['mode']}`{' (quick sizes)' if r['quick'] else ''}; real data `{i['real']}`"
        + (f"; synthetic `{i['synthetic']}`" if i["synthetic"] else "")
        + (f"; bundle `{i['bundle']}`" if i["bundle"] else "")
        + f". Real training records {i['n_real_train']}, real test records {i['n_real_test']} (folds {i['test_folds']}),"
        f" synthetic records {i['n_synthetic']}, pairs by {i['pairing']}.",
        "",
    ]


def _fidelity(f: dict[str, Any], img: Image) -> list[str]:
    return [
        "## Fidelity",
        "",
        "| metric | synthetic | real reference |",
        "|---|---|---|",
        f"| inter-lead correlation error (mean abs, off-diagonal) | {_fmt(f['interlead_corr_error'])} | {_fmt(f['interlead_corr_error_real_reference'])} |",
        f"| inter-lead correlation error, max entry | {_fmt(f['interlead_corr_error_max'])} | |",
        f"| inter-lead correlation error, per pair | {_fmt(f['interlead_corr_error_paired'])} | |",
        f"| PSD log-spectral distance (dB, mean over leads) | {_fmt(f['psd_distance_db']['mean'])} | {_fmt(f['psd_distance_db_real_reference'])} |",
        f"| paired RMSE (mV) | {_fmt(f['paired']['rmse_mv'])} | |",
        f"| paired SNR (dB) | {_fmt(f['paired']['snr_db'])} | |",
        f"| Frechet distance (classifier features) | {_fmt(f['frechet_distance'])} | {_fmt(f['frechet_distance_real_reference'])} |",
        "",
        "Inter-lead correlation error by superclass: "
        + ", ".join(f"{k} {_fmt(v)}" for k, v in f["interlead_corr_error_by_superclass"].items()) + ".",
        img("interlead_correlation"),
        img("psd"),
        img("examples"),
    ]


def _clinical(c: dict[str, Any], img: Image) -> list[str]:
    lines = [
        "## Clinical coherence",
        "",
        "Lead II delineation at 100 Hz (R peaks, QRS, P onset, T end); Wasserstein distance real vs synthetic.",
        "",
        "| feature | Wasserstein | median real | median synthetic | defined real | defined synthetic |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in c["features"].items():
        lines.append(
            f"| {name} | {_fmt(row['wasserstein'], 2)} | {_fmt(row['median_real'], 1)} | {_fmt(row['median_synthetic'], 1)}"
            f" | {_fmt(row['defined_fraction_real'], 2)} | {_fmt(row['defined_fraction_synthetic'], 2)} |"
        )
    b, e, d = c["beats"], c["einthoven"], c["demographics"]
    return lines + [
        "",
        f"Plausible beats: real {_fmt(b['real']['plausible_beat_fraction'])}, synthetic {_fmt(b['synthetic']['plausible_beat_fraction'])}."
        f" Records with detected beats: real {_fmt(b['real']['records_with_beats_fraction'])}, synthetic {_fmt(b['synthetic']['records_with_beats_fraction'])}."
        f" Records in a regular rhythm (every RR within {REGULAR_RR_TOLERANCE:.0%} of the record's median): real"
        f" {_fmt(b['real']['regular_rhythm_fraction'])}, synthetic {_fmt(b['synthetic']['regular_rhythm_fraction'])}.",
        "",
        f"Lead-system consistency of the stored 12 leads (largest relative residual of Einthoven/Goldberger):"
        f" real {_fmt(e['real']['max_relation'], 4)}, synthetic {_fmt(e['synthetic']['max_relation'], 4)}.",
        "",
        "Demographic faithfulness (predictors trained on real training records):",
        "",
        "| records | age MAE (years) | sex AUROC | sex accuracy |",
        "|---|---|---|---|",
        f"| synthetic vs conditioned values | {_fmt(d['synthetic']['age_mae_years'], 1)} | {_fmt(d['synthetic']['sex_auroc'])} | {_fmt(d['synthetic']['sex_accuracy'])} |",
        f"| real test (reference) | {_fmt(d['real_test']['age_mae_years'], 1)} | {_fmt(d['real_test']['sex_auroc'])} | {_fmt(d['real_test']['sex_accuracy'])} |",
        img("clinical_features"),
    ]


def _memorization(m: dict[str, Any], img: Image) -> list[str]:
    lines = [
        "## Memorization",
        "",
        "| metric | value | ideal |",
        "|---|---|---|",
        f"| share of synthetic records closer to train than to holdout | {_fmt(m['dcr_share_closer_to_train'])} | about 0.5 |",
        f"| median DCR to train / to holdout | {_fmt(m['dcr_train_subset_median'])} / {_fmt(m['dcr_holdout_median'])} | similar |",
        f"| median NNDR (closest / second closest) | {_fmt(m['nndr_median'])} (min {_fmt(m['nndr_min'])}) | not near 0 |",
        f"| near-copy rate (threshold {_fmt(m['near_copy_threshold'])}) | {_fmt(m['near_copy_rate'])} | at most about 0.01 |",
    ]
    mia = m.get("mia")
    if mia:
        lines += _attack_rows(mia)
        lines += ["", "Members of the attack are real training-fold records; any the generator did not train on "
                  "pull the AUC towards 0.5, so it is a lower bound of the membership risk."]
    else:
        lines.append("| membership inference | not run (no generator) | |")
    return lines + [img("dcr"), img("mia_roc")]


def _attack_rows(mia: dict[str, Any]) -> list[str]:
    rows = [
        f"| membership inference AUC (loss attack, {int(mia['mia_noise_draws'])} noise draws per timestep) "
        f"| {_fmt(mia['mia_auc'])} | 0.5 |",
        f"| membership inference TPR at 0.1% / 1% FPR | {_fmt(mia['mia_tpr_at_0p1pct_fpr'])} / "
        f"{_fmt(mia['mia_tpr_at_1pct_fpr'])} | 0.001 / 0.01 |",
    ]
    calibrated = mia.get("calibrated")
    if calibrated:
        rows += [
            f"| calibrated attack AUC (loss reduction from the public base) | {_fmt(calibrated['mia_auc'])} | 0.5 |",
            f"| calibrated attack TPR at 0.1% / 1% FPR | {_fmt(calibrated['mia_tpr_at_0p1pct_fpr'])} / "
            f"{_fmt(calibrated['mia_tpr_at_1pct_fpr'])} | 0.001 / 0.01 |",
        ]
    return rows


def _utility(u: dict[str, Any], img: Image) -> list[str]:
    lines = ["## Utility", "", "Macro AUROC on the real test fold.", "",
             "| training data | records | superclasses | statements (scored) |", "|---|---|---|---|"]
    for key, label in (("trtr", "real (TRTR)"), ("trtr_matched", "real, matched to synthetic"), ("tstr", "synthetic (TSTR)")):
        res = u.get(key)
        if res:
            lines.append(f"| {label} | {res['n_train']} | {_fmt(res['macro_auroc_superclasses'])} | "
                         f"{_fmt(res['macro_auroc_statements'])} ({res['statements_scored']}) |")
    if u["low_data"]:
        lines += ["", "Low-data regime (superclasses / statements):", "",
                  "| real records | real only | real + synthetic |", "|---|---|---|"]
        for row in u["low_data"]:
            lines.append(
                f"| {row['n_real']} | {_fmt(row['real_macro_auroc_superclasses'])} / {_fmt(row['real_macro_auroc_statements'])}"
                f" | {_fmt(row['mixed_macro_auroc_superclasses'])} / {_fmt(row['mixed_macro_auroc_statements'])} |"
            )
    return lines + [img("utility")]
