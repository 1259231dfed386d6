"""Dataset schema shared by data_prep (writer) and handi_jax.input_pipeline (reader)."""
