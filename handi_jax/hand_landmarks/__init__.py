"""MediaPipe's hand landmark network run in JAX: the TFLite graph executor, hand crops, the landmark model."""
