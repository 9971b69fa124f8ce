"""Code tables of the synthetic EMR: conditions (ICD-10-CM, ICD-9-CM, SNOMED CT), LOINC
observations with UCUM units, and the deliberately bad codes planted as bad records.

Every ICD-10-CM code here is a valid billable (leaf) code of the simple_icd_10_cm code
set the project pins; tests check it, so a code-set update that retires one fails loudly.
"""
from __future__ import annotations

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
    snomed_display: str
    prose: str  # how a note names it ("type 2 diabetes mellitus")


def _c(icd10: str, display: str, icd9: str, icd9_display: str, snomed: str,
       snomed_display: str, prose: str) -> ConditionCode:
    return ConditionCode(icd10, display, icd9, icd9_display, snomed, snomed_display, prose)


# Variants per simulated condition; the simulation picks one (weights where given).
CONDITIONS: dict[str, list[ConditionCode]] = {
    "t2d": [
        _c("E11.9", "Type 2 diabetes mellitus without complications", "250.00",
           "Diabetes mellitus without mention of complication, type II", "44054006",
           "Diabetes mellitus type 2", "type 2 diabetes mellitus without complications"),
        _c("E11.65", "Type 2 diabetes mellitus with hyperglycemia", "250.00",
           "Diabetes mellitus without mention of complication, type II", "44054006",
           "Diabetes mellitus type 2", "type 2 diabetes mellitus with hyperglycemia"),
        _c("E11.8", "Type 2 diabetes mellitus with unspecified complications", "250.90",
           "Diabetes with unspecified complication, type II", "44054006",
           "Diabetes mellitus type 2", "type 2 diabetes with complications"),
    ],
    # CKD variants are picked by eGFR stage (see ckd_variant), not at random.
    "ckd": [
        _c("N18.2", "Chronic kidney disease, stage 2 (mild)", "585.2",
           "Chronic kidney disease, stage II (mild)", "709044004", "Chronic kidney disease",
           "chronic kidney disease stage 2"),
        _c("N18.31", "Chronic kidney disease, stage 3a", "585.3",
           "Chronic kidney disease, stage III (moderate)", "709044004", "Chronic kidney disease",
           "chronic kidney disease stage 3a"),
        _c("N18.32", "Chronic kidney disease, stage 3b", "585.3",
           "Chronic kidney disease, stage III (moderate)", "709044004", "Chronic kidney disease",
           "CKD stage 3b"),
        _c("N18.4", "Chronic kidney disease, stage 4 (severe)", "585.4",
           "Chronic kidney disease, stage IV (severe)", "709044004", "Chronic kidney disease",
           "chronic kidney disease stage 4"),
        _c("N18.5", "Chronic kidney disease, stage 5", "585.5",
           "Chronic kidney disease, stage V", "709044004", "Chronic kidney disease",
           "chronic kidney disease stage 5"),
        _c("N18.9", "Chronic kidney disease, unspecified", "585.9",
           "Chronic kidney disease, unspecified", "709044004", "Chronic kidney disease",
           "chronic kidney disease"),
        _c("N18.30", "Chronic kidney disease, stage 3 unspecified", "585.3",
           "Chronic kidney disease, stage III (moderate)", "709044004", "Chronic kidney disease",
           "chronic kidney disease stage 3"),
    ],
    "hf": [
        _c("I50.9", "Heart failure, unspecified", "428.0", "Congestive heart failure, unspecified",
           "84114007", "Heart failure", "heart failure"),
        _c("I50.32", "Chronic diastolic (congestive) heart failure", "428.32",
           "Chronic diastolic heart failure", "84114007", "Heart failure",
           "chronic diastolic heart failure"),
        _c("I50.22", "Chronic systolic (congestive) heart failure", "428.22",
           "Chronic systolic heart failure", "84114007", "Heart failure",
           "chronic systolic heart failure"),
        _c("I50.30", "Unspecified diastolic (congestive) heart failure", "428.30",
           "Diastolic heart failure, unspecified", "84114007", "Heart failure",
           "diastolic heart failure"),
    ],
    "htn": [
        _c("I10", "Essential (primary) hypertension", "401.9", "Unspecified essential hypertension",
           "38341003", "Hypertensive disorder", "essential hypertension"),
    ],
    "cad": [
        _c("I25.10", "Atherosclerotic heart disease of native coronary artery without angina pectoris",
           "414.01", "Coronary atherosclerosis of native coronary artery", "53741008",
           "Coronary arteriosclerosis", "coronary artery disease"),
    ],
    "af": [
        _c("I48.91", "Unspecified atrial fibrillation", "427.31", "Atrial fibrillation", "49436004",
           "Atrial fibrillation", "atrial fibrillation"),
        _c("I48.0", "Paroxysmal atrial fibrillation", "427.31", "Atrial fibrillation", "49436004",
           "Atrial fibrillation", "paroxysmal atrial fibrillation"),
    ],
    "stroke": [
        _c("I63.9", "Cerebral infarction, unspecified", "434.91",
           "Cerebral artery occlusion, unspecified with cerebral infarction", "230690007",
           "Cerebrovascular accident", "stroke"),
    ],
    "stroke_history": [
        _c("Z86.73", "Personal history of transient ischemic attack (TIA), and cerebral infarction "
           "without residual deficits", "V12.54",
           "Personal history of transient ischemic attack (TIA), and cerebral infarction "
           "without residual deficits", "230690007", "Cerebrovascular accident", "stroke"),
    ],
    "obesity": [
        _c("E66.9", "Obesity, unspecified", "278.00", "Obesity, unspecified", "414916001",
           "Obesity", "obesity"),
        _c("E66.01", "Morbid (severe) obesity due to excess calories", "278.01", "Morbid obesity",
           "414916001", "Obesity", "morbid obesity"),
    ],
    "prediabetes": [
        _c("R73.03", "Prediabetes", "790.29", "Other abnormal glucose", "714628002", "Prediabetes",
           "prediabetes"),
    ],
    "hld": [
        _c("E78.5", "Hyperlipidemia, unspecified", "272.4", "Other and unspecified hyperlipidemia",
           "55822004", "Hyperlipidemia", "hyperlipidemia"),
    ],
}

