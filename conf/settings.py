"""The validated settings model.

Sources, highest priority first: explicit overrides (CLI flags), the
environment (``MEDSCREEN_`` prefix, ``__`` between levels, e.g.
``MEDSCREEN_LAKE__ROOT``), then ``conf/defaults.yaml`` (or the file named by
``MEDSCREEN_CONFIG``). A bad value fails at load with one message naming the
key and what is allowed.

Bottom floor: imports nothing of ours.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

CONF_DIR = Path(__file__).resolve().parent
DEFAULTS_FILE = CONF_DIR / "defaults.yaml"
# The risk heads of the EMR model (emr_risk), in its output order. Labels, prevalence flags,
# score columns, eligibility rules and the model card's ``heads`` all follow this one tuple.
HEADS = ("t2d", "ckd", "hf")


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LakeSettings(_Section):
    root: Path = Path("work/lake")


class SparkSettings(_Section):
    master: str = "local[2]"
    driver_memory: str = "2g"
    shuffle_partitions: int = Field(4, ge=1)
    # Keep the Spark UI off by default: a laptop-class machine and CI need no port.
    ui_enabled: bool = False


class RaySettings(_Section):
    address: str | None = None
    # Fractional CPUs per actor so an actor pool cannot starve read tasks on small machines.
    actor_num_cpus: float = Field(0.5, gt=0)
    num_actors: int | None = Field(None, ge=1)
    # Engine actors sharing one GPU. None: each pipeline's measured default (EMR 3: while one is
    # between its batches, the others' batches run; CT 2: while one actor stitches a series on the
    # host, another's patches run). docs/benchmarks.md has the runs.
    actors_per_gpu: int | None = Field(None, ge=1, le=8)
    # Calls one EMR engine actor runs at once (threads of the actor): one call holds the device
    # (the actor's device lock) while the others decode their fragment or write the last one.
    # None: 1 (inference.emr_feed.EMR_ACTOR_THREADS): on an H200 further calls' Python work slowed
    # the thread feeding the device more than their overlap gained; on CPUs they share the
    # engine's cores.
    actor_threads: int | None = Field(None, ge=1, le=8)
    # Who writes a scored EMR fragment: CPU tasks beside the engine actor ("tasks": the actor hands
    # the scores over through the object store, its process only feeds the device) or the actor
    # itself ("actor"). With one call per actor, tasks ran ahead on an H200 and level on 2 CPUs
    # (docs/benchmarks.md, "Engine actors without Ray Data").
    fragment_writers: Literal["actor", "tasks"] = "tasks"
    # Custom resources each engine actor asks for, e.g. {"medscreen_engine": 0.5}: on a
    # cluster only the worker nodes that offer them (GPU worker groups) host engines.
    actor_resources: dict[str, float] = Field(default_factory=dict)


class PseudonymSettings(_Section):
    key_env: str = "MEDSCREEN_PSEUDONYM_KEY"
    key_file: Path | None = None


class InputsSettings(_Section):
    emr_dir: Path | None = None
    emr_format: Literal["fhir", "omop"] = "fhir"
    dicom_dir: Path | None = None


class ExtractionSettings(_Section):
    code_groups_file: Path = CONF_DIR / "code_groups.yaml"
    # Clinical NLP rules for notes (preprocessing/notes.py): targets per code group, assertion cues.
    note_targets_file: Path = CONF_DIR / "note_targets.yaml"
    note_context_file: Path = CONF_DIR / "note_context.yaml"


class FeaturesSettings(_Section):
    lookback_days: int = Field(1825, ge=1)
    max_tokens: int = Field(256, ge=8)
    horizon_days: int = Field(365, ge=1)
    vocab_min_count: int = Field(5, ge=1)


class GateSettings(_Section):
    """Accuracy-gate limits for EMR candidates against the fp32 reference (per head).

    fp32 limits apply to an fp32 plan on another backend. int8 is judged on the
    99th percentile of |Δp|, not its maximum: int8 moves a few outlier rows a lot
    while AUC and Brier do not change (the maximum is still reported).
    """

    fp32_max_abs_delta_auc: float = Field(0.001, ge=0)
    fp32_max_abs_delta_brier: float = Field(0.001, ge=0)
    fp32_max_abs_delta_p: float = Field(0.005, ge=0)
    fp16_max_abs_delta_auc: float = Field(0.005, ge=0)
    fp16_max_abs_delta_brier: float = Field(0.002, ge=0)
    fp16_max_abs_delta_p: float = Field(0.02, ge=0)
    int8_max_abs_delta_auc: float = Field(0.01, ge=0)
    int8_max_abs_delta_brier: float = Field(0.005, ge=0)
    int8_max_p99_abs_delta_p: float = Field(0.05, ge=0)
    min_holdout_rows: int = Field(200, ge=1)


class EnginesSettings(_Section):
    cache_dir: Path | None = None  # default: <lake root>/engines
    # auto: ONNX Runtime (on a GPU the card's fused graph), then for emr_risk where torch sees a
    # CUDA GPU the inductor plan where ONNX Runtime cannot be built or fails its gate; ONNX Runtime
    # alone elsewhere (CPU machines, CT). engines.cache.backend_candidates says why, by measurement.
    backend: Literal["auto", "onnxruntime", "tensorrt", "inductor"] = "auto"
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    calibration_rows: int = Field(1000, ge=16)
    # minmax: see the measurements in conf/defaults.yaml.
    calibration_method: Literal["entropy", "minmax", "percentile"] = "minmax"
    # Which exported graph ONNX Runtime plans are built from: the card's fused graph
    # (ORT contrib attention/SkipLayerNorm/BiasGelu, models/emr_risk/export_fused.py) or the
    # reference export. auto: fused on a GPU execution provider, where it is measured
    # faster (docs/benchmarks.md), reference elsewhere.
    graph: Literal["auto", "fused", "reference"] = "auto"
    # How the inductor plan is compiled: per_shape (one static compile per scoring shape) or dynamic
    # (one compile with symbolic batch and length, reused by every shape); either way one CUDA
    # graph per shape. An actor loads per_shape in one cache lookup per shape, dynamic in one.
    inductor_compile: Literal["per_shape", "dynamic"] = "per_shape"
    gate: GateSettings = Field(default_factory=GateSettings)


class QCSettings(_Section):
    max_psi: float = 0.25
    # PSI against the previous as-of's scores: a nightly drift check. Off for runs whose
    # dates are not consecutive nights (cohort index dates, scored in any order).
    drift_check: bool = True
    min_std: float = 1e-4
    fallback_to_fp32: bool = True


class HeadEligibilitySettings(_Section):
    """Who may be on one head's screening list (preprocessing.eligibility applies it)."""

    # Inclusive, in completed years on the as-of day; max None = no upper bound.
    min_age_years: int = Field(ge=0, le=130)
    max_age_years: int | None = Field(None, ge=0, le=130)
    # Encounter tokens the timeline must hold (the lookback's minimum history). At least 1,
    # so an empty timeline alone can never put a patient on a list.
    min_encounters: int = Field(1, ge=1)
    # Where the rule comes from: a guideline citation, or "programme choice: <why>".
    source: str = Field(min_length=10)

    @field_validator("max_age_years")
    @classmethod
    def _range(cls, v: int | None, info: Any) -> int | None:
        low = info.data.get("min_age_years")
        if v is not None and low is not None and v < low:
            raise ValueError(f"max_age_years {v} is below min_age_years {low}")
        return v


