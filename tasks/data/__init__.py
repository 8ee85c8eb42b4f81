"""The shard format and the training loader that reads it, from a folder or from S3.

May import: tasks.core and models.
"""
