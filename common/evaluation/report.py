"""evaluation.json, its schema, the PNG plots and report.md.

evaluation.json (schema_version 1). Numbers are JSON numbers; `null` marks a metric that is undefined
for the data at hand (too few records of a class, no generator for the membership attack, ...).

    schema_version   1
    mode             "bundle" | "folders" | "real_vs_real"
    created          ISO-8601 UTC time
    quick            bool: the --quick sizes were used
    inputs           real (path), synthetic (path or null), bundle (path or null), test_folds [int],
                     n_real_train, n_real_test, n_synthetic (int), pairing ("ecg_id" | "labels")
    settings         the resolved evaluation settings (sizes, epochs, seed, classifier hyperparameters)
    fidelity
      interlead_corr_error                 mean |R_real - R_syn| over off-diagonal lead pairs of the set-mean
                                           12x12 Pearson matrices (real = training records)
      interlead_corr_error_max             the largest such entry
      interlead_corr_error_paired          the same per label-matched pair, averaged over pairs
      interlead_corr_error_real_reference  the first metric for real held-out records of the same count
      interlead_corr_error_by_superclass   {NORM, MI, STTC, CD, HYP: number | null}
      psd_distance_db                      {mean: number, per_lead: {lead name: number}} log-spectral dB
      psd_distance_db_real_reference       mean over leads, real held-out records
      paired                               {rmse_mv, snr_db, n_pairs}
      frechet_distance                     synthetic vs real test, reference-classifier features
      frechet_distance_real_reference      real training records (same count) vs real test
    clinical
      features        {heart_rate_bpm, sdnn_ms, rmssd_ms, qrs_ms, pr_ms, qt_ms, qtc_ms:
                       {wasserstein, median_real, median_synthetic, defined_fraction_real,
                        defined_fraction_synthetic}}
      beats           {real, synthetic: {plausible_beat_fraction, records_with_beats_fraction, beats_per_record}}
      einthoven       {real, synthetic: {einthoven, goldberger_avr, goldberger_avl, goldberger_avf,
                       max_relation}}: relative residuals of the 12 leads as stored in the files
      demographics    {synthetic, real_test: {age_mae_years, sex_auroc, sex_accuracy, n_age, n_sex}}
    memorization
      dcr_share_closer_to_train, dcr_train_median, dcr_holdout_median, dcr_train_subset_median,
      nndr_median, nndr_min, near_copy_threshold, near_copy_rate, holdout_to_train_median,
      n_synthetic, n_reference (numbers)
      mia             {mia_auc, mia_tpr_at_0p1pct_fpr, mia_tpr_at_1pct_fpr, mia_n_members, mia_n_nonmembers,
                       mia_loss_members_mean, mia_loss_nonmembers_mean, mia_noise_draws,
                       calibrated: {the attack keys} | null (no public base)} | null (no generator)
    utility
      trtr, trtr_matched (| null), tstr   {macro_auroc_superclasses, macro_auroc_statements,
                                           statements_scored, n_train}
      low_data        [{n_real, n_synthetic, real_macro_auroc_superclasses, real_macro_auroc_statements,
                        mixed_macro_auroc_superclasses, mixed_macro_auroc_statements}]
    plots            {name: path relative to the output folder}
    timings_s        {section: seconds}

`EVALUATION_SCHEMA` states the same as a JSON Schema (the subset `validate` implements: type, properties,
required, additionalProperties, items, enum, minimum, maximum).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

SCHEMA_VERSION = 1
SUPERCLASS_NAMES = ("NORM", "MI", "STTC", "CD", "HYP")
FEATURE_NAMES = ("heart_rate_bpm", "sdnn_ms", "rmssd_ms", "qrs_ms", "pr_ms", "qt_ms", "qtc_ms")

NUM = {"type": "number"}
NUM_OR_NULL = {"type": ["number", "null"]}
UNIT = {"type": "number", "minimum": 0, "maximum": 1}
UNIT_OR_NULL = {"type": ["number", "null"], "minimum": 0, "maximum": 1}
COUNT = {"type": "integer", "minimum": 0}


def _obj(props: dict[str, Any], extra: bool = False) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": extra}


_SCORES = _obj({
    "macro_auroc_superclasses": UNIT_OR_NULL,
    "macro_auroc_statements": UNIT_OR_NULL,
    "statements_scored": COUNT,
    "n_train": COUNT,
})
_BEATS = _obj({"plausible_beat_fraction": UNIT_OR_NULL, "records_with_beats_fraction": UNIT, "beats_per_record": NUM})
_EINTHOVEN = _obj({k: NUM_OR_NULL for k in ("einthoven", "goldberger_avr", "goldberger_avl", "goldberger_avf", "max_relation")})
_DEMO = _obj({"age_mae_years": NUM_OR_NULL, "sex_auroc": UNIT_OR_NULL, "sex_accuracy": UNIT_OR_NULL, "n_age": NUM, "n_sex": NUM})
_FEATURE = _obj({
    "wasserstein": NUM_OR_NULL, "median_real": NUM_OR_NULL, "median_synthetic": NUM_OR_NULL,
    "defined_fraction_real": UNIT, "defined_fraction_synthetic": UNIT,
})
_ATTACK = {"mia_auc": UNIT, "mia_tpr_at_0p1pct_fpr": UNIT, "mia_tpr_at_1pct_fpr": UNIT, "mia_n_members": NUM,
           "mia_n_nonmembers": NUM}
_MIA = _obj({
    **_ATTACK, "mia_loss_members_mean": NUM, "mia_loss_nonmembers_mean": NUM, "mia_noise_draws": NUM,
    "calibrated": {**_obj(_ATTACK), "type": ["object", "null"]},
})
_MEMORIZATION_KEYS = (
    "dcr_share_closer_to_train", "dcr_train_median", "dcr_holdout_median", "dcr_train_subset_median", "nndr_median",
    "nndr_min", "near_copy_threshold", "near_copy_rate", "holdout_to_train_median", "n_synthetic", "n_reference",
)

EVALUATION_SCHEMA: dict[str, Any] = _obj({
    "schema_version": {"type": "integer", "enum": [SCHEMA_VERSION]},
    "mode": {"type": "string", "enum": ["bundle", "folders", "real_vs_real"]},
    "created": {"type": "string"},
    "quick": {"type": "boolean"},
    "inputs": _obj({
        "real": {"type": "string"},
        "synthetic": {"type": ["string", "null"]},
        "bundle": {"type": ["string", "null"]},
        "test_folds": {"type": "array", "items": {"type": "integer"}},
        "n_real_train": COUNT,
        "n_real_test": COUNT,
        "n_synthetic": COUNT,
        "pairing": {"type": "string", "enum": ["ecg_id", "labels"]},
    }),
    "settings": {"type": "object"},
    "fidelity": _obj({
        "interlead_corr_error": NUM,
        "interlead_corr_error_max": NUM,
        "interlead_corr_error_paired": NUM,
        "interlead_corr_error_real_reference": NUM_OR_NULL,
        "interlead_corr_error_by_superclass": _obj({k: NUM_OR_NULL for k in SUPERCLASS_NAMES}),
        "psd_distance_db": _obj({"mean": NUM, "per_lead": {"type": "object", "additionalProperties": NUM}}),
        "psd_distance_db_real_reference": NUM_OR_NULL,
        "paired": _obj({"rmse_mv": NUM, "snr_db": NUM, "n_pairs": COUNT}),
        "frechet_distance": NUM_OR_NULL,
        "frechet_distance_real_reference": NUM_OR_NULL,
    }),
    "clinical": _obj({
        "features": _obj({k: _FEATURE for k in FEATURE_NAMES}),
        "beats": _obj({"real": _BEATS, "synthetic": _BEATS}),
        "einthoven": _obj({"real": _EINTHOVEN, "synthetic": _EINTHOVEN}),
        "demographics": _obj({"synthetic": _DEMO, "real_test": _DEMO}),
    }),
    "memorization": _obj({**{k: NUM for k in _MEMORIZATION_KEYS}, "mia": {**_MIA, "type": ["object", "null"]}}),
    "utility": _obj({
        "trtr": _SCORES,
        "trtr_matched": {**_SCORES, "type": ["object", "null"]},
        "tstr": _SCORES,
        "low_data": {"type": "array", "items": _obj({
            "n_real": COUNT, "n_synthetic": COUNT,
            "real_macro_auroc_superclasses": UNIT_OR_NULL, "real_macro_auroc_statements": UNIT_OR_NULL,
            "mixed_macro_auroc_superclasses": UNIT_OR_NULL, "mixed_macro_auroc_statements": UNIT_OR_NULL,
        })},
    }),
    "plots": {"type": "object", "additionalProperties": {"type": "string"}},
    "timings_s": {"type": "object", "additionalProperties": NUM},
})


class SchemaError(ValueError):
    """evaluation.json content that does not follow EVALUATION_SCHEMA; the message names the path."""


def _type_ok(value: Any, name: str) -> bool:
    if name == "null":
        return value is None
    if name == "boolean":
        return isinstance(value, bool)
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if name == "string":
        return isinstance(value, str)
    if name == "array":
        return isinstance(value, list)
    if name == "object":
        return isinstance(value, dict)
    raise ValueError(f"schema uses unsupported type {name!r}")


def validate(value: Any, schema: dict[str, Any] = EVALUATION_SCHEMA, path: str = "$") -> None:
    """Raise SchemaError at the first place `value` departs from `schema`."""
    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else list(types)
        if not any(_type_ok(value, n) for n in names):
            raise SchemaError(f"{path}: expected {' or '.join(names)}, got {type(value).__name__} {value!r:.80}")
    if value is None:
        return
    if "enum" in schema and value not in schema["enum"]:
        raise SchemaError(f"{path}: {value!r} is not one of {schema['enum']}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            raise SchemaError(f"{path}: {value} is below the minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            raise SchemaError(f"{path}: {value} is above the maximum {schema['maximum']}")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in value:
                raise SchemaError(f"{path}: missing key '{key}'")
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            if key in props:
                validate(item, props[key], f"{path}.{key}")
            elif extra is False:
                raise SchemaError(f"{path}: unexpected key '{key}'")
            elif isinstance(extra, dict):
                validate(item, extra, f"{path}.{key}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            validate(item, schema["items"], f"{path}[{i}]")


def to_jsonable(value: Any) -> Any:
    """numpy scalars/arrays -> Python; NaN/inf -> None (JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return [to_jsonable(v) for v in value.tolist()]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    return value


def write_json(report: dict[str, Any], out_dir: str | Path) -> Path:
    """Validate and write evaluation.json."""
    report = to_jsonable(report)
    validate(report)
    path = Path(out_dir) / "evaluation.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    return path


# ----------------------------------------------------------------------------------------------------
# Plots


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_correlation(real_mean: np.ndarray, syn_mean: np.ndarray, leads: tuple[str, ...], path: Path) -> Path:
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    panels = ((real_mean, "real", "RdBu_r", (-1, 1)), (syn_mean, "synthetic", "RdBu_r", (-1, 1)),
              (np.abs(real_mean - syn_mean), "|real - synthetic|", "magma", (0, 1)))
    for ax, (m, title, cmap, (lo, hi)) in zip(axes, panels):
        im = ax.imshow(m, cmap=cmap, vmin=lo, vmax=hi)
        ax.set_xticks(range(len(leads)), leads, rotation=90, fontsize=7)
        ax.set_yticks(range(len(leads)), leads, fontsize=7)
        ax.set_title(f"mean inter-lead correlation: {title}", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, path)


def plot_psd(freqs: np.ndarray, real_psd: np.ndarray, syn_psd: np.ndarray, leads: tuple[str, ...], path: Path) -> Path:
    fig, axes = plt.subplots(3, 4, figsize=(14, 8), sharex=True)
    for k, ax in enumerate(axes.flat[: len(leads)]):
        ax.semilogy(freqs, real_psd[k] + 1e-12, label="real", color="black", lw=1)
        ax.semilogy(freqs, syn_psd[k] + 1e-12, label="synthetic", color="tab:red", lw=1)
        ax.set_title(leads[k], fontsize=9)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("Hz")
    fig.suptitle("Welch PSD (mean over records, mV^2/Hz)", fontsize=10)
    return _save(fig, path)


def plot_features(real_table: np.ndarray, syn_table: np.ndarray, names: tuple[str, ...], path: Path) -> Path:
    cols = 4
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(14, 3.2 * rows))
    for k, ax in enumerate(axes.flat):
        if k >= len(names):
            ax.axis("off")
            continue
        a = real_table[:, k][np.isfinite(real_table[:, k])]
        b = syn_table[:, k][np.isfinite(syn_table[:, k])]
        both = np.concatenate([a, b])
        if both.size:
            lo, hi = np.percentile(both, [1, 99])
            bins = np.linspace(lo, hi if hi > lo else lo + 1, 30)
            ax.hist(a, bins=bins, density=True, alpha=0.5, label="real", color="black")
            ax.hist(b, bins=bins, density=True, alpha=0.5, label="synthetic", color="tab:red")
        ax.set_title(names[k], fontsize=9)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("Lead II delineation: per-record features", fontsize=10)
    return _save(fig, path)


