import numpy as np
import torch

from handi_jax import conditioning


def test_latent_mask_equals_torch_bilinear_then_threshold():
  rng = np.random.default_rng(0)
  mask = (rng.random((2, 48, 80, 1)) > 0.6).astype(np.float32)
  soft = conditioning.latent_mask(mask, threshold=None)
  reference = torch.nn.functional.interpolate(torch.from_numpy(mask).permute(0, 3, 1, 2), size=(6, 10),
                                              mode="bilinear", align_corners=False, antialias=False)
  reference = reference.permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(np.asarray(soft), reference, atol=1e-7)
  hard = conditioning.latent_mask(mask)
  np.testing.assert_array_equal(np.asarray(hard), (reference >= 0.5).astype(np.float32))


def test_freeze_background_and_motion_by_hand():
  latents = np.zeros((1, 3, 2, 2, 4), np.float32)
  latents[0, 1] = 1.0
  latents[0, 2] = 3.0
  mask = np.array([[[[1.0], [0.0]], [[0.0], [0.0]]]], np.float32)  # only pixel (0, 0) moves
  frozen = np.asarray(conditioning.freeze_background(latents, mask))
  np.testing.assert_array_equal(frozen[0, :, 0, 0], [[0] * 4, [1] * 4, [3] * 4])
  np.testing.assert_array_equal(frozen[0, :, 1, 1], np.zeros((3, 4)))
  # |diffs| at the moving pixel: 1 then 2; mean over (2 frames x 4 pixels) = 3/8 per channel; 4 channels.
  np.testing.assert_allclose(np.asarray(conditioning.latent_motion(frozen)), [10 * 4 * 3 / 8])
