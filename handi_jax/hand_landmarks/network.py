"""MediaPipe's hand landmark network (hand_landmark_full.tflite, the one `mp.solutions.hands` runs) in JAX.

The weights are read from the .tflite file bundled with mediapipe 0.10.21 into a params pytree
(`load_hand_landmark_params`); `hand_landmarks(params, images)` is a pure, batched, jittable and
differentiable function of the 224 x 224 crops. It is frozen everywhere in handi-jax: the Hand Refinement
Loss differentiates through it with respect to the pixels, never its weights.

Outputs follow MediaPipe's HandLandmarkCpu graph (TensorsToLandmarksCalculator and friends):
- landmarks (N, 21, 3): x, y in crop pixels (0..224), z in the same pixel units, relative to the wrist
  (MediaPipe divides by 224 and by normalize_z = 0.4 for its normalised z; `normalized_landmarks` does that);
- presence (N,): the hand-flag score; MediaPipe keeps a hand when it is > 0.5;
- handedness (N,): probability of MediaPipe's label "Right" (binary classification over handedness.txt
  = [Left, Right]); MediaPipe assumes a mirrored (selfie) image, so on a plain camera image it is swapped.
"""

import os
import pathlib

import jax
import jax.numpy as jnp

from handi_jax.hand_landmarks import tflite_graph

INPUT_SIZE = 224           # the model's square input (ImageToTensorCalculator output_tensor_width/height)
INPUT_RANGE = (0.0, 1.0)   # ImageToTensorCalculator output_tensor_float_range of HandLandmarkCpu
NUM_LANDMARKS = 21
NORMALIZE_Z = 0.4          # TensorsToLandmarksCalculator normalize_z of HandLandmarkCpu
PRESENCE_THRESHOLD = 0.5   # ThresholdingCalculator threshold of HandLandmarkCpu


def default_model_path() -> pathlib.Path:
  """mediapipe/modules/hand_landmark/hand_landmark_full.tflite of the installed mediapipe wheel."""
  import importlib.util

  spec = importlib.util.find_spec("mediapipe")  # located, not imported (importing it loads all of TensorFlow)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError("mediapipe is not installed; install mediapipe==0.10.21 (it bundles "
                            "hand_landmark_full.tflite) or pass the path of a hand_landmark_full.tflite")
  root = pathlib.Path(list(spec.submodule_search_locations)[0])
  return root / "modules" / "hand_landmark" / "hand_landmark_full.tflite"


def load_hand_landmark_params(path: str | os.PathLike | None = None) -> tflite_graph.TFLiteGraph:
  """The landmark network's params pytree (float32) from `path` (default: the bundled full model)."""
  path = pathlib.Path(path) if path is not None else default_model_path()
  if not path.is_file():
    raise FileNotFoundError(f"hand landmark model {path} not found; mediapipe 0.10.21 bundles it "
                            "(later releases do not): pip install mediapipe==0.10.21")
  graph = tflite_graph.load_tflite(path)
  shapes = graph.program.input_shapes
  if shapes != ((1, INPUT_SIZE, INPUT_SIZE, 3),) or len(graph.program.outputs) != 4:
    raise ValueError(f"{path} does not look like MediaPipe's hand landmark model: inputs {shapes}, "
                     f"{len(graph.program.outputs)} outputs (expected one (1, 224, 224, 3) input and 4 outputs)")
  return graph


def hand_landmarks(params: tflite_graph.TFLiteGraph, images: jax.Array) -> dict[str, jax.Array]:
  """Landmarks of the hand in each crop. images: (N, 224, 224, 3) RGB float in [0, 1] (MediaPipe's range).

  Returns dict(landmarks=(N, 21, 3) crop pixels, presence=(N,), handedness=(N,)), all float32.
  The output order of the file is MediaPipe's SplitTensorVectorCalculator order: landmarks, hand flag,
  handedness, world landmarks (unused here).
  """
  if images.ndim != 4 or images.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3):
    raise ValueError(f"hand_landmarks: images must be (N, {INPUT_SIZE}, {INPUT_SIZE}, 3) in [0, 1], got "
                     f"{images.shape}; crop the hands first (handi_jax.hand_landmarks.crops.crop_hands)")
  landmarks, presence, handedness, _ = tflite_graph.run_tflite(params, [images])
  return dict(landmarks=landmarks.reshape(-1, NUM_LANDMARKS, 3), presence=presence.reshape(-1),
              handedness=handedness.reshape(-1))


def normalized_landmarks(landmarks: jax.Array) -> jax.Array:
  """Crop-pixel landmarks -> MediaPipe's normalised crop coordinates (x, y in [0, 1]; z / 224 / 0.4)."""
  return landmarks / jnp.asarray([INPUT_SIZE, INPUT_SIZE, INPUT_SIZE * NORMALIZE_Z], landmarks.dtype)
