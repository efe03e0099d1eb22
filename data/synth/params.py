"""Every knob of the synthetic cohort, as dataclasses (saved whole into cohort.json; the FLAIR and PET
sections only when those sequences are requested, so a default cohort.json is unchanged).

The numbers are chosen so the cohort behaves like a post-radiosurgery brain-metastasis T1-CE study:
see docs/SYNTHETIC_COHORT.md for the equations they enter.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from data.prep_config import F18_HALF_LIFE_MIN

GENERATOR_VERSION = 1  # bump when the same seed and parameters would give different files

HISTOLOGIES = ("lung", "breast", "melanoma", "renal", "other")
# Standardised image latents of one lesion; positive = more of the named feature.
LATENTS = ("rim", "nodularity", "core", "oedema", "peritumoral", "irregularity", "septation")
# Clinical variables of every subject row, in manifest order; `outcome.missing_columns` names some of them.
CLINICAL_COLUMNS = ("age", "sex", "kps", "histology", "dose_gy", "months_since_srs", "steroid_use")
# Image channels the generator can write; T1-CE is the `image` column and always present.
SEQUENCES = ("t1ce", "flair", "pet")
# Per-patient PET acquisition columns, written right after the image columns when PET is requested.
PET_COLUMNS = ("pet_dose_mbq", "pet_weight_kg", "pet_minutes")


@dataclass
class SiteParams:
    """One acquisition protocol. Intensities are in units of normal white matter (= 1) before `scale`."""
    name: str = "siteA"
    spacing: tuple[float, float, float] = (2.0, 2.0, 2.0)  # mm, stored voxel size (x, y, z)
    fov_mm: tuple[float, float, float] = (180.0, 216.0, 176.0)  # field of view (x, y, z)
    orientation: str = "RAS"  # axis codes the file is stored in (the loader reorients to RAS)
    psf_sigma_mm: tuple[float, float, float] = (0.6, 0.6, 0.6)  # Gaussian point-spread / slice profile
    gamma: float = 1.0  # contrast curve I -> I**gamma (< 1 flattens grey/white contrast)
    bias_std: float = 0.08  # std of the log multiplicative bias field
    noise: float = 0.025  # Rician noise sigma, relative to white matter
    scale: float = 1000.0  # stored value of normal white matter
    jitter: float = 0.1  # per-scan relative spread of gamma, bias, noise and scale


@dataclass
class ExternalSiteParams(SiteParams):
    """Site B: thick slices, finer in-plane, LAS storage, flatter contrast, more bias and noise.

    A subclass (not a factory) so a partial override in YAML keeps site B's other defaults."""
    name: str = "siteB"
    spacing: tuple[float, float, float] = (1.5, 1.5, 3.0)
    orientation: str = "LAS"
    psf_sigma_mm: tuple[float, float, float] = (0.5, 0.5, 1.3)
    gamma: float = 0.8
    bias_std: float = 0.18
    noise: float = 0.05
    scale: float = 420.0


@dataclass
class LesionParams:
    """Lesion latents -> appearance. Latents z ~ N(0, 1) share one 'aggressiveness' factor g."""
    # Loading of each latent in LATENTS on g (sign = direction in which progression-like lesions lie).
    loadings: tuple[float, ...] = (0.7, 0.6, -0.6, -0.55, 0.6, 0.45, -0.55)
    radius_mm_median: float = 9.5  # equivalent radius of the enhancing lesion
    radius_log_sd: float = 0.35
    radius_mm_range: tuple[float, float] = (4.5, 20.0)
    rim_mm_range: tuple[float, float] = (0.8, 4.0)  # enhancing rim thickness at z = -inf .. +inf
    core_fraction_range: tuple[float, float] = (0.35, 0.97)  # non-enhancing share of the interior
    oedema_ratio_range: tuple[float, float] = (0.2, 1.8)  # oedema extent beyond the margin / radius
    irregularity_range: tuple[float, float] = (0.03, 0.25)  # relative amplitude of margin lobulation
    steroid_oedema_factor: float = 0.7  # steroids shrink visible oedema
    oedema_depth: float = 0.35  # relative T1 hypointensity of oedematous white matter
    enhancement_range: tuple[float, float] = (1.45, 1.75)  # enhancing tissue / white matter (nuisance)
    necrotic_range: tuple[float, float] = (0.28, 0.42)  # necrotic fluid / white matter (nuisance)
    extra_lesions_p: tuple[float, ...] = (0.55, 0.3, 0.15)  # P(0, 1, 2 non-index lesions) per scan
    unlabeled_lesions_p: tuple[float, ...] = (0.25, 0.35, 0.25, 0.15)  # P(0..3 lesions), unlabeled scans
    min_gap_mm: float = 8.0  # clearance between two lesions' margins


