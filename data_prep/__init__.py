"""Offline data preparation: videos + captions -> TFRecord shards with hand keypoints and motion-area masks.

`python -m data_prep.build --help` for the dataset builder; `data_prep.demo_data` for the procedural demo set.
"""
