"""The front of the loop: the tables the `expand` and `candidates` stages write, the curator's
decision log, its materialisation into data/raw, and the curation page
(`python -m tasks.curate`, `make curate`).

May import: tasks.core and models. Never the stage entries, the trainer packages or Prefect.
"""
