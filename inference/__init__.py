"""Ray Data scoring pipelines: EMR and CT, actors, batching, QC, metrics, reports."""
