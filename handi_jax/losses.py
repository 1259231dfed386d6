"""The stage losses: pure functions that the jitted train step composes.

- `noise_loss`: L_noise (Eq. 3), the mean squared error of the model output against its target (the noise
  for epsilon prediction, as in the paper; the velocity or the clean latents for the other prediction types).
- `soft_miou_loss`: L_mIoU (Eq. 6) on decoded mask frames: 1 - mean over frames of a soft IoU.
- `hand_errors` + `hand_refinement_from_sums`: L_HR (Eq. 2) on decoded frames: MediaPipe's landmark network
  (in JAX) on hand crops placed by the ground-truth keypoints, mean squared error to those keypoints.
- `stage1_loss` = L_noise + alpha * L_mIoU (Eq. 5); `stage2_loss` = L_noise + eta * L_HR (Eq. 7).

Decoding dominates the step's cost, so each stage loss may score a random subset of k of the L generated frames
per clip and step (`config.loss.miou_frames`, `config.loss.hand_frames`; `random_frames`): drawn uniformly
without replacement, with sums scaled by L / k and counts taken from all L frames' ground truth, so the
estimate's expectation is the loss over all L frames. k = 0 (or k >= L) scores every frame: the exact loss.

Both pixel-space losses decode the predicted clean latent x0 (Eq. 4) inside the graph, so unlike the
original release (whose hand loss ran MediaPipe on uint8 copies and sent no gradient) they train the UNet.
Frames go through decode + loss `config.model.frame_chunk` at a time under `lax.map`; with `remat_decoder`
/ `remat_landmarks` the decoder's / landmark network's activations are recomputed in the backward pass,
so the pixel losses hold one chunk of activations at a time.

How an undetectable generated hand is treated: the paper zero-fills joints its detector misses. Here the
landmark network is not gated by detection: it regresses the 21 joints inside the ROI the ground-truth hand
defines, whether or not the generated frame shows a recognisable hand there, so a bad hand still gets a
gradient towards the right pose (zero-filling would give it none). Only joints missing in the ground truth
(presence 0), and hands whose ROI joints are not all present, are left out. The optional presence term
(`hand_presence_weight`) adds -log(hand-presence score) of those crops: it rewards frames in which the
landmark network recognises a hand where the real video has one.
"""

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

from handi_jax import chunking
from handi_jax.hand_landmarks import crops as hand_crops
from handi_jax.hand_landmarks import network as hl

DecodeFn = Callable[[jax.Array], jax.Array]  # scaled latents (B, F, h, w, 4) -> pixels (B, F, H, W, 3) in [-1, 1]


def _real(x: jax.Array) -> jax.Array:
  """At least float32: bfloat16 activations are upcast, float64 (finite-difference tests) is kept."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def noise_loss(prediction: jax.Array, target: jax.Array) -> jax.Array:
  """L_noise: mean over all elements of (prediction - target)^2, in (at least) float32."""
  if prediction.shape != target.shape:
    raise ValueError(f"noise_loss: model output {prediction.shape} and target {target.shape} differ in shape")
  return jnp.mean(jnp.square(_real(prediction) - _real(target)))


def pixels_to_mask(pixels: jax.Array) -> jax.Array:
  """Decoded mask frames (..., H, W, 3) in [-1, 1] -> soft masks (..., H, W) in [0, 1] (mean over RGB)."""
  return jnp.clip((jnp.mean(_real(pixels), axis=-1) + 1.0) / 2.0, 0.0, 1.0)


def soft_iou(masks: jax.Array, targets: jax.Array, smooth: float = 1.0) -> jax.Array:
  """Per-frame soft IoU of (..., H, W) masks in [0, 1]: (sum(m t) + s) / (sum(m + t - m t) + s).

  `smooth` (in pixels) makes two empty masks agree (IoU 1) instead of dividing zero by zero; frames
  without hands have empty targets.
  """
  masks, targets = _real(masks), _real(targets)
  intersection = jnp.sum(masks * targets, axis=(-2, -1))
  union = jnp.sum(masks + targets - masks * targets, axis=(-2, -1))
  return (intersection + smooth) / (union + smooth)


def soft_miou_loss(masks: jax.Array, targets: jax.Array, smooth: float = 1.0) -> jax.Array:
  """L_mIoU (Eq. 6): 1 - mean over clips and frames of the soft IoU. masks, targets: (B, L, H, W)."""
  if masks.shape != targets.shape:
    raise ValueError(f"soft_miou_loss: masks {masks.shape} and target masks {targets.shape} differ in shape")
  return 1.0 - jnp.mean(soft_iou(masks, targets, smooth))


def random_frames(key: jax.Array, count: int, *videos: jax.Array) -> list[jax.Array]:
  """The same `count` frames (axis 1) of every video, drawn per clip uniformly without replacement.

  videos: (B, L, ...) arrays sharing B and L. Frames are gathered, so only they are decoded downstream, and a
  gradient reaches only them. count 0 or >= L: the videos unchanged (every frame, no key needed).
  """
  clips, frames = videos[0].shape[:2]
  if count < 0:
    raise ValueError(f"frame subset size (config.loss.miou_frames / hand_frames) must be >= 0 (0 = all frames), "
                     f"got {count}")
  if count == 0 or count >= frames:
    return list(videos)
  if key is None:
    raise ValueError(f"scoring {count} of {frames} frames needs a random key; pass frames_key, or set the subset "
                     "size (config.loss.miou_frames / hand_frames) to 0 for all frames")
  order = jnp.broadcast_to(jnp.arange(frames), (clips, frames))
  chosen = jax.random.permutation(key, order, axis=1, independent=True)[:, :count]
  return [jnp.take_along_axis(v, chosen.reshape(*chosen.shape, *(1,) * (v.ndim - 2)), axis=1) for v in videos]


def hand_slot_weights(presence: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(joint weights (..., 2, 21), hand weights (..., 2)) from ground-truth presence (..., 2, 21).

  A hand counts when every joint its ROI is built from is present; then its present joints count.
  """
  present = presence.astype(jnp.float32) > 0.5
  hand = jnp.all(present[..., hand_crops.ROI_JOINTS], axis=-1)
  return (present & hand[..., None]).astype(jnp.float32), hand.astype(jnp.float32)