@dataclass
class OutcomeParams:
    """Clinical variables, the true logit of progression and the Weibull survival model."""
    intercept: float = 0.5
    image_weight: float = 0.9  # scales the whole image part of the logit
    # Image part: coefficient per standardised latent, in LATENTS order.
    beta_image: tuple[float, ...] = (0.85, 0.6, -0.7, -0.55, 0.6, 0.3, -0.5)
    # Clinical part: per histology (HISTOLOGIES order), dose per 4 Gy above 20, log(months/9),
    # KPS per 10 below 80, age per decade above 60, steroid use.
    beta_histology: tuple[float, ...] = (0.0, -0.8, 1.4, 1.0, 0.3)
    beta_dose: float = -0.7
    beta_months: float = 0.8
    beta_kps: float = 0.4
    beta_age: float = 0.15
    beta_steroid: float = -0.4
    # Survival: log-hazard ratio per unit of the same covariates, plus the label (progression).
    gamma_image: tuple[float, ...] = (0.3, 0.15, 0.0, 0.1, 0.25, 0.0, 0.0)
    gamma_log_radius: float = 0.4  # per unit log(radius / median)
    gamma_label: float = 0.8
    gamma_histology: tuple[float, ...] = (0.2, -0.4, 0.4, 0.0, 0.1)
    gamma_kps: float = 0.35
    gamma_age: float = 0.2
    gamma_steroid: float = 0.2
    weibull_shape: float = 1.2
    weibull_scale_months: float = 26.0  # scale at zero risk
    followup_months: tuple[float, float] = (6.0, 54.0)  # administrative censoring, uniform
    dropout_rate_per_month: float = 0.01  # exponential loss to follow-up
    second_lesion_fraction: float = 0.1  # share of patients with two index lesions (two subject rows)
    missing_rate: float = 0.07  # per column, missing completely at random
    missing_columns: tuple[str, ...] = ("kps", "histology", "dose_gy", "months_since_srs", "steroid_use")


@dataclass
class CaseMix:
    """Patient population of one site."""
    age_mean: float = 61.0
    age_sd: float = 11.0
    kps_mean: float = 85.0
    histology_p: tuple[float, ...] = (0.45, 0.2, 0.12, 0.08, 0.15)
    months_median: float = 9.0
    fractionated_p: float = 0.2  # share treated with hypofractionated SRS (higher total dose)


@dataclass
class ExternalCaseMix(CaseMix):
    """Site B's population: a little older and frailer, more melanoma, more hypofractionation."""
    age_mean: float = 64.0
    kps_mean: float = 80.0
    histology_p: tuple[float, ...] = (0.4, 0.15, 0.22, 0.1, 0.13)
    months_median: float = 10.0
    fractionated_p: float = 0.35