# The programme's defaults, mirrored in conf/defaults.yaml (a test keeps the two equal).
DEFAULT_ELIGIBILITY: dict[str, dict[str, Any]] = {
    "t2d": {"min_age_years": 35, "max_age_years": 70, "min_encounters": 1,
            "source": "USPSTF 2021, Screening for Prediabetes and Type 2 Diabetes (JAMA 2021;326(8):736-743): "
                      "adults aged 35 to 70 years (with overweight or obesity; the model's risk stands in for "
                      "BMI, which the timelines do not carry)"},
    "ckd": {"min_age_years": 18, "max_age_years": None, "min_encounters": 1,
            "source": "programme choice: adults of any age. USPSTF 2012 found insufficient evidence for "
                      "general CKD screening (I statement); KDIGO 2024 (Kidney Int 2024;105(4S):S117-S314) "
                      "and its Controversies Conference on early identification (Kidney Int 2021;99:34-47) "
                      "advise testing adults at risk (hypertension, diabetes, CVD) with no age band, "
                      "and risk is what the list ranks by"},
    "hf": {"min_age_years": 40, "max_age_years": None, "min_encounters": 1,
           "source": "STOP-HF (Ledwidge et al., JAMA 2013;310(1):66-74): natriuretic peptide screening of "
                     "adults over 40 with cardiovascular risk factors; 2022 AHA/ACC/HFSA heart failure "
                     "guideline (Circulation 2022;145:e895-e1032) recommends such screening of at-risk "
                     "patients (class 2a); no upper age bound (programme choice)"},
}


