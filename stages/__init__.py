"""The pipeline stages: one Prefect task each, thin wrappers around smpo_core."""
