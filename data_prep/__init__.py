"""Offline data preparation: videos + captions -> TFRecord shards with hand keypoints and motion-area masks.

`python -m data_prep.build --help` for the dataset builder; `handi_jax.data.demo_clips` for the procedural demo set.
"""
