"""The SDXL trainer (LoRA with pivotal tuning, the negative LoRA) and its sampler: params,
latent batches, the prompt cache, the loop, checkpoints; the sampler that loads a checkpoint's
LoRA and embeddings into a pipeline (sample_lora and the train flow's sweep call it).

May import: tasks.core, tasks.training, the dataset stages' entries (their params and tables)
and models. Never the trainer commands.
"""
