"""Pure functions: FHIR/OMOP parsing, ICD normalisation and extraction, timelines, CT geometry. No Spark, Ray or Airflow imports."""