def hand_errors(frames: jax.Array, keypoints: jax.Array, presence: jax.Array, landmark_params,
                remat_landmarks: bool = False) -> dict[str, jax.Array]:
  """Per-frame sums for L_HR over decoded frames (B, L, H, W, 3) in [-1, 1] with keypoints (B, L, 2, 21, 2).

  Returns (B, L) sums (not means) so that chunks of frames can be added up: squared error (x and y,
  normalised frame coordinates) over counted joints, -log(presence) and presence over counted hands.
  """
  batch, frames_n, height, width = frames.shape[:4]
  if keypoints.shape != (batch, frames_n, 2, 21, 2) or presence.shape != (batch, frames_n, 2, 21):
    raise ValueError(f"hand loss: for frames {frames.shape} expected keypoints {(batch, frames_n, 2, 21, 2)} and "
                     f"presence {(batch, frames_n, 2, 21)}, got {keypoints.shape} and {presence.shape}")
  joint_w, hand_w = hand_slot_weights(presence)
  # The ROI depends only on the ground truth; stop_gradient also keeps atan2's 0/0 away from absent hands.
  roi = hand_crops.landmarks_to_roi(jax.lax.stop_gradient(keypoints.reshape(-1, 2, 21, 2)), (height, width))
  # MediaPipe sees uint8 frames: [-1, 1] -> [0, 1], clipped like the uint8 conversion would.
  images = jnp.clip((_real(frames.reshape(-1, height, width, 3)) + 1.0) / 2.0, *hl.INPUT_RANGE)

  def predict(images, roi):
    crops = hand_crops.crop_hands(images, roi)
    out = hl.hand_landmarks(landmark_params, crops.reshape(-1, *crops.shape[2:]))
    landmarks = out["landmarks"].reshape(*roi.x_center.shape, hl.NUM_LANDMARKS, 3)
    return hand_crops.crop_to_frame(landmarks, roi)[..., :2], out["presence"].reshape(roi.x_center.shape)

  if remat_landmarks:
    predict = jax.checkpoint(predict)
  predicted, hand_presence = predict(images, roi)
  predicted = predicted.reshape(keypoints.shape)
  hand_presence = hand_presence.reshape(hand_w.shape)
  squared = jnp.sum(jnp.square(predicted - _real(keypoints)), axis=-1)  # per joint
  per_frame = lambda x: jnp.sum(x, axis=tuple(range(2, x.ndim)))
  return dict(
      squared_error=per_frame(squared * joint_w),
      presence_nll=per_frame(-jnp.log(jnp.clip(hand_presence, 1e-6, 1.0)) * hand_w),
      presence=per_frame(hand_presence * hand_w))


def hand_refinement_from_sums(sums: Mapping[str, jax.Array], presence: jax.Array, presence_weight: float
                              ) -> tuple[jax.Array, dict]:
  """L_HR from `hand_errors` sums: mean squared joint error (+ presence_weight * mean -log presence).

  sums: (B, k) per-frame sums of k scored frames out of the L frames whose ground-truth presence (B, L, 2, 21)
  is given. Eq. 2 averages the squared joint distance over frames and joints; joints missing in the ground truth
  do not count (mean over counted joints). The counts depend only on the ground truth, so they come from all L
  frames, and the scored frames' sums are scaled by L / k: for frames drawn uniformly (`random_frames`) the
  expectation is the loss over all L frames. With no counted joint at all the loss is 0.
  """
  joint_w, hand_w = hand_slot_weights(presence)
  joints, hands = jnp.maximum(jnp.sum(joint_w), 1.0), jnp.maximum(jnp.sum(hand_w), 1.0)
  scale = presence.shape[1] / sums["squared_error"].shape[1]
  total = {name: scale * jnp.sum(value) for name, value in sums.items()}
  hand_mse = total["squared_error"] / joints
  presence_nll = total["presence_nll"] / hands
  loss = hand_mse + presence_weight * presence_nll if presence_weight else hand_mse
  terms = dict(hand_mse=hand_mse, hand_presence_nll=presence_nll, hand_presence=total["presence"] / hands,
               hands_counted=jnp.sum(hand_w))
  return loss, terms


