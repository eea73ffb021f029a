"""Recall evaluations (issue 8): synthetic associative-recall tasks and their scoring."""
