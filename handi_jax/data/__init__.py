"""The dataset: its TFRecord schema (shared by data_prep's writer and the reader) and the input pipeline."""
