"""The EMR token vocabulary: versioned, deterministic, independent of any data.

Training and nightly scoring must map the same event to the same id, so the
vocabulary is built from fixed sources only — the ICD-10-CM release shipped
with the pinned ``simple-icd-10-cm`` and the LOINC binning rules below — never
from token counts in the lake. Its ``sha256`` covers the token list *and* the
binning rules (a changed threshold changes what a token means even when the
list does not), and every timelines partition records it.

Ids:

* 0 ``[PAD]``, 1 ``[OOV]``, 2 ``[CLS]`` (reserved for models that prepend a
  summary/age-sex position; timelines never emit it).
* ``encounter`` — any encounter event, whatever its code.
* ``icd9:bucket`` — an ICD-9-CM diagnosis in none of the groups below (one
  bucket: "a diagnosis happened").
* ``dx:<group>`` for each group of :data:`DX_GROUP_TOKENS` — a diagnosis coded
  in SNOMED CT, an OMOP concept, ICD-9-CM or note words (anything but
  ICD-10-CM) that belongs to that code group (the event's ``code_groups``,
  set at ingest by ``preprocessing.code_groups.groups_for``). A model blind to
  SNOMED-coded diagnoses would see nothing of a Synthea patient's diabetes.
  When a diagnosis is in several groups the first in :data:`DX_GROUP_TOKENS`
  (most specific first) names the token.
* ``icd10:<category>`` for every 3-character ICD-10-CM category, sorted.
* ``loinc:<code>:<bin>`` for each LOINC code in :data:`LOINC_RULES` and each
  clinically meaningful bin, plus ``loinc:<code>:unknown`` (no value, NaN, a
  negative value or a unit we cannot convert).

Diagnosis assertions (dx coded, dx_text found in note text):

* ``affirmed`` (and a missing assertion, which the events contract uses for
  coded data) → the category token.
* ``history`` → the *same* category token: "history of diabetes" in a note is
  evidence the patient has had the condition, as a coded dx would be.
* ``negated``, ``family``, ``possible`` (unconfirmed, provisional or
  differential) and ``hypothetical`` → dropped (:data:`DROPPED`): none says
  the patient has the condition. Any other assertion value is dropped too.

Everything else (diagnoses in no group and not ICD-coded, observations
without a rule, unknown kinds, ICD-10-CM codes that are not in the release)
maps to ``[OOV]``.

The Spark job mirrors :meth:`Vocabulary.token_for` with column expressions
built from the same tables; tests check the two agree row for row.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lake.files import write_json_atomic

PAD, OOV, CLS = "[PAD]", "[OOV]", "[CLS]"
PAD_ID, OOV_ID, CLS_ID = 0, 1, 2
ENCOUNTER = "encounter"
ICD9_BUCKET = "icd9:bucket"
SPECIAL_TOKENS = (PAD, OOV, CLS, ENCOUNTER, ICD9_BUCKET)

# Returned by encode() for events that yield no token (negated/family dx).
DROPPED = -1

# Bump when the token rules below change meaning (the sha256 changes anyway).
RULES_VERSION = "emr-vocab-2"  # 2: dx:<group> tokens for grouped non-ICD-10-CM diagnoses

# Code groups that give non-ICD-10-CM diagnoses a token, most specific first.
DX_GROUP_TOKENS = ("t2d", "diabetes", "ckd", "heart_failure", "hypertension", "cad", "atrial_fibrillation",
                   "stroke", "copd", "hyperlipidaemia", "obesity")

# Assertions that put a diagnosis token on the timeline (None: coded data).
TOKEN_ASSERTIONS = ("affirmed", "history")
DX_KINDS = ("dx", "dx_text")
UNKNOWN_BIN = "unknown"

_NOT_ALNUM = re.compile(r"[^A-Za-z0-9]")


@dataclass(frozen=True)
class LoincRule:
    """Binning of one LOINC observation into clinically meaningful ranges.

    ``cuts`` are ascending thresholds in ``unit``; bin i holds values in
    [cuts[i-1], cuts[i]) — lower bound inclusive, so "HbA1c ≥ 6.5 %" is the
    last bin. ``units`` maps accepted unit strings (lower-case, spaces trimmed)
    to a factor converting into ``unit``; a missing unit is taken as ``unit``.
    """

    code: str
    name: str
    unit: str
    cuts: tuple[float, ...]
    bins: tuple[str, ...]
    units: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.bins) != len(self.cuts) + 1 or list(self.cuts) != sorted(self.cuts):
            raise ValueError(f"LOINC rule {self.code}: need ascending cuts and len(bins) = len(cuts) + 1")

    def tokens(self) -> list[str]:
        return [f"loinc:{self.code}:{b}" for b in (*self.bins, UNKNOWN_BIN)]

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "name": self.name, "unit": self.unit, "cuts": list(self.cuts),
                "bins": list(self.bins), "units": dict(sorted(self.units.items()))}


_MG_DL_GLUCOSE = {"mg/dl": 1.0, "mmol/l": 18.016}  # glucose molar mass 180.16 g/mol
_MM_HG = {"mm[hg]": 1.0, "mmhg": 1.0, "mm hg": 1.0}
_EGFR = {"ml/min/{1.73_m2}": 1.0, "ml/min/1.73m2": 1.0, "ml/min/1.73 m2": 1.0, "ml/min": 1.0}
_PG_ML = {"pg/ml": 1.0, "ng/l": 1.0}
_CHOL = {"mg/dl": 1.0, "mmol/l": 38.67}
_EGFR_CUTS, _EGFR_BINS = (15.0, 30.0, 45.0, 60.0, 90.0), ("g5", "g4", "g3b", "g3a", "g2", "g1")  # KDIGO

# Thresholds: ADA (HbA1c, glucose), WHO (BMI), ACC/AHA 2017 (blood pressure),
# KDIGO (eGFR, albuminuria), ESC (natriuretic peptides), NCEP ATP III (lipids).
LOINC_RULES: tuple[LoincRule, ...] = (
    LoincRule("4548-4", "HbA1c", "%", (5.7, 6.5), ("normal", "prediabetes", "diabetes"), {"%": 1.0}),
    LoincRule("17856-6", "HbA1c (HPLC)", "%", (5.7, 6.5), ("normal", "prediabetes", "diabetes"), {"%": 1.0}),
    LoincRule("2345-7", "Glucose serum/plasma", "mg/dL", (70.0, 100.0, 126.0, 200.0),
              ("low", "normal", "impaired", "high", "very_high"), _MG_DL_GLUCOSE),
    LoincRule("1558-6", "Fasting glucose", "mg/dL", (70.0, 100.0, 126.0),
              ("low", "normal", "impaired", "diabetes"), _MG_DL_GLUCOSE),
    LoincRule("39156-5", "BMI", "kg/m2", (18.5, 25.0, 30.0, 40.0),
              ("underweight", "normal", "overweight", "obese", "severely_obese"),
              {"kg/m2": 1.0, "kg/m^2": 1.0}),
    LoincRule("8480-6", "Systolic BP", "mm[Hg]", (90.0, 120.0, 130.0, 140.0, 180.0),
              ("low", "normal", "elevated", "stage1", "stage2", "crisis"), _MM_HG),
    LoincRule("8462-4", "Diastolic BP", "mm[Hg]", (60.0, 80.0, 90.0, 120.0),
              ("low", "normal", "stage1", "stage2", "crisis"), _MM_HG),
    LoincRule("33914-3", "eGFR MDRD", "mL/min/{1.73_m2}", _EGFR_CUTS, _EGFR_BINS, _EGFR),
    LoincRule("62238-1", "eGFR CKD-EPI", "mL/min/{1.73_m2}", _EGFR_CUTS, _EGFR_BINS, _EGFR),
    LoincRule("98979-8", "eGFR CKD-EPI 2021", "mL/min/{1.73_m2}", _EGFR_CUTS, _EGFR_BINS, _EGFR),
    LoincRule("2160-0", "Creatinine serum/plasma", "mg/dL", (0.5, 1.3, 2.0, 4.0),
              ("low", "normal", "high", "very_high", "severe"), {"mg/dl": 1.0, "umol/l": 1 / 88.42}),
    LoincRule("9318-7", "Urine albumin/creatinine", "mg/g", (30.0, 300.0), ("a1", "a2", "a3"),
              {"mg/g": 1.0, "mg/g{creat}": 1.0, "mg/mmol": 8.84}),
    LoincRule("33762-6", "NT-proBNP", "pg/mL", (125.0, 450.0, 900.0),
              ("normal", "elevated", "high", "very_high"), _PG_ML),
    LoincRule("30934-4", "BNP", "pg/mL", (35.0, 100.0, 400.0), ("normal", "borderline", "high", "very_high"),
              _PG_ML),
    LoincRule("2093-3", "Total cholesterol", "mg/dL", (200.0, 240.0), ("desirable", "borderline", "high"), _CHOL),
    LoincRule("13457-7", "LDL cholesterol", "mg/dL", (100.0, 130.0, 160.0, 190.0),
              ("optimal", "near_optimal", "borderline", "high", "very_high"), _CHOL),
    LoincRule("2085-9", "HDL cholesterol", "mg/dL", (40.0, 60.0), ("low", "normal", "high"), _CHOL),
    LoincRule("2571-8", "Triglycerides", "mg/dL", (150.0, 200.0, 500.0), ("normal", "borderline", "high", "very_high"),
              {"mg/dl": 1.0, "mmol/l": 88.57}),
    LoincRule("8867-4", "Heart rate", "/min", (60.0, 100.0), ("low", "normal", "high"),
              {"/min": 1.0, "{beats}/min": 1.0, "bpm": 1.0}),
)
LOINC_RULES_BY_CODE: dict[str, LoincRule] = {r.code: r for r in LOINC_RULES}


def normalise_icd_code(code: str | None) -> str:
    """Upper-case ICD code with dots, spaces and other punctuation removed ("e11.9 " → "E119")."""
    return _NOT_ALNUM.sub("", code or "").upper()


def normalise_unit(unit: str | None) -> str | None:
    """Lower-case unit with surrounding spaces removed (spaces only, as Spark's trim)."""
    return None if unit is None else unit.strip(" ").lower()


def loinc_bin(rule: LoincRule, value: float | None, unit: str | None) -> str:
    """The bin name for one observation value (``unknown`` when it cannot be read)."""
    if value is None or math.isnan(value) or value < 0:
        return UNKNOWN_BIN
    u = normalise_unit(unit)
    if u is None:
        factor = 1.0
    elif u in rule.units:
        factor = rule.units[u]
    else:
        return UNKNOWN_BIN
    v = value * factor
    for cut, name in zip(rule.cuts, rule.bins):
        if v < cut:
            return name
    return rule.bins[-1]


def group_token(groups: list[str] | tuple[str, ...] | None) -> str | None:
    """``dx:<group>`` of the first of :data:`DX_GROUP_TOKENS` in ``groups``; None if none is."""
    if groups:
        for g in DX_GROUP_TOKENS:
            if g in groups:
                return "dx:" + g
    return None


def token_for(kind: str | None, system: str | None, code: str | None, value: float | None,
              assertion: str | None, unit: str | None = None,
              groups: list[str] | tuple[str, ...] | None = None) -> str | None:
    """The token string for one event, ``None`` when the event yields no token.

    Strings not in the vocabulary (an unknown ICD-10-CM category) are encoded
    as ``[OOV]`` by :meth:`Vocabulary.encode`.
    """
    if kind == "encounter":
        return ENCOUNTER
    if kind in DX_KINDS:
        if assertion is not None and assertion not in TOKEN_ASSERTIONS:
            return None
        if system == "icd10cm":
            return "icd10:" + normalise_icd_code(code)[:3]
        by_group = group_token(groups)
        if by_group is not None:
            return by_group
        if system == "icd9cm":
            return ICD9_BUCKET
        return OOV
    if kind == "obs" and system == "loinc":
        rule = LOINC_RULES_BY_CODE.get(code or "")
        if rule is not None:
            return f"loinc:{rule.code}:{loinc_bin(rule, value, unit)}"
    return OOV


@dataclass(frozen=True)
class Vocabulary:
    """An immutable token list with its version and content hash."""

    tokens: tuple[str, ...]
    version: str
    loinc_rules: tuple[dict[str, Any], ...]

    def __post_init__(self) -> None:
        if self.tokens[:3] != (PAD, OOV, CLS):
            raise ValueError("vocabulary must start with [PAD], [OOV], [CLS]")
        if len(set(self.tokens)) != len(self.tokens):
            raise ValueError("vocabulary tokens must be unique")
        object.__setattr__(self, "_ids", {t: i for i, t in enumerate(self.tokens)})

    @property
    def size(self) -> int:
        return len(self.tokens)

    @functools.cached_property
    def sha256(self) -> str:
        """sha256 of the canonical JSON of the token list and the binning rules."""
        canon = json.dumps({"tokens": list(self.tokens), "loinc_rules": list(self.loinc_rules)},
                           sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(canon.encode("ascii")).hexdigest()

    def id_of(self, token: str) -> int:
        """The id of ``token``, ``OOV_ID`` if it is not in the vocabulary."""
        return self._ids.get(token, OOV_ID)  # type: ignore[attr-defined]

    def encode(self, kind: str | None, system: str | None, code: str | None, value: float | None,
               assertion: str | None, unit: str | None = None,
               groups: list[str] | tuple[str, ...] | None = None) -> int:
        """The token id of one event; :data:`DROPPED` (-1) when the event yields no token."""
        token = token_for(kind, system, code, value, assertion, unit, groups)
        return DROPPED if token is None else self.id_of(token)

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "sha256": self.sha256, "size": self.size,
                "tokens": list(self.tokens), "loinc_rules": list(self.loinc_rules)}

    def save(self, path: Path) -> Path:
        """Write the vocabulary as JSON (atomically) and return the path."""
        return write_json_atomic(path, self.to_dict(), indent=1)

    @classmethod
    def load(cls, path: Path) -> "Vocabulary":
        """Read a saved vocabulary; raise ValueError if its content does not match its sha256."""
        path = Path(path)
        data = json.loads(path.read_text())
        vocab = cls(tuple(data["tokens"]), data["version"], tuple(data["loinc_rules"]))
        if vocab.sha256 != data.get("sha256"):
            raise ValueError(f"vocabulary file {path} is corrupt or edited: its content hashes to "
                             f"{vocab.sha256[:12]}, the file says {str(data.get('sha256'))[:12]}; "
                             "rewrite it with `Vocabulary.save` from the matching medscreen version")
        return vocab


def icd10cm_categories() -> list[str]:
    """All 3-character ICD-10-CM categories in the pinned simple-icd-10-cm release, sorted."""
    import simple_icd_10_cm as icd  # slow import (parses the release XML): only when building

    # A few categories are listed twice by the release (e.g. categories that are also leaves).
    return sorted({c for c in icd.get_all_codes(False) if icd.is_category(c)})


@functools.lru_cache(maxsize=1)
def default_vocabulary() -> Vocabulary:
    """The current vocabulary (built once per process; depends on no data)."""
    icd_release = importlib.metadata.version("simple-icd-10-cm")
    tokens = [*SPECIAL_TOKENS]
    tokens += [f"icd10:{c}" for c in icd10cm_categories()]
    for rule in LOINC_RULES:
        tokens += rule.tokens()
    # Appended last (rules version 2): the ids of every earlier token stay what they were.
    tokens += [f"dx:{g}" for g in DX_GROUP_TOKENS]
    return Vocabulary(tuple(tokens), f"{RULES_VERSION}+icd10cm-{icd_release}",
                      tuple(r.to_dict() for r in LOINC_RULES))
