"""Spark entry points (spark-submit-able): thin read → transform → write."""
