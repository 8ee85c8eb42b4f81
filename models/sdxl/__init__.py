"""SDXL's parts for the SDXL trainer: loading the pipeline's pieces (pipeline), 75-token prompt
chunks (text), pivotal-tuning tokens (ti), the ddpm / flow objectives and the Euler sampler
(objective), LoRA export in diffusers and kohya formats (export).

May import: models.hub and models.sdxl (nothing from tasks or flows).
"""
