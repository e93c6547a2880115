"""MODEL_CARD.md of a release bundle: what the generator is, its data and training, its privacy guarantee
(and audit), its intended use and limits, and evaluation headlines when an evaluation is released with it."""

from __future__ import annotations

from pathlib import Path

from common.config import config_hash
from common.model.denoiser import build_denoiser, count_parameters

_USE_AND_LIMITATIONS = [
    "## Intended use",
    "Research on ECG analysis methods, data augmentation, teaching and pipeline testing, where synthetic "
    "records stand in for real ones. Sample with `fedecg sample --bundle <bundle> ...`.",
    "",
    "## Limitations",
    "- Not a medical device; synthetic ECGs must not be used for diagnosis or to make claims about patients.",
    "- 100 Hz, 10 s records only; fine morphology above 50 Hz is absent.",
    "- Statements and demographics rare in the training sites are generated poorly; check the evaluation.",
    "- DP protects individual records (or patients with `privacy.unit: patient`); it does not hide "
    "site-level or population-level properties of the data.",
    "- Normalization uses fixed public constants, not statistics of any site's data.",
]


def model_card(run_dir: Path, cfg, progress: dict, certificate: dict | None, evaluation: dict | None,
               audit: dict | None = None, expert: dict | None = None) -> str:
    """The card's markdown; `progress` is the checkpoint's, the other dicts are the files the bundle carries
    (`expert`: the provenance of the public expert it samples with)."""
    lines = ["# Model card: fedecg synthetic 12-lead ECG generator", "", *_what_it_is(cfg), "",
             *_data(cfg, certificate, expert), "", *_training(cfg, progress), "", *_privacy(certificate)]
    if audit:
        lines += ["", *_audit_section(audit)]
    lines += ["", *_USE_AND_LIMITATIONS]
    if evaluation:
        lines += ["", *_evaluation(evaluation)]
    return "\n".join(lines) + "\n"


def _what_it_is(cfg) -> list[str]:
    params = count_parameters(build_denoiser(cfg.model))
    return [
        "## What it is",
        f"A conditional denoising diffusion model of the SSSD-ECG class (residual blocks with S4D state-space "
        f"layers; preset `{cfg.model.size}`, {params:,} parameters) trained with mel-spectrogram informed "
        f"diffusion training (MIDT: eps loss + {cfg.midt.weight} x mel loss). It generates 8 independent leads "
        f"(I, II, V1-V6) of 10 s at 100 Hz in mV; III, aVR, aVL and aVF are derived exactly (Einthoven, Goldberger). "
        f"It is conditioned on the 71 PTB-XL SCP statements and on age, sex, height and weight (each optional).",
    ]


def _data(cfg, certificate: dict | None, expert: dict | None) -> list[str]:
    """The partition, the sites' epsilon table under DP, the public base the federation started from and the
    public expert sampling asks at high noise."""
    lines = [
        "## Data",
        f"PTB-XL (Wagner et al., Scientific Data 2020; CC BY 4.0), partitioned into simulated hospitals by "
        f"scheme `{cfg.partition.scheme}` ({cfg.partition.num_sites} sites, patient-disjoint), training folds "
        f"{list(cfg.partition.train_folds)}. No record left its site: under DP each site sent only model weights "
        f"and numbers fixed by the public plan (its record count, noise, sample rate, steps and epsilon spent).",
    ]
    if certificate:
        lines += ["", "| site | records N | epsilon (replace-one) | epsilon (add/remove) | target | sigma | sample rate | steps |",
                  "|---|---|---|---|---|---|---|---|"]
        for s in certificate["sites"]:
            lines.append(
                f"| {s['site']} | {s['num_records']} | {s['epsilon']:.3f} | {s['epsilon_add_remove']:.3f} | "
                f"{s['target_epsilon']:.2f} | {s['noise_multiplier']:.3f} | {s['sample_rate']:.5f} | {s['steps']} |"
            )
    base = (certificate or {}).get("base_model")
    if base:
        lines += ["", f"Public base model: pretrained centrally without DP on {base['records']} records of "
                      f"{base['patients']} patients ({base['trained_on']}), {base['steps']} steps, weights sha256 "
                      f"`{base['weights_sha256']}`. The federation started from it; DP covers only the sites' records."]
    if expert:
        lines += ["", f"Public high-noise expert (expert.safetensors): a second denoiser that answers the sampling steps "
                      f"t >= {cfg.diffusion.expert_from} of {cfg.diffusion.timesteps}, where the beats are laid out; "
                      f"this model answers the rest. Pretrained centrally without DP on {expert['records']} records of "
                      f"{expert['patients']} patients ({expert['trained_on']}), {expert['steps']} steps, weights "
                      f"sha256 `{expert['weights_sha256']}`. It saw no site's record and no federated round changed it."]
        if expert.get("rhythm_sha256"):
            lines += ["", "Rhythm: the expert also reads a beat map. Each sample's beat times are drawn from "
                          "expert_rhythm.json, a table of the same public records (rhythm statements, mean RR interval, "
                          f"RR variability; sha256 `{expert['rhythm_sha256']}`), matched on the requested rhythm "
                          "statements. Rhythms rare in that public pool are drawn from few records."]
    return lines