# Episodic complaints coded at a share of visits: they carry no signal, they make the
# vocabulary and the visit mix look like a real clinic's.
ACUTE: list[ConditionCode] = [
    _c("J06.9", "Acute upper respiratory infection, unspecified", "465.9",
       "Acute upper respiratory infections of unspecified site", "54150009",
       "Upper respiratory infection", "upper respiratory infection"),
    _c("M54.50", "Low back pain, unspecified", "724.2", "Lumbago", "279039007", "Low back pain",
       "low back pain"),
    _c("K21.9", "Gastro-esophageal reflux disease without esophagitis", "530.81",
       "Esophageal reflux", "235595009", "Gastroesophageal reflux disease", "GERD"),
    _c("F32.A", "Depression, unspecified", "311", "Depressive disorder, not elsewhere classified",
       "35489007", "Depressive disorder", "depression"),
    _c("J45.909", "Unspecified asthma, uncomplicated", "493.90", "Asthma, unspecified",
       "195967001", "Asthma", "asthma"),
    _c("N39.0", "Urinary tract infection, site not specified", "599.0",
       "Urinary tract infection, site not specified", "68566005", "Urinary tract infection",
       "urinary tract infection"),
    _c("R51.9", "Headache, unspecified", "784.0", "Headache", "25064002", "Headache", "headache"),
    _c("E03.9", "Hypothyroidism, unspecified", "244.9", "Unspecified acquired hypothyroidism",
       "40930008", "Hypothyroidism", "hypothyroidism"),
    _c("R07.9", "Chest pain, unspecified", "786.50", "Chest pain, unspecified", "29857009",
       "Chest pain", "chest pain"),
    _c("E55.9", "Vitamin D deficiency, unspecified", "268.9", "Unspecified vitamin D deficiency",
       "34713006", "Vitamin D deficiency", "vitamin D deficiency"),
]

# After a T2D diagnosis most patients start metformin; coded as a status code.
Z_ORAL_HYPOGLYCEMIC = _c("Z79.84", "Long term (current) use of oral hypoglycemic drugs", "V58.69",
                         "Long-term (current) use of other medications", "428291000124105",
                         "Long-term current use of oral hypoglycemic", "on metformin")


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
