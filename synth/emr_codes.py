"""Code tables of the synthetic EMR: conditions (ICD-10-CM, ICD-9-CM, SNOMED CT), LOINC
observations with UCUM units, and the deliberately bad codes planted as bad records.

Every ICD-10-CM code here is a valid billable (leaf) code of the simple_icd_10_cm code
set the project pins; tests check it, so a code-set update that retires one fails loudly.
"""
from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

SYSTEM_ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
SYSTEM_ICD9CM = "http://hl7.org/fhir/sid/icd-9-cm"
SYSTEM_SNOMED = "http://snomed.info/sct"
SYSTEM_LOINC = "http://loinc.org"
SYSTEM_UCUM = "http://unitsofmeasure.org"


@dataclass(frozen=True)
class ConditionCode:
    """One diagnosis as the three vocabularies spell it, plus the words a clinician writes."""

    icd10: str
    display: str
    icd9: str
    icd9_display: str
    snomed: str
    snomed_display: str  # SNOMED CT fully specified name, semantic tag included, as Synthea writes it
    prose: str  # how a clinician writes it in a note ("type 2 diabetes mellitus")


def _c(icd10: str, display: str, icd9: str, icd9_display: str, snomed: str,
       snomed_display: str, prose: str) -> ConditionCode:
    return ConditionCode(icd10, display, icd9, icd9_display, snomed, snomed_display, prose)


# Variants per simulated condition; the simulation picks one (weights where given). SNOMED CT
# codes and their fully specified names (semantic tag included) are those Synthea's modules
# write; where a stage or type has its own SNOMED concept, the variant carries it.
CONDITIONS: dict[str, list[ConditionCode]] = {
    "t2d": [
        _c("E11.9", "Type 2 diabetes mellitus without complications", "250.00",
           "Diabetes mellitus without mention of complication, type II", "44054006",
           "Diabetes mellitus type 2 (disorder)", "type 2 diabetes mellitus"),
        _c("E11.65", "Type 2 diabetes mellitus with hyperglycemia", "250.02",
           "Diabetes mellitus without mention of complication, type II or unspecified type, "
           "uncontrolled", "44054006", "Diabetes mellitus type 2 (disorder)",
           "type 2 diabetes mellitus, poorly controlled"),
        _c("E11.8", "Type 2 diabetes mellitus with unspecified complications", "250.90",
           "Diabetes with unspecified complication, type II", "44054006",
           "Diabetes mellitus type 2 (disorder)", "T2DM"),
    ],
    # CKD variants are picked by eGFR stage (see _ckd_variant), not at random.
    "ckd": [
        _c("N18.2", "Chronic kidney disease, stage 2 (mild)", "585.2",
           "Chronic kidney disease, stage II (mild)", "431856006",
           "Chronic kidney disease stage 2 (disorder)", "chronic kidney disease stage 2"),
        _c("N18.31", "Chronic kidney disease, stage 3a", "585.3",
           "Chronic kidney disease, stage III (moderate)", "700378005",
           "Chronic kidney disease stage 3A (disorder)", "CKD stage 3a"),
        _c("N18.32", "Chronic kidney disease, stage 3b", "585.3",
           "Chronic kidney disease, stage III (moderate)", "700379002",
           "Chronic kidney disease stage 3B (disorder)", "CKD 3b"),
        _c("N18.4", "Chronic kidney disease, stage 4 (severe)", "585.4",
           "Chronic kidney disease, stage IV (severe)", "431857002",
           "Chronic kidney disease stage 4 (disorder)", "chronic kidney disease stage 4"),
        _c("N18.5", "Chronic kidney disease, stage 5", "585.5",
           "Chronic kidney disease, stage V", "433146000",
           "Chronic kidney disease stage 5 (disorder)", "CKD stage 5"),
        _c("N18.9", "Chronic kidney disease, unspecified", "585.9",
           "Chronic kidney disease, unspecified", "709044004", "Chronic kidney disease (disorder)",
           "chronic kidney disease"),
        _c("N18.30", "Chronic kidney disease, stage 3 unspecified", "585.3",
           "Chronic kidney disease, stage III (moderate)", "433144002",
           "Chronic kidney disease stage 3 (disorder)", "CKD stage 3"),
    ],
    "hf": [
        _c("I50.9", "Heart failure, unspecified", "428.0", "Congestive heart failure, unspecified",
           "84114007", "Heart failure (disorder)", "heart failure"),
        _c("I50.32", "Chronic diastolic (congestive) heart failure", "428.32",
           "Chronic diastolic heart failure", "88805009",
           "Chronic congestive heart failure (disorder)", "chronic diastolic CHF"),
        _c("I50.22", "Chronic systolic (congestive) heart failure", "428.22",
           "Chronic systolic heart failure", "703272007",
           "Heart failure with reduced ejection fraction (disorder)", "HFrEF"),
        _c("I50.30", "Unspecified diastolic (congestive) heart failure", "428.30",
           "Diastolic heart failure, unspecified", "418304008",
           "Diastolic heart failure (disorder)", "diastolic heart failure"),
    ],
    "htn": [
        _c("I10", "Essential (primary) hypertension", "401.9", "Unspecified essential hypertension",
           "59621000", "Essential hypertension (disorder)", "essential hypertension"),
    ],
    "cad": [
        _c("I25.10", "Atherosclerotic heart disease of native coronary artery without angina pectoris",
           "414.01", "Coronary atherosclerosis of native coronary artery", "53741008",
           "Coronary arteriosclerosis (disorder)", "coronary artery disease"),
    ],
    "af": [
        _c("I48.91", "Unspecified atrial fibrillation", "427.31", "Atrial fibrillation", "49436004",
           "Atrial fibrillation (disorder)", "atrial fibrillation"),
        _c("I48.0", "Paroxysmal atrial fibrillation", "427.31", "Atrial fibrillation", "49436004",
           "Atrial fibrillation (disorder)", "paroxysmal AF"),
    ],
    "stroke": [
        _c("I63.9", "Cerebral infarction, unspecified", "434.91",
           "Cerebral artery occlusion, unspecified with cerebral infarction", "230690007",
           "Cerebrovascular accident (disorder)", "stroke"),
    ],
    "stroke_history": [
        _c("Z86.73", "Personal history of transient ischemic attack (TIA), and cerebral infarction "
           "without residual deficits", "V12.54",
           "Personal history of transient ischemic attack (TIA), and cerebral infarction "
           "without residual deficits", "230690007", "Cerebrovascular accident (disorder)",
           "stroke"),
    ],
    "obesity": [
        _c("E66.9", "Obesity, unspecified", "278.00", "Obesity, unspecified", "414916001",
           "Obesity (disorder)", "obesity"),
        _c("E66.01", "Morbid (severe) obesity due to excess calories", "278.01", "Morbid obesity",
           "238136002", "Morbid obesity (disorder)", "morbid obesity"),
    ],
    "prediabetes": [
        _c("R73.03", "Prediabetes", "790.29", "Other abnormal glucose", "714628002",
           "Prediabetes (finding)", "prediabetes"),
    ],
    "hld": [
        _c("E78.5", "Hyperlipidemia, unspecified", "272.4", "Other and unspecified hyperlipidemia",
           "55822004", "Hyperlipidemia (disorder)", "hyperlipidemia"),
    ],
}

