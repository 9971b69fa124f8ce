"""Arrow schemas of every lake table. Spark jobs mirror these (tests check they agree)."""
from __future__ import annotations

import pyarrow as pa

UTC_TS = pa.timestamp("us", tz="UTC")

# Event kinds in LAKE/emr/events.
KIND_DX = "dx"            # coded diagnosis (Condition / condition_occurrence)
KIND_DX_TEXT = "dx_text"  # ICD-10-CM code found in a note's text
KIND_OBS = "obs"          # measurement / observation with a value
KIND_ENCOUNTER = "encounter"
EVENT_KINDS = (KIND_DX, KIND_DX_TEXT, KIND_OBS, KIND_ENCOUNTER)

# Code systems, normalised.
SYSTEM_ICD10CM = "icd10cm"
SYSTEM_ICD9CM = "icd9cm"
SYSTEM_SNOMED = "snomed"
SYSTEM_LOINC = "loinc"

EVENTS = pa.schema([
    ("patient_key", pa.string()),
    ("event_time", UTC_TS),
    ("kind", pa.string()),
    ("code_system", pa.string()),
    ("code", pa.string()),
    ("value", pa.float64()),
    ("unit", pa.string()),
    # affirmed | negated | history | family (dx_text); affirmed for coded data
    ("assertion", pa.string()),
    ("code_groups", pa.list_(pa.string())),
    ("source", pa.string()),       # fhir | omop
    ("source_ref", pa.string()),   # keyed hash of the source record id, never the raw id
])

PATIENTS = pa.schema([
    ("patient_key", pa.string()),
    ("birth_date", pa.date32()),
    ("sex", pa.string()),          # F | M | U
    ("source", pa.string()),
])

QUARANTINE = pa.schema([
    ("source", pa.string()),
    ("resource_type", pa.string()),  # FHIR resource type or OMOP table
    ("reason", pa.string()),         # machine-readable reason code
    ("source_ref", pa.string()),     # keyed hash of the record id (or file:line), never raw
    ("detail", pa.string()),         # short, identifier-free explanation
])

TIMELINES = pa.schema([
    ("patient_key", pa.string()),
    ("as_of", pa.date32()),
    ("length", pa.int32()),
    ("tokens", pa.list_(pa.int32())),
    ("days_before", pa.list_(pa.int32())),
    ("age_years", pa.float32()),
    ("sex", pa.string()),
])
LABEL_COLUMNS = ("label_t2d", "label_ckd", "label_hf")
TIMELINES_WITH_LABELS = TIMELINES
for _c in LABEL_COLUMNS:
    TIMELINES_WITH_LABELS = TIMELINES_WITH_LABELS.append(pa.field(_c, pa.int8()))

HEADS = ("t2d", "ckd", "hf")
SCORES = pa.schema([
    ("patient_key", pa.string()),
    ("as_of", pa.date32()),
    ("model", pa.string()),
    ("model_version", pa.string()),
    ("engine_fingerprint", pa.string()),
    ("precision", pa.string()),
    ("run_id", pa.string()),
    ("score_t2d", pa.float32()),
    ("score_ckd", pa.float32()),
    ("score_hf", pa.float32()),
])

FINDINGS = pa.schema([
    ("series_key", pa.string()),
    ("study_key", pa.string()),
    ("patient_key", pa.string()),
    ("as_of", pa.date32()),
    ("finding_id", pa.int32()),
    ("centre_x_mm", pa.float64()),
    ("centre_y_mm", pa.float64()),
    ("centre_z_mm", pa.float64()),
    ("diameter_mm", pa.float64()),
    ("volume_mm3", pa.float64()),
    ("max_prob", pa.float32()),
    ("mean_prob", pa.float32()),
    ("model", pa.string()),
    ("model_version", pa.string()),
    ("engine_fingerprint", pa.string()),
    ("precision", pa.string()),
    ("run_id", pa.string()),
])
