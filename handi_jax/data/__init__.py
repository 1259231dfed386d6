"""The dataset: its TFRecord schema, a clip's record, the sharded writer (data_prep and the demo data write
through it), split summaries, the procedural demo clips, and the input pipeline that reads it for training."""
