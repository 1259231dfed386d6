"""The JAX hand landmark network and hand crops against MediaPipe itself.

- the network against TensorFlow Lite's interpreter running the same .tflite on the same 224 x 224 inputs
  (crops of real hands from ../shared/data and random images);
- the ROI rule against the ROI MediaPipe's own graph computes from its landmarks (hand_rects_from_landmarks);
- the crop against OpenCV's warpPerspective with ImageToTensorCalculator's corner mapping;
- the whole JAX path (ROI from MediaPipe's landmarks -> crop -> network -> frame coordinates) against
  `mp.solutions.hands.Hands`, whose tracking mode runs its network on exactly that ROI;
- the crop's gradient with respect to the pixels (its adjoint); the network's is checked in test_losses.py.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from handi_jax.hand_landmarks import crops as hand_crops
from handi_jax.hand_landmarks import network as hl
from tests.helpers import keypoints_of, mediapipe_hands

GIF_FRAMES = {"31": (0, 13), "816": (0, 10)}  # clip -> frames used (frame 13 of clip 31 has two hands)
NUM_RANDOM = 3
BATCH = 16  # every network call here uses this batch: one compilation


def _real_images(shared_data):
  images = [(f"ek_frames/{k}.png", np.asarray(Image.open(shared_data / "ek_frames" / f"{k}.png").convert("RGB")))
            for k in range(1, 6)]
  for clip, frames in GIF_FRAMES.items():
    gif = Image.open(shared_data / "clips" / f"{clip}.gif")
    for index in frames:
      gif.seek(index)
      images.append((f"clips/{clip}.gif#{index}", np.asarray(gif.convert("RGB"))))
  return images


@pytest.fixture(scope="module")
def params():
  return hl.load_hand_landmark_params()


@pytest.fixture(scope="module")
def landmarks_fn():
  return jax.jit(hl.hand_landmarks)


@pytest.fixture(scope="module")
def real_hands(shared_data):
  """Every hand MediaPipe finds in the real frames: the frame, its landmarks, and its tracked landmarks.

  MediaPipe in video mode, given the same frame twice, runs its landmark network the second time on the ROI
  computed from the first answer: the second answer is what the JAX path must reproduce.
  """
  hands = []
  for name, image in _real_images(shared_data):
    with mediapipe_hands(static_image_mode=False) as tracker:
      first = tracker.process(image)
      second = tracker.process(image)
    for hand in first.multi_hand_landmarks or []:
      keypoints = keypoints_of(hand)
      tracked = [keypoints_of(h) for h in second.multi_hand_landmarks or []]
      match = min(tracked, key=lambda t: np.abs(t - keypoints).sum()) if tracked else None
      hands.append(dict(name=name, image=image, keypoints=keypoints, tracked=match))
  assert len(hands) >= 10, f"MediaPipe found only {len(hands)} hands in the real frames"
  return hands


def _crop(image: np.ndarray, keypoints: np.ndarray):
  roi = hand_crops.landmarks_to_roi(jnp.asarray(keypoints), image.shape[:2])
  roi_nk = jax.tree.map(lambda a: a[None, None], roi)
  frame = jnp.asarray(image, jnp.float32)[None] / 255.0
  return hand_crops.crop_hands(frame, roi_nk)[0, 0], roi


@pytest.fixture(scope="module")
def crops(real_hands):
  """(BATCH, 224, 224, 3) in [0, 1]: real hand crops, random images, then a constant grey image."""
  real = [np.asarray(_crop(h["image"], h["keypoints"])[0]) for h in real_hands]
  rng = np.random.default_rng(0)
  filler = rng.uniform(0.0, 1.0, (BATCH - len(real), 224, 224, 3)).astype(np.float32)
  filler[-1] = 0.5
  return np.concatenate([np.stack(real), filler])[:BATCH], len(real)


def _tflite_reference(images: np.ndarray):
  import tensorflow as tf

  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation notice
    interpreter = tf.lite.Interpreter(model_path=str(hl.default_model_path()))
  interpreter.allocate_tensors()
  (input_detail,) = interpreter.get_input_details()
  outputs = interpreter.get_output_details()
  results = []
  for image in images:
    interpreter.set_tensor(input_detail["index"], image[None])
    interpreter.invoke()
    results.append([interpreter.get_tensor(o["index"]).copy() for o in outputs])
  return (np.stack([r[0].reshape(21, 3) for r in results]), np.array([r[1].item() for r in results]),
          np.array([r[2].item() for r in results]))


def test_network_matches_tflite_interpreter(params, landmarks_fn, crops):
  images, num_real = crops
  ours = jax.device_get(landmarks_fn(params, jnp.asarray(images)))
  landmarks, presence, handedness = _tflite_reference(images)
  # float32 round-off only: XNNPACK and XLA sum in different orders.
  np.testing.assert_allclose(ours["landmarks"], landmarks, atol=2e-3, rtol=0)
  np.testing.assert_allclose(ours["presence"], presence, atol=1e-5, rtol=0)
  np.testing.assert_allclose(ours["handedness"], handedness, atol=1e-5, rtol=0)
  # The real crops are hands (MediaPipe keeps a hand above 0.5); the grey image is not.
  assert (ours["presence"][:num_real] > hl.PRESENCE_THRESHOLD).all(), ours["presence"][:num_real]
  assert ours["presence"][-1] < hl.PRESENCE_THRESHOLD
  errors = [np.abs(ours[k] - ref).max() for k, ref in
            (("landmarks", landmarks), ("presence", presence), ("handedness", handedness))]
  print("max |JAX - TFLite|: landmarks {:.2e} px, presence {:.2e}, handedness {:.2e}".format(*errors))


def test_roi_matches_mediapipe_graph(shared_data):
  """landmarks_to_roi == the hand_rects_from_landmarks stream of MediaPipe's tracking graph."""
  checked = 0
  for name, image in _real_images(shared_data)[:5]:
    with mediapipe_hands(False, outputs=["multi_hand_landmarks", "hand_rects_from_landmarks"]) as graph:
      result = graph.process(image)
    for hand, rect in zip(result.multi_hand_landmarks or [], result.hand_rects_from_landmarks or [], strict=True):
      roi = hand_crops.landmarks_to_roi(jnp.asarray(keypoints_of(hand)), image.shape[:2])
      expected = [rect.x_center, rect.y_center, rect.width, rect.height, rect.rotation]
      np.testing.assert_allclose([float(v) for v in roi], expected, atol=2e-6, err_msg=name)
      checked += 1
  assert checked >= 7


