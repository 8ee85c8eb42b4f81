"""Niche's stages and commands. `tasks/<stage>.py` is the entry of each DVC stage (its params,
the function that does the work, `main()`); the packages below hold what the entries share.
Nothing here imports Prefect or flows. Layers and import rules: README, "Layout".
"""