@dataclass
class FlairParams:
    """FLAIR contrast (normal WM = 1) and the T1/T2 match-mismatch sign of each lesion (Kano 2010)."""
    grey_matter: float = 1.25  # cortex is a little brighter than white matter on FLAIR
    white_matter: float = 1.0
    csf: float = 0.12  # fluid is suppressed (dark)
    oedema: float = 1.8  # vasogenic oedema is hyperintense
    solid: float = 1.2  # enhancing / solid tumour: darker than the oedema around it
    necrotic: float = 1.4  # proteinaceous necrotic fluid is not suppressed
    # P(FLAIR margin matches the enhancing region) by label; unknown = non-index or unlabeled lesions.
    match_p_progression: float = 0.75
    match_p_necrosis: float = 0.25
    match_p_unknown: float = 0.5
    mismatch_range: tuple[float, float] = (0.35, 1.0)  # degree of a mismatch, uniform
    mismatch_shrink: float = 0.5  # at degree 1 the FLAIR lesion radius is (1 - this) x the enhancing one
    mismatch_blur_mm: float = 4.0  # at degree 1 the FLAIR lesion margin widens by this much (ill-defined)
    noise_factor: float = 1.3  # FLAIR noise relative to the site's T1-CE noise
    unlabeled_missing_p: float = 0.15  # share of unlabeled subjects without a FLAIR


@dataclass
class PetParams:
    """FET-PET uptake in SUV and the per-patient injection that turns it into Bq/mL."""
    suv_grey_matter: float = 1.3
    suv_white_matter: float = 0.9
    suv_csf: float = 0.15
    suv_head: float = 0.15  # scalp, muscle and bone outside the brain
    # Lesion uptake of the enhancing part = TBR x mean normal-brain SUV; TBR is log-normal by label.
    tbr_median_progression: float = 2.4
    tbr_median_necrosis: float = 1.6
    tbr_log_sd: float = 0.25
    core_uptake: float = 0.35  # necrotic core uptake relative to the enhancing part
    oedema_depth: float = 0.1  # oedema lowers background uptake a little
    dose_mbq_range: tuple[float, float] = (150.0, 250.0)  # injected activity, uniform
    weight_kg_mean: float = 75.0
    weight_kg_sd: float = 14.0
    weight_kg_range: tuple[float, float] = (45.0, 130.0)
    minutes_range: tuple[float, float] = (20.0, 40.0)  # injection to scan, uniform
    half_life_min: float = F18_HALF_LIFE_MIN  # F-18
    unlabeled_missing_p: float = 0.5  # share of unlabeled subjects without a PET


@dataclass
class PetSiteParams:
    """One PET scanner: its own isotropic grid (stored RAS, registered to the MRI in world mm), PSF,
    calibration and noise."""
    voxel_mm: float = 2.5
    fov_mm: tuple[float, float, float] = (250.0, 250.0, 200.0)  # x, y, z
    offset_mm: float = 6.0  # std of the FOV centre's offset from the isocentre, per axis
    fwhm_mm: float = 5.0  # Gaussian point-spread function
    calibration: float = 1.0  # reported / true activity
    noise: float = 0.08  # relative noise at SUV 1 (grows as sqrt of the uptake)


@dataclass
class ExternalPetSiteParams(PetSiteParams):
    """Site B's PET: coarser voxels, a blurrier older scanner that reads 10% low, more noise."""
    voxel_mm: float = 3.0
    fov_mm: tuple[float, float, float] = (300.0, 300.0, 180.0)
    fwhm_mm: float = 7.0
    calibration: float = 0.9
    noise: float = 0.12


