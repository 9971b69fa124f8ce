"""Progress notes in words for the synthetic EMR, with every planted diagnosis mention recorded.

A note follows the layout of Synthea's notes (its ``DocumentReference`` text: date line,
``# Chief Complaint``, ``# History of Present Illness`` with "Patient has a history of ...",
``# Social History``, ``# Allergies``, ``# Medications``, ``# Assessment and Plan`` with
"Patient is presenting with ... (disorder)." and ``## Plan``), plus what clinicians add in
their own words: abbreviations (T2DM, CKD, CHF, HFrEF), negations, uncertain, family,
historical and hypothetical mentions, a few literal codes. Each mention of a concept group
is returned with its assertion and its character offsets, so note extraction can be scored
against what was planted. The assertion is true to the simulated patient: a mention is
negated, possible or hypothetical only while the patient does not have the condition, and
affirmed or historical only while they do.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import datetime

from synth.emr_codes import TRUTH_GROUP, ConditionCode

# Words a clinician uses for each simulated condition key: full terms first, then
# abbreviations and synonyms.
TERMS: dict[str, tuple[str, ...]] = {
    "t2d": ("type 2 diabetes mellitus", "type 2 diabetes", "T2DM", "DM2", "diabetes mellitus type 2",
            "T2D", "non-insulin-dependent diabetes"),
    "ckd": ("chronic kidney disease", "CKD", "CKD stage 3", "chronic renal insufficiency",
            "chronic kidney disease stage 3"),
    "hf": ("heart failure", "CHF", "congestive heart failure", "HFrEF", "HFpEF",
           "heart failure with reduced ejection fraction"),
    "htn": ("hypertension", "HTN", "essential hypertension", "high blood pressure"),
    "af": ("atrial fibrillation", "AF", "afib", "AFib"),
    "cad": ("coronary artery disease", "CAD", "ischemic heart disease"),
    "stroke": ("stroke", "CVA", "cerebral infarction", "cerebrovascular accident"),
    "hld": ("hyperlipidemia", "HLD", "high cholesterol"),
}
_ICD10 = {"t2d": "E11.9", "ckd": "N18.9", "hf": "I50.9", "htn": "I10", "af": "I48.91",
          "cad": "I25.10", "stroke": "I63.9", "hld": "E78.5"}
_RELATIVES = ("mother", "father", "brother", "sister", "maternal grandmother", "paternal uncle")
_SYMPTOMS = ("fatigue", "polyuria", "shortness of breath", "leg swelling", "palpitations",
             "dizziness", "cough")
_MEDS = {"t2d": "metformin hydrochloride 500 mg oral tablet",
         "htn": "lisinopril 10 mg oral tablet", "hld": "simvastatin 20 mg oral tablet",
         "hf": "furosemide 40 mg oral tablet", "af": "apixaban 5 mg oral tablet",
         "cad": "aspirin 81 mg oral tablet"}
# Sentence templates per assertion: (words before the mention, words after it).
POSSIBLE = (("Possible ", "; {test} ordered."), ("Rule out ", "."), ("Suspect early ", "."),
            ("Differential includes ", "."), ("", " cannot be excluded."))
NEGATED = (("No evidence of ", "."), ("Denies history of ", "."), ("", " ruled out."),
           ("Negative for ", " ({code})."), ("Not consistent with ", ", no further work-up."))
HYPOTHETICAL = (("Discussed risk of developing ", " if weight gain continues."),
                ("Return if symptoms of ", " develop."), ("Counselled on preventing ", "."))
_TESTS = {"t2d": "repeat HbA1c", "ckd": "repeat creatinine and urine albumin",
          "hf": "echocardiogram", "af": "ECG", "stroke": "MRI brain", "htn": "home BP log"}


@dataclass
class NoteContext:
    """What the note writer knows about the visit; keys are the simulation's condition keys."""

    when: datetime
    age_years: float
    sex: str
    given: str
    family: str
    mrn: str
    smoker: int                    # index into SMOKING_VALUES: never, ex, current
    active: list[str]              # chronic conditions the patient has and that are on record
    new_dx: list[str]              # diagnosed at this visit
    dx_today: list[tuple[str, ConditionCode]]  # coded at this visit
    suspected: list[str]           # written as provisional/differential at this visit
    absent: list[str]              # conditions the patient does not have at this visit
    stroke_history: bool
    sys_bp: float
    bmi: float
    hba1c: float
    egfr: float
    extra: dict[str, str] = field(default_factory=dict)


