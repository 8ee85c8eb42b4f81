"""The SDXL trainers and their samplers. LoRA with pivotal tuning (and the negative LoRA): params,
trainer, checkpoint. The full fine-tune with flow matching (bigASP v2.5, DDP/FSDP under torchrun):
full_params, prompts (built on the fly), full, full_checkpoint. Shared by both: data (latent
rows, bucket batches, a rank's slice), text (75-token chunks, the prompt cache), loop (a skipped
step, a log point), and sampler
(SDXLSampler loads a LoRA run's checkpoint, FullSampler a full run's; sample_lora, candidates
and the train flow's sweeps call them).

May import: tasks.core, tasks.training, the dataset stages' entries (their params and tables)
and models. Never the trainer commands.
"""
