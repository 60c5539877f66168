"""The applications behind the CLI: a training run, evaluation, comparison and inspection tools, demos, importance reports."""
