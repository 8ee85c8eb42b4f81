"""What every stage shares: params loading, the per-sample store, manifests, image decoding,
and the stage runner with its executors (how a stage's per-item work is fanned out).

May import: tasks.core and models (never a stage entry, another tasks package, or flows).
"""
