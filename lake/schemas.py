"""Arrow schemas of every lake table. Spark jobs mirror these (tests check they agree)."""
from __future__ import annotations

import pyarrow as pa

from conf.settings import HEADS

UTC_TS = pa.timestamp("us", tz="UTC")

# Event kinds in LAKE/emr/events.
KIND_DX = "dx"            # coded diagnosis (Condition / condition_occurrence)
KIND_DX_TEXT = "dx_text"  # ICD-10-CM code found in a note's text
KIND_OBS = "obs"          # measurement / observation with a value
KIND_ENCOUNTER = "encounter"

# Code systems, normalised.
SYSTEM_ICD10CM = "icd10cm"
SYSTEM_ICD9CM = "icd9cm"
SYSTEM_SNOMED = "snomed"
SYSTEM_LOINC = "loinc"
SYSTEM_OMOP = "omop"      # an OMOP concept id with no better code (code = the id in decimal)
SYSTEM_TEXT = "text"      # a diagnosis recognised in note words (code = the code group name)

EVENTS = pa.schema([
    ("patient_key", pa.string()),
    ("event_time", UTC_TS),        # clinical time: onset, effective, visit start
    # When the record became known (FHIR recordedDate / issued / DocumentReference.date, else
    # the clinical time; a partial date is known at the END of its period). Timelines, flags
    # and labels use an event only when both times are on or before the as-of day.
    ("known_time", UTC_TS),
    ("kind", pa.string()),
    ("code_system", pa.string()),
    ("code", pa.string()),
    ("value", pa.float64()),
    ("unit", pa.string()),
    # affirmed | history | negated | possible | family | hypothetical. Coded diagnoses follow
    # FHIR verificationStatus / clinicalStatus (docs/disease_definitions.md). Only affirmed
    # and history count towards prevalence, labels, cohorts and tokens.
    ("assertion", pa.string()),
    # Groups of conf/code_groups.yaml (preprocessing.code_groups.groups_for at ingest).
    ("code_groups", pa.list_(pa.string())),
    ("concept_id", pa.int64()),    # OMOP standard concept id where there is one, else null
    ("source", pa.string()),       # fhir | omop
    ("source_ref", pa.string()),   # keyed hash of the source record id, never the raw id
])

PATIENTS = pa.schema([
    ("patient_key", pa.string()),
    ("birth_date", pa.date32()),
    ("sex", pa.string()),          # F | M | U
    ("source", pa.string()),
    # Date of death (UTC calendar date), NULL when the export records none: FHIR
    # Patient.deceasedDateTime, or deceasedBoolean true dated by meta.lastUpdated; OMOP death.
    ("death_date", pa.date32()),
    # lake.keys.mrn_key of the medical record number (FHIR identifier of type MR, OMOP
    # person_source_value): the same keyed hash the DICOM index gives PatientID, so they join.
    ("mrn_key", pa.string()),
])

# Spans during which the patient's records are complete (LAKE/emr/observation_periods).
# OMOP: the observation_period table. FHIR has none: a patient is registered from the
# first record known for them (earliest availability: later of event and known time),
# with an open end (NULL).
OBSERVATION_PERIODS = pa.schema([
    ("patient_key", pa.string()),
    ("start_date", pa.date32()),   # inclusive, UTC calendar date
    ("end_date", pa.date32()),     # inclusive; NULL = open (observed up to the export)
    ("source", pa.string()),       # omop_observation_period | fhir_first_record
])
PERIOD_SOURCE_OMOP = "omop_observation_period"
PERIOD_SOURCE_FHIR = "fhir_first_record"

# Reasons a patient of the patient table is outside the as-of population (no timeline,
# no score, no list row; counted under these names in the emr_features ledger).
NOT_IN_POPULATION = ("deceased", "not_yet_registered", "not_under_observation")

QUARANTINE = pa.schema([
    ("source", pa.string()),
    ("resource_type", pa.string()),  # FHIR resource type or OMOP table
    ("reason", pa.string()),         # machine-readable reason code
    ("source_ref", pa.string()),     # keyed hash of the record id (or file:line), never raw
    ("detail", pa.string()),         # short, identifier-free explanation
])

# Already diagnosed with the head's code group at or before the end of the as-of day
# (preprocessing.timelines.prevalence; never null). Not a model input: screening leaves
# these patients out of an incident-risk outreach list.
PREVALENT_COLUMNS = tuple(f"prevalent_{h}" for h in HEADS)
TIMELINES = pa.schema([
    ("patient_key", pa.string()),
    ("as_of", pa.date32()),
    ("length", pa.int32()),
    ("tokens", pa.list_(pa.int32())),
    ("days_before", pa.list_(pa.int32())),
    ("age_years", pa.float32()),
    ("sex", pa.string()),
    *[(c, pa.bool_()) for c in PREVALENT_COLUMNS],
])
LABEL_COLUMNS = tuple(f"label_{h}" for h in HEADS)
TIMELINES_WITH_LABELS = TIMELINES
for _c in LABEL_COLUMNS:
    TIMELINES_WITH_LABELS = TIMELINES_WITH_LABELS.append(pa.field(_c, pa.int8()))

SCORES = pa.schema([
    ("patient_key", pa.string()),
    ("as_of", pa.date32()),
    ("model", pa.string()),
    ("model_version", pa.string()),
    ("engine_fingerprint", pa.string()),
    ("precision", pa.string()),
    ("run_id", pa.string()),
    *[(f"score_{h}", pa.float32()) for h in HEADS],
])

