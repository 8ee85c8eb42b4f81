"""The networks and their objectives (NanoDiT, flow matching, LPIPS), the dataset stages'
encoders (models/encoders) and SDXL's parts (models/sdxl), and how a model is found (hub).

May import: models only (never tasks or flows).
"""
