"""What every stage shares: params loading, the per-sample store, manifests, image decoding,
and the stage runners with their executors: threads for per-item work; for model stages a
Worker run in this process (workers) or in actors on a Ray cluster (ray_pool).

May import: tasks.core and models (never a stage entry, another tasks package, or flows).
"""
