"""The NanoDiT trainer and sampler: its params, the training loop split by job (set-up, data,
step, checkpoints, logging), and the one sampler that loads a checkpoint, encodes its
conditioning as the dataset stages did and samples (generate, sweep and validate call it).

May import: tasks.core, tasks.data, tasks.training, the dataset stages' entries (their params
and item functions, to encode a prompt as they did) and models. Never the trainer commands.
"""
