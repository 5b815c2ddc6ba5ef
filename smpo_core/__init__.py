"""smpo's library: the SmPO method, data, models and metrics; no Prefect or MLflow."""