# LAKE/screening/as_of=D: one row per (patient, head) flagged for follow-up (inference.screening).
SCREENING = pa.schema([
    ("patient_key", pa.string()),
    ("as_of", pa.date32()),
    ("head", pa.string()),            # t2d | ckd | hf
    ("score", pa.float32()),
    ("rank", pa.int32()),             # 1 = highest score within the head
    ("criterion", pa.string()),       # "threshold>=0.5" or "top_k=100"
    ("model", pa.string()),
    ("model_version", pa.string()),
    ("engine_fingerprint", pa.string()),
    ("precision", pa.string()),
    ("run_id", pa.string()),
])

# LAKE/worklist/as_of=D: one row per flagged patient with open CT findings beside (inference.worklist).
WORKLIST_FINDING = pa.struct([("series_key", pa.string()), ("finding_id", pa.int32()),
                              ("diameter_mm", pa.float64()), ("max_prob", pa.float32())])
WORKLIST = pa.schema([
    ("patient_key", pa.string()),
    ("as_of", pa.date32()),
    ("risk_heads", pa.list_(pa.string())),     # heads the patient is flagged on (HEADS order)
    *[(f"score_{h}", pa.float32()) for h in HEADS],
    ("ct_series", pa.int32()),                 # series with at least one open finding
    ("ct_findings", pa.int32()),
    ("ct_max_diameter_mm", pa.float64()),      # NULL without findings
    ("ct_findings_list", pa.list_(WORKLIST_FINDING)),   # by series_key, finding_id
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

# ---------------------------------------------------------------- imaging (DICOM index)
# Written by jobs/dicom_index. No raw UIDs, names or patient ids: keys are
# pseudonymised (lake.keys.pseudonymise) of SeriesInstanceUID, StudyInstanceUID,
# SOPInstanceUID, and PatientID (an MRN) through lake.keys.mrn_key. File paths are relative
# to the archive root with every component keyed (lake.archive): folder names often carry identifiers.

DICOM_INSTANCES = pa.schema([
    ("series_key", pa.string()),
    ("study_key", pa.string()),
    ("mrn_key", pa.string()),              # lake.keys.mrn_key(PatientID); the EMR key comes from IMAGING_LINK
    ("sop_key", pa.string()),
    ("path", pa.string()),
    ("file_size_bytes", pa.int64()),
    ("sop_class_uid", pa.string()),        # a standard class UID, not an identifier
    ("modality", pa.string()),
    ("image_type", pa.string()),           # values joined by "\"
    ("transfer_syntax", pa.string()),
    ("manufacturer", pa.string()),
    ("study_date", pa.date32()),
    ("instance_number", pa.int32()),
    ("position_lps_mm", pa.list_(pa.float64())),   # ImagePositionPatient (x, y, z)
    ("orientation", pa.list_(pa.float64())),       # ImageOrientationPatient (6 cosines)
    ("pixel_spacing_mm", pa.list_(pa.float64())),  # PixelSpacing (between rows, between columns)
    ("rows", pa.int32()),
    ("cols", pa.int32()),
    ("slice_thickness_mm", pa.float64()),
    ("gantry_tilt_deg", pa.float64()),
    ("rescale_slope", pa.float64()),
    ("rescale_intercept", pa.float64()),
    ("has_pixels", pa.bool_()),
])

# verdict: "eligible" or a reason code (preprocessing.dicom_series.REASONS).
DICOM_SERIES = pa.schema([
    ("series_key", pa.string()),
    ("study_key", pa.string()),
    ("mrn_key", pa.string()),
    ("verdict", pa.string()),
    ("eligible", pa.bool_()),
    ("detail", pa.string()),
    ("modality", pa.string()),
    ("image_type", pa.string()),
    ("transfer_syntax", pa.string()),
    ("manufacturer", pa.string()),
    ("study_date", pa.date32()),
    ("rows", pa.int32()),
    ("cols", pa.int32()),
    ("pixel_spacing_row_mm", pa.float64()),
    ("pixel_spacing_col_mm", pa.float64()),
    ("slice_thickness_mm", pa.float64()),
    ("slice_count", pa.int32()),
    ("spacing_min_mm", pa.float64()),      # from positions projected on the slice normal
    ("spacing_median_mm", pa.float64()),
    ("spacing_max_mm", pa.float64()),
    ("regular_spacing", pa.bool_()),
    ("tilt_deg", pa.float64()),
    ("orientation", pa.list_(pa.float64())),
    ("paths", pa.list_(pa.string())),      # ordered along the slice normal when geometry allows
    ("run_id", pa.string()),
])

# Files the index could not take as instances (not DICOM, unreadable, cut short).
DICOM_QUARANTINE = pa.schema([
    ("path", pa.string()),
    ("reason", pa.string()),               # preprocessing.dicom_header.FILE_REASONS
    ("detail", pa.string()),
    ("file_size_bytes", pa.int64()),
    ("run_id", pa.string()),
])

# One row per series of the DICOM index: the EMR patient its PatientID (MRN) belongs to
# (LAKE/imaging/patient_link, built by jobs/imaging_link). Unlinked series keep a row with
# patient_key NULL and the reason in link_status.
LINK_LINKED = "linked"
LINK_NO_MRN = "no_patient_id"            # the DICOM files carry no PatientID
LINK_NOT_IN_EMR = "mrn_not_in_emr"       # no EMR patient carries this MRN
LINK_AMBIGUOUS = "ambiguous_mrn"         # more than one EMR patient carries it
LINK_STATUSES = (LINK_LINKED, LINK_NO_MRN, LINK_NOT_IN_EMR, LINK_AMBIGUOUS)
IMAGING_LINK = pa.schema([
    ("series_key", pa.string()),
    ("study_key", pa.string()),
    ("mrn_key", pa.string()),
    ("patient_key", pa.string()),          # EMR patient_key; NULL unless linked
    ("link_status", pa.string()),          # LINK_STATUSES
])
