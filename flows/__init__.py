"""The Prefect flow `smpo` and the `smpo` command line."""
