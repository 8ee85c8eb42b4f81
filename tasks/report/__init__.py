"""What a person looks at after training: the validation suite and its history, the checkpoint
sweep grid, the run's HTML report and its SVG charts.

May import: tasks.core, tasks.data, tasks.training, tasks.nanodit, the dataset stages' entries
and models. Never the trainer commands.
"""
