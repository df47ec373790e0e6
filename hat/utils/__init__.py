"""Helpers shared by the pipelines and the scripts."""