# Episodic complaints coded at a share of visits: they carry no signal, they make the
# vocabulary and the visit mix look like a real clinic's. They resolve (abatementDateTime).
ACUTE: list[ConditionCode] = [
    _c("J06.9", "Acute upper respiratory infection, unspecified", "465.9",
       "Acute upper respiratory infections of unspecified site", "54150009",
       "Upper respiratory infection (disorder)", "upper respiratory infection"),
    _c("M54.50", "Low back pain, unspecified", "724.2", "Lumbago", "279039007",
       "Low back pain (finding)", "low back pain"),
    _c("K21.9", "Gastro-esophageal reflux disease without esophagitis", "530.81",
       "Esophageal reflux", "235595009", "Gastroesophageal reflux disease (disorder)", "GERD"),
    _c("F32.A", "Depression, unspecified", "311", "Depressive disorder, not elsewhere classified",
       "35489007", "Depressive disorder (disorder)", "depression"),
    _c("J45.909", "Unspecified asthma, uncomplicated", "493.90", "Asthma, unspecified",
       "195967001", "Asthma (disorder)", "asthma"),
    _c("N39.0", "Urinary tract infection, site not specified", "599.0",
       "Urinary tract infection, site not specified", "68566005",
       "Urinary tract infectious disease (disorder)", "urinary tract infection"),
    _c("R51.9", "Headache, unspecified", "784.0", "Headache", "25064002", "Headache (finding)",
       "headache"),
    _c("E03.9", "Hypothyroidism, unspecified", "244.9", "Unspecified acquired hypothyroidism",
       "40930008", "Hypothyroidism (disorder)", "hypothyroidism"),
    _c("R07.9", "Chest pain, unspecified", "786.50", "Chest pain, unspecified", "29857009",
       "Chest pain (finding)", "chest pain"),
    _c("E55.9", "Vitamin D deficiency, unspecified", "268.9", "Unspecified vitamin D deficiency",
       "34713006", "Vitamin D deficiency (disorder)", "vitamin D deficiency"),
]

# After a T2D diagnosis most patients start metformin; coded as a status code.
Z_ORAL_HYPOGLYCEMIC = _c("Z79.84", "Long term (current) use of oral hypoglycemic drugs", "V58.69",
                         "Long-term (current) use of other medications", "428291000124105",
                         "Long-term current use of oral hypoglycemic (situation)", "on metformin")

# The concept group (conf/code_groups.yaml) each simulated condition key belongs to; used for
# the ground truth only. Keys without a group (acute complaints, prediabetes, Z codes) are absent.
TRUTH_GROUP: dict[str, str] = {
    "t2d": "t2d", "ckd": "ckd", "hf": "heart_failure", "htn": "hypertension", "cad": "cad",
    "af": "atrial_fibrillation", "stroke": "stroke", "stroke_history": "stroke",
    "obesity": "obesity", "hld": "hyperlipidaemia",
}