def _how_trained(cfg, progress: dict) -> str:
    """A central run's checkpoint counts optimizer steps, a federated one's counts rounds."""
    if progress.get("kind") == "central":
        return f"Trained centrally (one data holder, no federation), {progress.get('step', '?')} optimizer steps"
    return (f"Federated with Flower, strategy `{cfg.federation.strategy}`, {progress.get('round', '?')} rounds of "
            f"{cfg.federation.local_steps} local steps")


def _training(cfg, progress: dict) -> list[str]:
    fc = cfg.federation
    federated = progress.get("kind") != "central"
    # The sites train at federation.local_lr where it is set (fine-tuning a base), not at train.lr.
    lr = fc.local_lr if federated and fc.local_lr is not None else cfg.train.lr
    subset = f", training only the parameters under {', '.join(fc.trainable)}" if federated and fc.trainable else ""
    return [
        "## Training",
        f"{_how_trained(cfg, progress)}, batch {cfg.train.batch_size}, AdamW lr {lr}{subset}, "
        f"T={cfg.diffusion.timesteps} ({cfg.diffusion.schedule} schedule). Config SHA256 `{config_hash(cfg)}`.",
    ]


def _privacy(certificate: dict | None) -> list[str]:
    """The certificate's statement in plain words and what it does not cover; or that there is none."""
    if not certificate:
        return ["## Privacy guarantee, in plain words",
                "**None.** This generator was trained without differential privacy; do not release it outside the data holders."]
    rel = certificate["release"]
    return [
        "## Privacy guarantee, in plain words",
        rel["statement"],
        "",
        f"In plain words: had any one {rel['unit']} been replaced by another, the released weights would "
        f"have been almost as likely. The chance of any outcome changes by a factor of at most "
        f"e^{rel['epsilon']:.3g}, except with probability {rel['delta']:g}. Check it yourself: "
        f"`fedecg privacy verify <this bundle>` recomputes every site's noise, sampling rate, planned steps "
        f"and epsilon from the embedded config ({certificate['accountant']}), and checks that the weights and "
        f"config in this bundle are the certified ones. It cannot prove that the weights were trained as "
        f"certified: that rests on the sites running this code.",
        "",
        "What the guarantee does not cover:",
        *[f"- {item}" for item in certificate["not_covered"]],
    ]


def _audit_section(audit: dict) -> list[str]:
    from common.privacy.audit import audit_table

    bound = audit["bound"]
    return [
        "## Empirical privacy audit (audit.json)",
        f"This run was trained with {bound['slots']} canary slots planted at its sites (one record per slot, a "
        f"secret coin choosing which of two public candidates trained) and audited in one run: {audit['method']}. "
        f"The empirical epsilon is a lower bound at {bound['confidence']:.0%} confidence: what the trained weights "
        f"demonstrably leak about the canaries. The certified epsilon is the upper bound the mechanism promises; a "
        f"lower bound above it would show the certificate false.",
        "",
        "```",
        audit_table(audit),
        "```",
    ]


def _headline(evaluation: dict) -> list[tuple[str, str]]:
    out = []
    for section in ("fidelity", "clinical", "memorization", "utility"):
        block = evaluation.get(section, {})
        for key, value in block.items():
            if isinstance(value, (int, float)):
                out.append((f"{section}.{key}", f"{value:.4g}"))
    return out[:20]


def _evaluation(evaluation: dict) -> list[str]:
    lines = ["## Evaluation (outside the DP guarantee)",
             "evaluation.json was computed with access to real records (training and test folds) and is "
             "released outside the DP mechanism: its numbers are not covered by the certificate above. "
             "Headline numbers:", ""]
    for key, value in _headline(evaluation):
        lines.append(f"- {key}: {value}")
    return lines
