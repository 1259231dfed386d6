"""The one owner of models and training state: every job gets its models from here.

  common       the dtype rule, the per-component random keys, abstract (shape + sharding) trees, shared graphdefs
  unet         the UNet: built at random, loaded from a diffusers directory, or restored from a training workdir
  frozen       the models a run does not train (VAE, text encoder, hand landmark network, empty-prompt ids) as one
               pytree, FrozenModels, that training, generation, export, evaluation, the app and the compile
               report all receive; loaded, abstract, sharded and placed
  train_state  the train state (trainable and frozen UNet parameters, AdamW), its layout on a mesh, and its orbax
               checkpoints: created, saved, restored onto any mesh
"""