# OMOP standard concept ids of the SNOMED CT codes above, where the OHDSI vocabulary's id is
# known (checked against public OHDSI cohort definitions and phenotype concept sets). The
# others get stable local ids (see local_concept_id), which docs/synthetic_emr.md lists.
SNOMED_CONCEPT_ID: dict[str, int] = {
    "44054006": 201826,     # Type 2 diabetes mellitus
    "709044004": 46271022,  # Chronic kidney disease
    "431857002": 443612,    # Chronic kidney disease stage 4
    "433146000": 443611,    # Chronic kidney disease stage 5
    "84114007": 316139,     # Heart failure
    "88805009": 4229440,    # Chronic congestive heart failure
    "49436004": 313217,     # Atrial fibrillation
    "55822004": 432867,     # Hyperlipidemia
    "59621000": 320128,     # Essential hypertension
}
# SNOMED CT parent (is-a) of codes whose group concept is an ancestor in the vocabulary: the
# subset's concept_ancestor rows come from these (plus every concept's own 0-level row).
SNOMED_PARENT: dict[str, str] = {
    "431856006": "709044004", "700378005": "433144002", "700379002": "433144002",
    "433144002": "709044004", "431857002": "709044004", "433146000": "709044004",
    "88805009": "84114007", "703272007": "84114007", "418304008": "84114007",
    "238136002": "414916001",
}
LOCAL_CONCEPT_BASE = 2_000_000_000  # OMOP reserves ids above 2e9 for local concepts


@functools.lru_cache(maxsize=4096)  # a handful of codes, looked up once per row
def local_concept_id(vocabulary: str, code: str) -> int:
    """A stable synthetic concept id for ``code`` of ``vocabulary`` (same in every export)."""
    h = hashlib.sha1(f"{vocabulary}|{code}".encode()).digest()
    return LOCAL_CONCEPT_BASE + int.from_bytes(h[:4], "big") % 100_000_000


def snomed_concept_id(code: str) -> int:
    """The OMOP standard concept id of a SNOMED CT code (OHDSI's where known, else local)."""
    return SNOMED_CONCEPT_ID.get(code) or local_concept_id("SNOMED", code)


@dataclass(frozen=True)
class LoincCode:
    code: str
    display: str
    short: str
    unit: str          # UCUM code, also used as the human-readable unit
    category: str      # FHIR observation-category code


HBA1C = LoincCode("4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood", "HbA1c", "%", "laboratory")
GLUCOSE = LoincCode("2345-7", "Glucose [Mass/volume] in Serum or Plasma", "Glucose", "mg/dL",
                    "laboratory")
BMI = LoincCode("39156-5", "Body mass index (BMI) [Ratio]", "BMI", "kg/m2", "vital-signs")
SBP = LoincCode("8480-6", "Systolic blood pressure", "Systolic BP", "mm[Hg]", "vital-signs")
DBP = LoincCode("8462-4", "Diastolic blood pressure", "Diastolic BP", "mm[Hg]", "vital-signs")
BP_PANEL = LoincCode("85354-9", "Blood pressure panel with all children optional", "BP panel",
                     "mm[Hg]", "vital-signs")
EGFR_MDRD = LoincCode("33914-3",
                      "Glomerular filtration rate/1.73 sq M.predicted [Volume Rate/Area] in Serum "
                      "or Plasma by Creatinine-based formula (MDRD)", "eGFR", "mL/min/{1.73_m2}",
                      "laboratory")
EGFR_CKDEPI = LoincCode("62238-1",
                        "Glomerular filtration rate/1.73 sq M.predicted [Volume Rate/Area] in "
                        "Serum, Plasma or Blood by Creatinine-based formula (CKD-EPI)", "eGFR",
                        "mL/min/{1.73_m2}", "laboratory")
NTPROBNP = LoincCode("33762-6", "Natriuretic peptide.B prohormone N-Terminal [Mass/volume] in "
                     "Serum or Plasma", "NT-proBNP", "pg/mL", "laboratory")
SMOKING = LoincCode("72166-2", "Tobacco smoking status", "Smoking status", "", "social-history")
SMOKING_VALUES = [("266919005", "Never smoker"), ("8517006", "Ex-smoker"),
                  ("77176002", "Smoker")]

# Well-formed (letter, two digits, dot, 1-4 characters) but absent from ICD-10-CM.
INVALID_ICD10 = ["E11.99X", "I50.99", "N18.8", "R73.0X", "I10.9", "E66.3X", "E11.99", "I50.8X"]
# Not even the shape of an ICD-10-CM code: what OCR, copy-paste and free-text fields produce.
MALFORMED_CODES = ["E1 1..9", "123ABC", "I 10", "E11,9", "N18-3", "?", "E11.9.", "0I50.9"]
