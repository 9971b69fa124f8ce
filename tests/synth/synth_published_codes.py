"""What the published code systems say, written down for the tests independently of the
generator's own tables: which codes belong to the target concept groups, and which words a
note uses for them. A generator bug that mislabels a code shows up as a mismatch here."""
from __future__ import annotations

import re

ICD10 = "http://hl7.org/fhir/sid/icd-10-cm"
ICD9 = "http://hl7.org/fhir/sid/icd-9-cm"
SNOMED = "http://snomed.info/sct"

# SNOMED CT concepts (and their is-a descendants used in Synthea's modules) per group.
SNOMED_GROUPS = {
    "44054006": "t2d",                                   # Diabetes mellitus type 2
    "709044004": "ckd", "431855005": "ckd", "431856006": "ckd", "433144002": "ckd",
    "700378005": "ckd", "700379002": "ckd", "431857002": "ckd", "433146000": "ckd",
    "46177005": "ckd",                                   # CKD, stages 1-5, ESRD
    "84114007": "heart_failure", "88805009": "heart_failure", "703272007": "heart_failure",
    "418304008": "heart_failure", "417996009": "heart_failure", "42343007": "heart_failure",
}
# ICD-10-CM categories and ICD-9-CM codes (CMS CCW style definitions).
ICD10_PREFIX = {"E11": "t2d", "N18": "ckd", "I50": "heart_failure"}
# ICD-9-CM 250.x0 / 250.x2 are type II diabetes; 585.x CKD; 428.x heart failure.
ICD9_PATTERN = [(re.compile(r"^250\.\d[02]$"), "t2d"), (re.compile(r"^585(\.\d)?$"), "ckd"),
                (re.compile(r"^428(\.\d{1,2})?$"), "heart_failure")]

# The words a clinician uses for each group, abbreviations included (case-insensitive).
GROUP_WORDS = {
    "t2d": re.compile(r"diabet|\bT2DM?\b|\bDM2\b", re.I),
    "ckd": re.compile(r"kidney|renal|\bCKD\b", re.I),
    "heart_failure": re.compile(r"heart failure|\bCHF\b|\bHF[rp]EF\b", re.I),
    "hypertension": re.compile(r"hypertension|\bHTN\b|high blood pressure", re.I),
    "atrial_fibrillation": re.compile(r"atrial fibrillation|\bAF\b|\bafib\b", re.I),
    "cad": re.compile(r"coronary|ischemic heart|\bCAD\b", re.I),
    "stroke": re.compile(r"stroke|\bCVA\b|cerebral infarction|cerebrovascular", re.I),
    "hyperlipidaemia": re.compile(r"hyperlipidemia|\bHLD\b|cholesterol", re.I),
    "obesity": re.compile(r"obesity", re.I),
}


def group_of(system: str, code: str) -> str | None:
    """The target group (t2d, ckd, heart_failure) of one coding, or None."""
    if system == SNOMED:
        return SNOMED_GROUPS.get(code)
    if system == ICD10:
        return ICD10_PREFIX.get(code[:3])
    if system == ICD9:
        return next((g for rx, g in ICD9_PATTERN if rx.match(code)), None)
    return None
