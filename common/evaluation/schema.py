"""The schema of evaluation.json, as a JSON Schema dict.

evaluation.json (schema_version 2). Numbers are JSON numbers; `null` marks a metric that is undefined
for the data at hand (too few records of a class, no generator for the membership attack, ...).

    schema_version   2 (2 added beats.regular_rhythm_fraction)
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
      beats           {real, synthetic: {plausible_beat_fraction, records_with_beats_fraction,
                       regular_rhythm_fraction, beats_per_record}}
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

`EVALUATION_SCHEMA` states the same as a JSON Schema (draft 2020-12), checked by `report.validate`.
"""

from __future__ import annotations

from typing import Any

SCHEMA_VERSION = 2
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
_BEATS = _obj({"plausible_beat_fraction": UNIT_OR_NULL, "records_with_beats_fraction": UNIT,
               "regular_rhythm_fraction": UNIT, "beats_per_record": NUM})
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
