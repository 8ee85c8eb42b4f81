"""Prefect: the flows (build-dataset, train, validate, validate-nightly), their deployments and
the local server and runner. Each flow task asks DVC to reproduce a stage; the stage's code is
in tasks/. May import anything below it; nothing imports flows.
"""