# scoring.token_budget when unset, per device: on an H200 the EMR pipeline ran 196 k records/s at
# 262 144 against 171 k at 65 536 (same call; docs/benchmarks.md, "writer tasks"); on CPUs a batch's
# padded tokens are its memory, and 65 536 is what the CPU runs were measured with.
DEFAULT_TOKEN_BUDGET = {"gpu": 262_144, "cpu": 65_536}


class ScoringSettings(_Section):
    # Padded tokens per batch (rows × bucket length). None: DEFAULT_TOKEN_BUDGET for the device
    # the engines run on (token_budget_for).
    token_budget: int | None = Field(None, ge=256)
    length_buckets: list[int] = Field(default_factory=lambda: [16, 32, 64, 128, 256])
    # Per-head thresholds that OVERRIDE the model card's operating points (empty: the card's,
    # chosen on validation data by a stated rule). An override is recorded in the list's manifest.
    screening_thresholds: dict[str, float] = Field(default_factory=dict)
    screening_top_k: int | None = None
    # Per head: age range, minimum history and the cited source (preprocessing.eligibility).
    eligibility: dict[str, HeadEligibilitySettings] = Field(
        default_factory=lambda: {h: HeadEligibilitySettings(**r) for h, r in DEFAULT_ELIGIBILITY.items()})
    # Per head, leave out patients whose timelines row has prevalent_<head> (already diagnosed).
    screening_exclude_prevalent: bool = True
    prometheus_port: int | None = None
    qc: QCSettings = Field(default_factory=QCSettings)

    def token_budget_for(self, gpu: bool) -> int:
        """The token budget scoring uses where engines run on a GPU (``gpu``) or on CPUs."""
        return self.token_budget or DEFAULT_TOKEN_BUDGET["gpu" if gpu else "cpu"]


class CTQCSettings(_Section):
    """A CT run that looks broken fails before its findings are committed."""

    # Share of the eligible series that could not be scored (decode, geometry, engine errors).
    max_failed_share: float = Field(0.5, ge=0, le=1)
    # Mean findings per scored series; an engine that marks everything is broken, not busy.
    max_findings_per_series: float = Field(10.0, gt=0)


class ImagingSettings(_Section):
    target_spacing_mm: float = Field(1.0, gt=0)
    window_hu: tuple[float, float] = (-1000.0, 400.0)
    patch_size: tuple[int, int, int] = (64, 128, 128)  # z, y, x voxels
    patch_stride: tuple[int, int, int] = (48, 96, 96)
    min_slices: int = Field(16, ge=2)
    # Crop each resampled volume to the body before the sliding window (preprocessing.body_crop):
    # voxels above body_threshold_hu, projected per axis, plus body_margin_mm of air.
    crop_to_body: bool = True
    body_threshold_hu: float = -500.0
    body_margin_mm: float = Field(16.0, ge=0)
    gantry_tilt: Literal["correct", "reject"] = "correct"
    probability_threshold: float = Field(0.5, gt=0, lt=1)
    min_finding_volume_mm3: float = 15.0
    # Stored per-series results no CT run has used for this long are removed (lake.result_store).
    scored_series_retention_days: float = Field(30.0, gt=0)
    # "auto": where the engine runs on CUDA and CuPy is installed, patches and blending stay on the GPU;
    # "off": always the host (numpy) path.
    device_arrays: Literal["auto", "off"] = "auto"
    # true: GPU actors get the scanner grid as int16 and resample, crop and window on the device.
    # Off by default: on one H200 (10 series, fp16) it ran at 29.5 volumes/min with 11.2 s of
    # resampling inside the two engine actors, where read tasks resampling on 16 host cores had fed
    # the same engine at 74-84 (docs/benchmarks.md, "CT: resampling in the actors").
    resample_on_device: bool = False
    # Host memory one engine actor may use for one series on the host path (volume, rolling blend
    # buffers, float16 result, patch batch, engine activations); the batch shrinks to fit it.
    host_memory_budget_mb: int = Field(4096, ge=256)
    qc: CTQCSettings = Field(default_factory=CTQCSettings)


