"""Airflow-side code: the operators and task bodies the DAGs in dags/ call. Only the DAGs import it."""
