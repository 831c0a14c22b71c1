"""Datasets, text side information, scenarios and task construction."""
