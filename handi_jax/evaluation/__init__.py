"""Evaluation of generated videos: metric math (metrics.py), feature extractors (extractors.py), reports."""
