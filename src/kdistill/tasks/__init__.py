"""Tasks: what a batch holds and how a model is scored, one file per kind of data."""