@dataclass
class CohortParams:
    site_a: SiteParams = field(default_factory=SiteParams)
    site_b: ExternalSiteParams = field(default_factory=ExternalSiteParams)
    case_mix_a: CaseMix = field(default_factory=CaseMix)
    case_mix_b: ExternalCaseMix = field(default_factory=ExternalCaseMix)
    lesion: LesionParams = field(default_factory=LesionParams)
    outcome: OutcomeParams = field(default_factory=OutcomeParams)
    unlabeled_site_b_fraction: float = 0.0  # share of unlabeled scans acquired with site B's protocol
    template_spacing_mm: float = 1.5  # internal anatomy grid
    head_pose_deg: float = 5.0  # std of head rotation about each axis
    head_scale_sd: float = 0.05  # std of per-axis head size factor
    head_shift_mm: float = 5.0  # std of head position
    elastic_mm: float = 2.0  # rms of the smooth elastic displacement
    gzip_level: int = 6
    # Image channels to write: t1ce (always) plus any of flair, pet, e.g. --sequences t1ce,flair,pet.
    sequences: tuple[str, ...] = ("t1ce",)
    flair: FlairParams = field(default_factory=FlairParams)
    pet: PetParams = field(default_factory=PetParams)
    pet_a: PetSiteParams = field(default_factory=PetSiteParams)  # PET scanner of site A
    pet_b: ExternalPetSiteParams = field(default_factory=ExternalPetSiteParams)  # PET scanner of site B

    def site_pet(self, site_name: str) -> PetSiteParams:
        return self.pet_b if site_name == self.site_b.name else self.pet_a


