"""What both trainers share: atomic checkpoint folders and RNG state, the dvclive log and
its window, the sample grid, and the run's bookkeeping (errors, seeding, moving a run aside).

May import: tasks.core and models.
"""
