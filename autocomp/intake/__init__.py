"""Intake: models and datasets named by spec strings."""
