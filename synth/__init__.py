"""Synthetic inputs that behave like real exports (Synthea FHIR Bulk, OMOP CDM 5.4, DICOM CT), with known ground truth.

Used by the CLI (`medscreen synth`, the demo), tests, benchmarks and model training; never by a
production stage.
"""