def plot_dcr(d_syn_train: np.ndarray, d_syn_hold: np.ndarray, d_hold_train: np.ndarray, threshold: float, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    allv = np.concatenate([d_syn_train, d_syn_hold, d_hold_train])
    bins = np.linspace(0, np.percentile(allv, 99.5) if allv.size else 1, 40)
    ax.hist(d_syn_train, bins=bins, alpha=0.5, density=True, label="synthetic -> train (subset)")
    ax.hist(d_syn_hold, bins=bins, alpha=0.5, density=True, label="synthetic -> holdout")
    ax.hist(d_hold_train, bins=bins, histtype="step", density=True, color="black", label="holdout -> train (real)")
    ax.axvline(threshold, color="tab:red", ls="--", label="near-copy threshold")
    ax.set_xlabel("distance to closest record (RMS, normalized units)")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_roc(fpr: np.ndarray, tpr: np.ndarray, auc: float, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(fpr, tpr, label=f"loss attack (AUC {auc:.3f})")
    grid = np.logspace(-3, 0, 100)
    ax.plot(grid, grid, "k--", lw=0.8, label="chance")  # TPR = FPR, drawn on the log axis
    ax.set_xscale("log")
    ax.set_xlim(1e-3, 1)
    ax.set_xlabel("false positive rate (log)")
    ax.set_ylabel("true positive rate")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_utility(utility: dict[str, Any], path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names, values = [], []
    for key, label in (("trtr", "TRTR"), ("trtr_matched", "TRTR matched"), ("tstr", "TSTR")):
        res = utility.get(key)
        if res and res.get("macro_auroc_superclasses") is not None:
            names.append(f"{label}\n(n={res['n_train']})")
            values.append(res["macro_auroc_superclasses"])
    axes[0].bar(names, values, color=["black", "gray", "tab:red"][: len(values)])
    axes[0].set_ylim(0.0, 1.0)
    axes[0].axhline(0.5, color="k", lw=0.5, ls="--")  # chance
    axes[0].set_title("macro AUROC, superclasses (real test)", fontsize=9)
    rows = utility.get("low_data", [])
    if rows:
        n = [r["n_real"] for r in rows]
        axes[1].plot(n, [r["real_macro_auroc_superclasses"] for r in rows], "o-", color="black", label="real subset")
        axes[1].plot(n, [r["mixed_macro_auroc_superclasses"] for r in rows], "o-", color="tab:red", label="real subset + synthetic")
        axes[1].set_xscale("log")
        axes[1].set_xticks(n, [str(v) for v in n])
        axes[1].minorticks_off()
        axes[1].legend(fontsize=7)
    axes[1].set_xlabel("real training records")
    axes[1].set_title("low-data regime: macro AUROC, superclasses", fontsize=9)
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------------
# report.md


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def write_markdown(report: dict[str, Any], out_dir: str | Path) -> Path:
    """A short human-readable report with every section and its plots."""
    r = to_jsonable(report)
    f, c, m, u, i = r["fidelity"], r["clinical"], r["memorization"], r["utility"], r["inputs"]
    plots = r.get("plots", {})

    def img(name: str) -> str:
        return f"\n![{name}]({plots[name]})\n" if name in plots else ""

    lines = [
        "# Synthetic ECG evaluation",
        "",
        f"Mode `{r['mode']}`{' (quick sizes)' if r['quick'] else ''}; real data `{i['real']}`"
        + (f"; synthetic `{i['synthetic']}`" if i["synthetic"] else "")
        + (f"; bundle `{i['bundle']}`" if i["bundle"] else "")
        + f". Real training records {i['n_real_train']}, real test records {i['n_real_test']} (folds {i['test_folds']}),"
        f" synthetic records {i['n_synthetic']}, pairs by {i['pairing']}.",
        "",
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
    lines += [
        "",
        f"Plausible beats: real {_fmt(b['real']['plausible_beat_fraction'])}, synthetic {_fmt(b['synthetic']['plausible_beat_fraction'])}."
        f" Records with detected beats: real {_fmt(b['real']['records_with_beats_fraction'])}, synthetic {_fmt(b['synthetic']['records_with_beats_fraction'])}.",
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
        "## Memorization",
        "",
        "| metric | value | ideal |",
        "|---|---|---|",
        f"| share of synthetic records closer to train than to holdout | {_fmt(m['dcr_share_closer_to_train'])} | about 0.5 |",
        f"| median DCR to train / to holdout | {_fmt(m['dcr_train_subset_median'])} / {_fmt(m['dcr_holdout_median'])} | similar |",
        f"| median NNDR (closest / second closest) | {_fmt(m['nndr_median'])} (min {_fmt(m['nndr_min'])}) | not near 0 |",
        f"| near-copy rate (threshold {_fmt(m['near_copy_threshold'])}) | {_fmt(m['near_copy_rate'])} | at most about 0.01 |",
    ]
    if m.get("mia"):
        lines += [
            f"| membership inference AUC (loss attack, {int(m['mia']['mia_noise_draws'])} noise draws per timestep) "
            f"| {_fmt(m['mia']['mia_auc'])} | 0.5 |",
            f"| membership inference TPR at 0.1% / 1% FPR | {_fmt(m['mia']['mia_tpr_at_0p1pct_fpr'])} / "
            f"{_fmt(m['mia']['mia_tpr_at_1pct_fpr'])} | 0.001 / 0.01 |",
        ]
        calibrated = m["mia"].get("calibrated")
        if calibrated:
            lines += [
                f"| calibrated attack AUC (loss reduction from the public base) | {_fmt(calibrated['mia_auc'])} | 0.5 |",
                f"| calibrated attack TPR at 0.1% / 1% FPR | {_fmt(calibrated['mia_tpr_at_0p1pct_fpr'])} / "
                f"{_fmt(calibrated['mia_tpr_at_1pct_fpr'])} | 0.001 / 0.01 |",
            ]
    else:
        lines.append("| membership inference | not run (no generator) | |")
    if m.get("mia"):
        lines += ["", "Members of the attack are real training-fold records; any the generator did not train on "
                  "pull the AUC towards 0.5, so it is a lower bound of the membership risk."]
    lines += [img("dcr"), img("mia_roc"), "## Utility", "", "Macro AUROC on the real test fold.", "",
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
    lines += [img("utility"), "Definitions: see the docstrings of common/evaluation/*.py.", ""]
    path = Path(out_dir) / "report.md"
    path.write_text("\n".join(lines))
    return path