def _decoder(decode_fn: DecodeFn, loss_config) -> DecodeFn:
  dtype = jnp.dtype(loss_config.decode_dtype)

  def decode(latents):
    return _real(decode_fn(latents.astype(dtype)))

  return jax.checkpoint(decode) if loss_config.remat_decoder else decode


def stage1_loss(prediction: jax.Array, target: jax.Array, x0_pred_latents: jax.Array, batch: Mapping[str, jax.Array],
                decode_fn: DecodeFn, loss_config, frame_chunk: int | None = None, frames_key: jax.Array | None = None
                ) -> tuple[jax.Array, dict]:
  """L_stage1 = L_noise + alpha * L_mIoU (Eq. 5).

  prediction, target: (B, F, h, w, 4) model output and its regression target (config.diffusion.prediction_type);
  x0_pred_latents: (B, F, h, w, 4) scaled clean latents formed from the output (Eq. 4; frame 0 is the context).
  batch["target_masks"]: (B, F - 1, H, W) in {0, 1}, the masks of frames 1..F-1.
  decode_fn: scaled latents (B, f, h, w, 4) -> pixels (B, f, H, W, 3) in [-1, 1], computing in
  loss_config.decode_dtype (the latents it gets are cast to it). loss_config: config.loss. frame_chunk
  (config.model.frame_chunk): frames decoded and scored per step of a `lax.map` (None: all at once).
  frames_key: draws the loss_config.miou_frames frames scored per clip (`random_frames`; the mean IoU over them
  estimates the mean over all generated frames without bias).
  Returns (loss, terms) with terms noise, miou_loss, miou.
  """
  l_noise = noise_loss(prediction, target)
  terms = dict(noise=l_noise)
  if not loss_config.alpha_miou:
    return l_noise, terms
  targets = batch["target_masks"]
  latents = x0_pred_latents[:, 1:]
  if targets.shape[:2] != latents.shape[:2]:
    raise ValueError(f"stage1_loss: target_masks {targets.shape} must hold the F - 1 = {latents.shape[1]} "
                     f"generated frames of each of the {latents.shape[0]} clips")
  latents, targets = random_frames(frames_key, loss_config.miou_frames, latents, targets)
  decode = _decoder(decode_fn, loss_config)
  masks = chunking.map_frame_chunks(lambda z: pixels_to_mask(decode(z)), frame_chunk, latents)
  l_miou = soft_miou_loss(masks, targets)
  terms.update(miou_loss=l_miou, miou=1.0 - l_miou)
  return l_noise + loss_config.alpha_miou * l_miou, terms


def stage2_loss(prediction: jax.Array, target: jax.Array, x0_pred_latents: jax.Array, batch: Mapping[str, jax.Array],
                decode_fn: DecodeFn, landmark_params, loss_config, frame_chunk: int | None = None,
                frames_key: jax.Array | None = None) -> tuple[jax.Array, dict]:
  """L_stage2 = L_noise + eta * L_HR (Eq. 7).

  prediction, target, x0_pred_latents: (B, F, h, w, 4) as in `stage1_loss`. batch["keypoints"] (B, F, 2, 21, 2)
  in [0, 1] of the training frames (slot 0 left, 1 right) and batch["presence"] (B, F, 2, 21).
  decode_fn and frame_chunk as in `stage1_loss`; landmark_params from `hands.landmarks.load_hand_landmark_params()`.
  frames_key draws the loss_config.hand_frames generated frames decoded and scored per clip (`random_frames`;
  `hand_refinement_from_sums` makes the estimate unbiased).
  Returns (loss, terms) with terms noise, hand_loss, hand_mse, hand_presence_nll, hand_presence, hands_counted.
  """
  l_noise = noise_loss(prediction, target)
  terms = dict(noise=l_noise)
  if not loss_config.eta_hand:
    return l_noise, terms
  # Frame 0 is the context image, not generated.
  generated_presence = batch["presence"][:, 1:]
  chosen = random_frames(frames_key, loss_config.hand_frames, x0_pred_latents[:, 1:], batch["keypoints"][:, 1:],
                         generated_presence)
  decode = _decoder(decode_fn, loss_config)

  def chunk_errors(latents, keypoints, presence):
    return hand_errors(decode(latents), keypoints, presence, landmark_params, loss_config.remat_landmarks)

  sums = chunking.map_frame_chunks(chunk_errors, frame_chunk, *chosen)
  l_hr, hand_terms = hand_refinement_from_sums(sums, generated_presence, loss_config.hand_presence_weight)
  terms.update(hand_terms, hand_loss=l_hr)
  return l_noise + loss_config.eta_hand * l_hr, terms