def test_crop_matches_opencv_warp(real_hands):
  """The crop is ImageToTensorCalculator's warpPerspective (bilinear, replicated border) of the rotated square."""
  import cv2

  hand = real_hands[0]
  image = hand["image"].astype(np.float32) / 255.0
  ours, roi = _crop(hand["image"], hand["keypoints"])
  height, width = image.shape[:2]
  box = ((float(roi.x_center) * width, float(roi.y_center) * height),
         (float(roi.width) * width, float(roi.height) * height), float(roi.rotation) * 180.0 / np.pi)
  corners = np.array([[0, 224], [0, 0], [224, 0], [224, 224]], np.float32)
  matrix = cv2.getPerspectiveTransform(cv2.boxPoints(box).astype(np.float32), corners)
  expected = cv2.warpPerspective(image, matrix, (224, 224), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
  # OpenCV quantises the bilinear weights to 1/32 pixel; allow that much of a neighbouring-pixel step.
  diff = np.abs(np.asarray(ours) - expected)
  assert diff.mean() < 2e-3 and diff.max() < 0.05, (diff.mean(), diff.max())


def test_jax_path_agrees_withmediapipe_hands(params, landmarks_fn, real_hands, crops):
  """ROI from MediaPipe's landmarks -> JAX crop -> JAX network -> frame coordinates == MediaPipe Hands."""
  images, num_real = crops
  predicted = jax.device_get(landmarks_fn(params, jnp.asarray(images)))["landmarks"][:num_real]
  worst = 0.0
  for hand, landmarks in zip(real_hands, predicted, strict=True):
    if hand["tracked"] is None:
      continue
    height, width = hand["image"].shape[:2]
    roi = hand_crops.landmarks_to_roi(jnp.asarray(hand["keypoints"]), (height, width))
    frame_xy = np.asarray(hand_crops.crop_to_frame(jnp.asarray(landmarks), roi))[:, :2]
    pixels = np.array([width, height])
    error = np.linalg.norm((frame_xy - hand["tracked"]) * pixels, axis=-1)
    box = np.ptp(hand["tracked"] * pixels, axis=0).max()
    worst = max(worst, error.max() / box)
    assert error.max() < 0.02 * box, f"{hand['name']}: {error.max():.2f} px for a {box:.0f} px hand"
  print(f"worst joint error: {100 * worst:.2f} % of the hand's bounding box")


def test_crop_gradient_is_its_adjoint():
  """crop_hands is linear in the pixels: <d/dframe <c, crop>, frame> must equal <c, crop(frame)>."""
  rng = np.random.default_rng(1)
  frames = jnp.asarray(rng.uniform(-1, 1, (2, 40, 56, 3)), jnp.float32)
  keypoints = jnp.asarray(rng.uniform(0.3, 0.7, (2, 2, 21, 2)), jnp.float32)
  roi = hand_crops.landmarks_to_roi(keypoints, (40, 56))
  cotangent = jnp.asarray(rng.normal(size=(2, 2, 32, 32, 3)), jnp.float32)
  pairing = lambda f: jnp.sum(cotangent * hand_crops.crop_hands(f, roi, output_size=32))
  grad = jax.grad(pairing)(frames)
  np.testing.assert_allclose(jnp.sum(grad * frames), pairing(frames), rtol=1e-4)
  assert float(jnp.abs(grad).sum()) > 0


def test_bad_inputs_have_clear_errors(params, tmp_path):
  with pytest.raises(ValueError, match=r"\(N, 224, 224, 3\)"):
    hl.hand_landmarks(params, jnp.zeros((2, 128, 128, 3)))
  with pytest.raises(ValueError, match="keypoints must be"):
    hand_crops.landmarks_to_roi(jnp.zeros((21, 3)), (64, 64))
  with pytest.raises(FileNotFoundError, match="not found"):
    hl.load_hand_landmark_params(tmp_path / "missing.tflite")
  (tmp_path / "bad.tflite").write_bytes(b"\0" * 64)
  with pytest.raises(ValueError, match="not a TFLite flatbuffer"):
    hl.load_hand_landmark_params(tmp_path / "bad.tflite")