def validate(p: CohortParams) -> None:
    """Catch parameter mistakes up front, naming the parameter (ConfigError -> one line, exit 2)."""
    from core.errors import ConfigError

    def need(ok: bool, name: str, what: str):
        if not ok:
            raise ConfigError(f"synth params: {name} {what}")

    for key in ("site_a", "site_b"):
        s = getattr(p, key)
        need(min(s.spacing) > 0 and min(s.fov_mm) > 0 and min(s.psf_sigma_mm) >= 0, f"{key}.spacing/fov_mm/psf_sigma_mm",
             "must be positive")
        axes = sorted("LRAPSI".index(c) // 2 for c in s.orientation if c in "LRAPSI")  # 0: x, 1: y, 2: z
        need(len(s.orientation) == 3 and axes == [0, 1, 2], f"{key}.orientation",
             f"must be 3 axis codes like 'RAS' or 'LAS', got {s.orientation!r}")
        need(s.gamma > 0 and s.scale > 0 and s.noise >= 0 and s.bias_std >= 0, key, "needs gamma, scale > 0 and noise, bias_std >= 0")
    lp, op = p.lesion, p.outcome
    for name, seq in (("lesion.loadings", lp.loadings), ("outcome.beta_image", op.beta_image),
                      ("outcome.gamma_image", op.gamma_image)):
        need(len(seq) == len(LATENTS), name, f"needs {len(LATENTS)} values, one per latent {LATENTS}")
    need(all(abs(v) < 1 for v in lp.loadings), "lesion.loadings", "must lie strictly between -1 and 1")
    for name, seq in (("outcome.beta_histology", op.beta_histology), ("outcome.gamma_histology", op.gamma_histology),
                      ("case_mix_a.histology_p", p.case_mix_a.histology_p), ("case_mix_b.histology_p", p.case_mix_b.histology_p)):
        need(len(seq) == len(HISTOLOGIES), name, f"needs {len(HISTOLOGIES)} values, one per histology {HISTOLOGIES}")
    for name, probs in (("lesion.extra_lesions_p", lp.extra_lesions_p), ("lesion.unlabeled_lesions_p", lp.unlabeled_lesions_p),
                        ("case_mix_a.histology_p", p.case_mix_a.histology_p), ("case_mix_b.histology_p", p.case_mix_b.histology_p)):
        need(min(probs) >= 0 and sum(probs) > 0, name, "must be non-negative with a positive sum")
    need(len(lp.extra_lesions_p) <= 3, "lesion.extra_lesions_p", "allows at most 2 extra lesions (3 values)")
    need(len(lp.unlabeled_lesions_p) <= 4, "lesion.unlabeled_lesions_p", "allows at most 3 lesions (4 values)")
    for name, (lo, hi) in (("lesion.radius_mm_range", lp.radius_mm_range), ("lesion.rim_mm_range", lp.rim_mm_range),
                           ("lesion.core_fraction_range", lp.core_fraction_range), ("outcome.followup_months", op.followup_months)):
        need(0 < lo < hi, name, f"must be 0 < low < high, got ({lo}, {hi})")
    need(lp.radius_mm_range[1] <= 25, "lesion.radius_mm_range", "upper end must be <= 25 mm (lesions must fit in the brain)")
    for name, v in (("outcome.second_lesion_fraction", op.second_lesion_fraction), ("outcome.missing_rate", op.missing_rate),
                    ("unlabeled_site_b_fraction", p.unlabeled_site_b_fraction)):
        need(0 <= v <= 1, name, f"must be a fraction in [0, 1], got {v}")
    unknown = sorted(set(op.missing_columns) - set(CLINICAL_COLUMNS))
    need(not unknown, "outcome.missing_columns", f"has unknown column(s) {unknown}; known: {list(CLINICAL_COLUMNS)}")
    need(op.weibull_shape > 0 and op.weibull_scale_months > 0, "outcome.weibull_shape/weibull_scale_months", "must be > 0")
    need(0.5 <= p.template_spacing_mm <= 4, "template_spacing_mm", "must be between 0.5 and 4 mm")
    need(1 <= p.gzip_level <= 9, "gzip_level", "must be 1..9")
    _validate_sequences(p, need)


def _validate_sequences(p: CohortParams, need) -> None:
    unknown = sorted(set(p.sequences) - set(SEQUENCES))
    need(not unknown, "sequences", f"has unknown name(s) {unknown}; known: {list(SEQUENCES)}")
    need("t1ce" in p.sequences, "sequences", "must include t1ce (the `image` column)")
    need(len(set(p.sequences)) == len(p.sequences), "sequences", "names a sequence twice")
    f, q = p.flair, p.pet
    for name, v in (("flair.match_p_progression", f.match_p_progression), ("flair.match_p_necrosis", f.match_p_necrosis),
                    ("flair.match_p_unknown", f.match_p_unknown), ("flair.mismatch_shrink", f.mismatch_shrink),
                    ("flair.unlabeled_missing_p", f.unlabeled_missing_p), ("pet.unlabeled_missing_p", q.unlabeled_missing_p),
                    ("pet.core_uptake", q.core_uptake), ("pet.oedema_depth", q.oedema_depth)):
        need(0 <= v <= 1, name, f"must be a fraction in [0, 1], got {v}")
    lo, hi = f.mismatch_range
    need(0 <= lo <= hi <= 1, "flair.mismatch_range", f"must be 0 <= low <= high <= 1, got ({lo}, {hi})")
    need(f.mismatch_blur_mm >= 0 and f.noise_factor >= 0, "flair.mismatch_blur_mm/noise_factor", "must be >= 0")
    need(q.tbr_median_progression > 0 and q.tbr_median_necrosis > 0 and q.tbr_log_sd >= 0, "pet.tbr_*",
         "medians must be > 0 and the log-sd >= 0")
    need(q.half_life_min > 0 and q.weight_kg_sd >= 0, "pet.half_life_min/weight_kg_sd", "must be > 0 / >= 0")
    for name, (lo, hi) in (("pet.dose_mbq_range", q.dose_mbq_range), ("pet.weight_kg_range", q.weight_kg_range),
                           ("pet.minutes_range", q.minutes_range)):
        need(0 < lo <= hi, name, f"must be 0 < low <= high, got ({lo}, {hi})")
    for key in ("pet_a", "pet_b"):
        s = getattr(p, key)
        need(s.voxel_mm > 0 and min(s.fov_mm) > 0 and s.fwhm_mm >= 0 and s.offset_mm >= 0, f"{key}.voxel_mm/fov_mm/fwhm_mm",
             "must be positive")
        need(s.calibration > 0 and s.noise >= 0, f"{key}.calibration/noise", "need calibration > 0 and noise >= 0")
