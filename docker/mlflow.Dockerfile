# The MLflow tracking server of compose.yaml: the official image, the version pyproject.toml
# pins, plus the PostgreSQL driver its backend store needs.
FROM ghcr.io/mlflow/mlflow:v3.17.2
RUN pip install --no-cache-dir "psycopg2-binary>=2.9,<3"
