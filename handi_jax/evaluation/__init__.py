"""Evaluation of generated videos: the clips and runs (clips.py), scoring per clip and over clips (scoring.py),
metric math (metrics.py), feature extractors and scorers (extractors.py, egovlp.py, blip.py), reports
(report.py), and the evaluator training is given (during_training.py). The command is handi_jax/evaluate.py."""
