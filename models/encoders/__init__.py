"""The dataset stages' models: T5, DINOv3, DWPose (+ its decoding), Gemma 3 and Ollama
captioners, and the tiny DWPose builder. Each loads from a hub id or a local folder through
models.hub and never runs remote code.

May import: models.hub and models.encoders (nothing from tasks or flows).
"""