class DemoSettings(_Section):
    patients: int = Field(20000, ge=10)
    seed: int = 7
    as_of: str = "2024-06-30"
    bad_record_share: float = Field(0.02, ge=0, le=0.5)
    ct_studies: int = Field(2, ge=0)
    ct_rows: int = Field(512, ge=16)      # matrix size of the synthetic CT slices
    ct_slices: int = Field(100, ge=4)     # slices of each axial series


class Settings(BaseSettings):
    """Everything a medscreen run reads from configuration."""

    model_config = SettingsConfigDict(env_prefix="MEDSCREEN_", env_nested_delimiter="__",
                                      extra="forbid", nested_model_default_partial_update=True)

    lake: LakeSettings = Field(default_factory=LakeSettings)
    spark: SparkSettings = Field(default_factory=SparkSettings)
    ray: RaySettings = Field(default_factory=RaySettings)
    pseudonym: PseudonymSettings = Field(default_factory=PseudonymSettings)
    inputs: InputsSettings = Field(default_factory=InputsSettings)
    extraction: ExtractionSettings = Field(default_factory=ExtractionSettings)
    features: FeaturesSettings = Field(default_factory=FeaturesSettings)
    engines: EnginesSettings = Field(default_factory=EnginesSettings)
    scoring: ScoringSettings = Field(default_factory=ScoringSettings)
    imaging: ImagingSettings = Field(default_factory=ImagingSettings)
    demo: DemoSettings = Field(default_factory=DemoSettings)
    models: dict[str, Path] = Field(default_factory=lambda: {
        "emr_risk": CONF_DIR / "models" / "emr_risk.yaml",
        "ct_nodule": CONF_DIR / "models" / "ct_nodule.yaml"})

    @field_validator("models")
    @classmethod
    def _known_models(cls, v: dict[str, Path]) -> dict[str, Path]:
        return {k: Path(p) for k, p in v.items()}

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings],
                                   init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _YamlSource(settings_cls))

    @property
    def engine_cache_dir(self) -> Path:
        return self.engines.cache_dir or (self.lake.root / "engines")

    def on_device(self, gpu: bool) -> "Settings":
        """These settings with what depends on the engines' device resolved: the token budget
        (:meth:`ScoringSettings.token_budget_for`)."""
        scoring = self.scoring.model_copy(update={"token_budget": self.scoring.token_budget_for(gpu)})
        return self.model_copy(update={"scoring": scoring})


# libyaml's safe loader where PyYAML was built with it (its wheels are): the same documents as
# yaml.safe_load, about 8x faster (the EMR model card, which a scoring run reads five times: 6 ms
# against 47 ms on the 2-core machine).
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` through libyaml where PyYAML has it."""
    return yaml.load(text, Loader=_SAFE_LOADER)


class _YamlSource(PydanticBaseSettingsSource):
    """conf/defaults.yaml, or the file named by MEDSCREEN_CONFIG."""

    def __init__(self, settings_cls: type[BaseSettings]):
        super().__init__(settings_cls)
        path = Path(os.environ.get("MEDSCREEN_CONFIG", DEFAULTS_FILE))
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist (MEDSCREEN_CONFIG)")
        try:
            data = load_yaml(path.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise ConfigError(f"config file {path} is not valid YAML{where}: "
                              f"{getattr(exc, 'problem', None) or exc}; fix the file (MEDSCREEN_CONFIG)") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        self._data = data

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


def _deep_set(d: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
    d[parts[-1]] = value


def load_settings(overrides: dict[str, Any] | None = None) -> Settings:
    """Load and validate settings.

    ``overrides`` maps dotted keys (``"lake.root"``) to values that win over the
    environment and the YAML file; ``None`` values are ignored so CLI flags that
    were not given fall through.
    """
    init: dict[str, Any] = {}
    for key, value in (overrides or {}).items():
        if value is not None:
            _deep_set(init, key, value)
    try:
        return Settings(**init)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        env = "MEDSCREEN_" + "__".join(str(p).upper() for p in err["loc"])
        allowed = ""
        ctx = err.get("ctx") or {}
        if "expected" in ctx:
            allowed = f"; allowed: {ctx['expected']}"
        got = err.get("input")
        lines.append(f"invalid setting {key} (env {env}): {err['msg']}{allowed}; got {got!r}")
    return "\n".join(lines)
