"""The demo's sample data (`python -m tasks.sample`): particle figures with captions and true
keypoints, real photographs shipped with scikit-image, files that must be refused, rejects,
and the caption corpus the tiny T5 tokenizer is trained on.

May import: tasks.sample and tasks.core (it is a command, beside the stage entries).
"""