class _Text:
    """Builds a note and the offsets of the mentions planted in it."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.pos = 0
        self.spans: list[tuple[str, str, int, int]] = []

    def add(self, s: str) -> None:
        self.parts.append(s)
        self.pos += len(s)

    def mention(self, key: str, words: str, assertion: str) -> None:
        group = TRUTH_GROUP.get(key)
        if group is not None:
            self.spans.append((group, assertion, self.pos, self.pos + len(words)))
        self.add(words)

    def text(self) -> str:
        return "".join(self.parts)


def _age_words(age_years: float) -> str:
    # As Synthea writes it: "64 year-old", "7 month-old", "newborn".
    if age_years >= 1:
        return f"{int(age_years)} year-old"
    months = int(age_years * 12)
    return f"{months} month-old" if months > 0 else "newborn"


def _term(rnd: random.Random, key: str) -> str:
    terms = TERMS[key]
    return terms[0] if rnd.random() < 0.4 else rnd.choice(terms)


def write_note(rnd: random.Random, ctx: NoteContext) -> tuple[str, list[tuple[str, str, int, int]]]:
    """One progress note and its planted mentions ``(group, assertion, start, end)``."""
    t = _Text()
    t.add(f"{ctx.when.date().isoformat()}\n\n")
    if rnd.random() < 0.4:
        # Identifiers in the text, as real notes carry them: ingest must never let them out.
        t.add(f"Patient: {ctx.family}, {ctx.given}  MRN: {ctx.mrn}\n\n")
    t.add("# Chief Complaint\n")
    symptoms = rnd.sample(_SYMPTOMS, rnd.choice((0, 0, 1, 2)))
    t.add("".join(f"- {s}\n" for s in symptoms) if symptoms else "No complaints.\n")
    sex = {"female": "female", "male": "male"}.get(ctx.sex, "patient")
    t.add(f"\n# History of Present Illness\n{ctx.given} is a {_age_words(ctx.age_years)} {sex}.")
    # Synthea's "history of" lists the conditions the patient has now (their SNOMED names).
    listed = [(k, code) for k, code in ctx.dx_today if k in ctx.active and k not in ctx.new_dx]
    history = [k for k in ctx.active if k not in ctx.new_dx]
    if history:
        t.add(" Patient has a history of ")
        for i, k in enumerate(history):
            if i:
                t.add(", ")
            code = next((cd for kk, cd in listed if kk == k), None)
            words = code.snomed_display.lower() if code is not None else TERMS[k][0]
            t.mention(k, words, "history")
        t.add(".")
    if ctx.stroke_history and "stroke" not in ctx.new_dx and rnd.random() < 0.6:
        t.add(" Prior ")
        t.mention("stroke", _term(rnd, "stroke"), "history")
        t.add(rnd.choice((" with no residual deficits.", " in the past.")))
    if rnd.random() < 0.15:
        key = rnd.choice(("t2d", "hf", "ckd", "stroke", "cad"))
        relative = rnd.choice(_RELATIVES)
        if rnd.random() < 0.5:
            t.add(" Family history of ")
            t.mention(key, _term(rnd, key), "family")
            t.add(f" in {relative}.")
        else:
            t.add(f" {relative.capitalize()} with ")
            t.mention(key, _term(rnd, key), "family")
            t.add(".")
    t.add("\n\n# Social History\n")
    t.add(("Patient has never smoked.", "Patient quit smoking.", "Patient is an active smoker.")
          [ctx.smoker] if ctx.age_years >= 16 else "Lives with family.")
    t.add("\n\n# Allergies\nNo Known Allergies.\n\n# Medications\n")
    meds = [_MEDS[k] for k in ctx.active if k in _MEDS]
    t.add("; ".join(meds) if meds else "No Active Medications.")
    t.add("\n\n# Assessment and Plan\n")
    presenting = [(k, code) for k, code in ctx.dx_today if k in ctx.new_dx or k not in ctx.active]
    presenting += [(k, code) for k, code in ctx.dx_today
                   if k in ctx.active and k not in ctx.new_dx and rnd.random() < 0.3]
    if presenting:
        t.add("Patient is presenting with ")
        for i, (k, code) in enumerate(presenting):
            if i:
                t.add(", ")
            t.mention(k, code.snomed_display.lower(), "affirmed")
        t.add(". ")
    t.add(f"BP {round(ctx.sys_bp)}/{round(0.55 * ctx.sys_bp + 8)}, BMI {ctx.bmi:.1f}.")
    _clinician_lines(rnd, ctx, t)
    t.add("\n\n## Plan\n")
    t.add(rnd.choice(("Continue current medications.", "Recheck labs in 3 months.",
                      "Lifestyle counselling, diet and exercise.", "Follow up in 6 months.")))
    _plan_lines(rnd, ctx, t)
    t.add("\n")
    return t.text(), t.spans


def _clinician_lines(rnd: random.Random, ctx: NoteContext, t: _Text) -> None:
    """What the clinician adds in their own words: affirmed, negated and uncertain mentions."""
    for k in ctx.new_dx:
        t.add("\n")
        t.add(rnd.choice(("New diagnosis of ", "Diagnosed today with ", "Findings consistent with ")))
        t.mention(k, _term(rnd, k), "affirmed")
        if rnd.random() < 0.3:
            t.add(f" ({_ICD10[k]})")
        t.add(".")
    for k in ctx.active:
        if k in ctx.new_dx or k not in TERMS or rnd.random() >= 0.25:
            continue
        t.add("\n")
        form = rnd.randrange(4)
        if form == 0:
            t.mention(k, _term(rnd, k), "affirmed")
            t.add(rnd.choice((", stable.", ", stable on current regimen.", " - controlled.")))
        elif form == 1:
            t.add("Known ")
            t.mention(k, _term(rnd, k), "affirmed")
            t.add(".")
        elif form == 2:
            t.add("Assessment: ")
            t.mention(k, _term(rnd, k), "affirmed")
            t.add(f" ({_ICD10[k]}).")
        else:
            t.add("PMH: ")
            t.mention(k, _term(rnd, k), "history")
            t.add(".")
    for k in ctx.suspected:
        t.add("\n")
        _templated(rnd, t, k, "possible", POSSIBLE)
    negatable = [k for k in ctx.absent if k not in ctx.suspected and k in TERMS]
    if negatable and rnd.random() < 0.35:
        t.add("\n")
        _templated(rnd, t, rnd.choice(negatable), "negated", NEGATED)


def _plan_lines(rnd: random.Random, ctx: NoteContext, t: _Text) -> None:
    """Hypothetical mentions: risks discussed, return precautions (patient does not have it)."""
    risks = [k for k in ctx.absent if k in TERMS and k not in ctx.suspected]
    if risks and rnd.random() < 0.2:
        t.add(" ")
        _templated(rnd, t, rnd.choice(risks), "hypothetical", HYPOTHETICAL)


def _templated(rnd: random.Random, t: _Text, key: str, assertion: str,
               templates: tuple[tuple[str, str], ...]) -> None:
    """One mention in one of ``templates`` (words before, words after; {test}, {code})."""
    before, after = rnd.choice(templates)
    words = _term(rnd, key)
    t.add(before)
    t.mention(key, words if before else words[0].upper() + words[1:], assertion)
    t.add(after.format(test=_TESTS.get(key, "further work-up"), code=_ICD10[key]))
