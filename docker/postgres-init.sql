-- One PostgreSQL server, two databases: `prefect` (POSTGRES_DB) and this one for MLflow.
-- Each keeps its own alembic_version table, so they cannot share a database.
CREATE DATABASE mlflow;
