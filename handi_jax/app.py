"""A local web page for generation: upload a photo, type an action, watch the hands do it.

    python -m handi_jax.app --config=configs/stage2.py [--config.model.pretrained=DIR ...] [--port=7860]
        [--host=127.0.0.1] [--workdir=runs/app]
    make app

The page is a thin layer over `App.handle` (plain Python, tested without a browser): it writes the request's
image and mask to <workdir>/app/inputs/<request id>/, sets config.generate.image / .prompt / .mask as
--mode=generate would be given them, and runs the same pipeline.Generator into <workdir>/app/<request id>/, so
that folder holds exactly the files generate writes (video.mp4, video.gif, mask.png, flow.png, done.json and,
when stage 1 ran, mask_video.mp4); the page offers it as a zip. The page's seed is config.seed, so the same
inputs and seed give the same files as --mode=generate. The models load once (random ones again for a new seed,
which initialises them there too); each size compiles on its first request and is reused; requests queue and
run one at a time. A request is one sample, a batch of one: it runs on the first device (on a host with several,
--mode=generate is the way to use them all: it splits its batches over every device).

Motion area: "predicted by stage 1" (no user mask: stage 1 and the clean-up run), "drawn on the image" (the
brush layers of the image editor), "uploaded PNG" (same size as the image; non-zero = motion), or "prior"
(config.generate.prior_mask, or all ones: the whole frame may move). Examples are config.generate's own inputs
when it names any (image or prompts_file), else a few procedural demo images (handi_jax.data.demo_clips).
"""

import contextvars
import copy
import dataclasses
import itertools
import os
import pathlib
import time
import zipfile

import numpy as np
from absl import logging

from handi_jax import fileio, pipeline, prompts
from handi_jax.convert import hub
from handi_jax.data import demo_clips
from handi_jax.media import files as media_files
from handi_jax.media import hand_masks as masks_lib

STAGE1, DRAWN, UPLOADED, PRIOR = "predicted by stage 1", "drawn on the image", "uploaded PNG", "prior"
MASK_SOURCES = (STAGE1, DRAWN, UPLOADED, PRIOR)
# Size presets: the area the image is resized to (aspect kept, sides multiples of 8), as config.sampling.target_area.
SIZES = {"64 x 64 px area (quick on CPU)": 64 * 64, "128 x 128 px area": 128 * 128,
         "256 x 256 px area (the paper's training size)": 256 * 256, "512 x 512 px area (the release)": 512 * 512}
TRAINING_SIZE = "the area the UNet was trained at"  # config.sampling.target_area 0: pipeline.Generator.model_size
NUM_DEMO_EXAMPLES = 3
# The mask and flow images are at the model size (88 x 48 px for a 448 x 256 photo at 64 x 64): show them large.
CSS = "#mask_overlay img, #flow img {width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated}"


class AppError(ValueError):
  """A bad request, said in one sentence the page shows as it is."""


@dataclasses.dataclass(frozen=True)
class Request:
  """What the page sends; the numbers become config.seed and config.sampling fields, `size` a key of App.sizes."""
  image: np.ndarray | str | os.PathLike | None   # (H, W, 3 or 4) uint8, or an image file
  prompt: str
  mask_source: str                                # one of MASK_SOURCES
  motion_strength: float
  steps: int
  guidance_scale: float
  seed: int
  size: str
  drawn: np.ndarray | None = None                 # (H, W) bool brush strokes (mask_source DRAWN)
  mask_file: str | os.PathLike | None = None      # a mask image file (mask_source UPLOADED)


@dataclasses.dataclass(frozen=True)
class Response:
  request_id: str
  folder: pathlib.Path         # exactly the files --mode=generate writes
  archive: pathlib.Path        # the folder as a zip, for the download
  mask_overlay: pathlib.Path   # the motion-area mask over the image, at the model size
  result: pipeline.Result
  summary: str


def weight_sources(config) -> dict[str, str]:
  """Where each model's weights come from ("" = randomly initialised), by pipeline.load_stage_unet's rule."""
  pretrained = config.model.pretrained
  release_unet = pathlib.Path(hub.pretrained_pipeline(config)) / "unet" if pretrained else None
  return {"VAE and text encoder": pretrained, "stage-1 UNet": config.generate.stage1_pretrained,
          "stage-2 UNet": config.generate.stage2_pretrained or (
              str(release_unet) if release_unet is not None and release_unet.is_dir() else "")}


def random_components(config) -> list[str]:
  """The models the config leaves randomly initialised."""
  return [name for name, source in weight_sources(config).items() if not source]


def mask_overlay(context: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """(H, W, 3) uint8 image with the motion area tinted red and the rest dimmed."""
  red = np.array([255, 40, 40], np.float32)
  shown = np.where(mask[..., None], 0.5 * context + 0.5 * red, 0.6 * context)
  return np.round(shown).astype(np.uint8)


class App:
  """The models of one config, loaded once, and the request handler the page calls."""

  def __init__(self, config, workdir: str | os.PathLike):
    self.config = config
    self.workdir = pathlib.Path(workdir)
    self.root = self.workdir / "app"
    self.random = random_components(config)
    sampling = config.sampling
    if sampling.height > 0 and sampling.width > 0:   # a fixed size: area 0 keeps it
      own_size, area = f"the config's {sampling.height} x {sampling.width} px", 0
    elif not sampling.target_area:   # area 0 keeps the config's 0: the training area
      own_size, area = TRAINING_SIZE, 0
    else:
      area = int(sampling.target_area)
      own_size = next((name for name, a in SIZES.items() if a == area), f"the config's {area} px area")
    self.sizes = {**SIZES, own_size: area}
    # Random models show the machinery only: the smallest size answers soonest.
    self.default_size = next(iter(SIZES)) if self.random else own_size
    self.default_mask_source = STAGE1 if config.generate.stage1_pretrained else DRAWN
    self.generator = pipeline.Generator.from_config(config, workdir)
    self._ids = itertools.count(1)
    self._compiled = set()

  def request_config(self, request: Request):
    """The sampling settings --mode=generate would run this request with (its inputs come as a Sample)."""
    config = copy.deepcopy(self.config)
    config.seed = int(request.seed)
    sampling = config.sampling
    sampling.num_inference_steps = int(request.steps)
    sampling.guidance_scale = float(request.guidance_scale)
    sampling.motion_strength = float(request.motion_strength)
    area = self.sizes[request.size]
    sampling.target_area = area or sampling.target_area
    if area:
      sampling.height = sampling.width = 0
    return config

  def handle(self, request: Request, progress=None) -> Response:
    """Run one request into <workdir>/app/<request id>/; AppError for a bad one. `progress(phase, done, total)`
    as in pipeline.Generator.run."""
    request_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{next(self._ids):04d}"
    start = time.time()
    logging.info("request %s: start (%r, mask %s, %d steps, seed %d)", request_id, request.prompt,
                 request.mask_source, request.steps, request.seed)
    try:
      sample = self._write_inputs(request, self.root / "inputs" / request_id)
      config = self.request_config(request)
      size = self.generator.with_config(config).model_size(media_files.load_image(sample.image).size)
    except (FileNotFoundError, ValueError) as e:   # AppError, or an input generate itself refuses
      logging.info("request %s: refused (%s)", request_id, e)
      raise (e if isinstance(e, AppError) else AppError(str(e).split("\n")[0])) from e
    compiled = (size, int(request.steps))
    first_at_size = compiled not in self._compiled

    def report(phase, done, total):   # always given, so that every request runs the same compiled loop
      if first_at_size and done == 0 and phase.startswith("stage"):
        phase += " (compiling: the first request at this size and number of steps)"
      if progress is not None:
        progress(phase, done, total)

    if self.random and config.seed != self.generator.config.seed:
      # --mode=generate initialises random models from config.seed too: same seed, same files. The compiled
      # loops stay (one structure, one compilation).
      self.generator = pipeline.Generator.from_config(config, self.workdir)
    out = self.root / request_id
    result = self.generator.with_config(config).run(sample, out, "generate", report)
    self._compiled.add(compiled)
    page = self.root / "page" / request_id
    overlay = page / "mask_overlay.png"
    media_files.write_png(overlay, mask_overlay(result.context, result.mask))
    archive = page / f"handi-{request_id}.zip"
    with fileio.atomic_path(archive) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zipped:
      for path in sorted(out.iterdir()):
        zipped.write(path, f"{request_id}/{path.name}")
    seconds = time.time() - start
    record = result.record
    summary = (f"Done in {seconds:.1f} s{' (including compilation)' if first_at_size else ''}: "
               f"{record['width']} x {record['height']} px, {len(result.frames)} frames, motion area "
               f"{request.mask_source} ({100 * record['mask_fraction']:.1f}% of the frame), {record['steps']} steps, "
               f"guidance {record['guidance_scale']:g}, seed {request.seed}. Files: {out}")
    logging.info("request %s: done in %.1f s", request_id, seconds)
    return Response(request_id, out, archive, overlay, result, summary)

  def _write_inputs(self, request: Request, folder: pathlib.Path) -> prompts.Sample:
    """The request's image (and mask) as PNG files, kept with the outputs, and the sample that reads them (as
    --mode=generate would with --image, --prompt, --mask); AppError for a bad input."""
    if request.image is None:
      raise AppError("No image: upload a photo or pick one of the examples.")
    if not request.prompt or not request.prompt.strip():
      raise AppError('The action text is empty: type what the hands should do, e.g. "slice the carrot".')
    if request.mask_source not in MASK_SOURCES:
      raise AppError(f"Unknown motion area {request.mask_source!r}: choose one of {', '.join(MASK_SOURCES)}.")
    if request.size not in self.sizes:
      raise AppError(f"Unknown size {request.size!r}: choose one of {', '.join(self.sizes)}.")
    if int(request.steps) < 1:
      raise AppError(f"Steps must be at least 1, got {request.steps}.")
    if isinstance(request.image, np.ndarray):
      image = np.asarray(request.image, np.uint8)[..., :3]
    else:
      try:
        image = np.asarray(media_files.load_image(request.image))
      except ValueError as e:
        raise AppError("The image is not an image file that can be read: upload a PNG or JPEG photo.") from e
    mask = self._mask(request, image.shape[:2])
    media_files.write_png(folder / "image.png", image)
    if isinstance(mask, np.ndarray):
      media_files.write_png(folder / "mask.png", mask.astype(np.uint8) * 255)
      mask = folder / "mask.png"
    return prompts.Sample(0, "image", folder / "image.png", request.prompt, pathlib.Path(mask) if mask else None)

  def _mask(self, request: Request, shape: tuple[int, int]) -> np.ndarray | str | None:
    """The user's (H, W) bool mask, the prior mask's file, or None (stage 1 predicts it)."""
    if request.mask_source == STAGE1:
      return None
    if request.mask_source == PRIOR:
      return self.config.generate.prior_mask or np.ones(shape, bool)
    if request.mask_source == DRAWN:
      if request.drawn is None or not np.any(request.drawn):
        raise AppError("Nothing is drawn: paint the motion area on the image with the brush, or choose another "
                       "motion area.")
      mask = np.asarray(request.drawn, bool)
      if mask.shape != shape:
        raise AppError(f"The drawn mask is {mask.shape[1]} x {mask.shape[0]} px but the image is {shape[1]} x "
                       f"{shape[0]} px: draw it on the image.")
    else:
      if request.mask_file is None:
        raise AppError("No mask file: upload a PNG of the motion area (white = moves), or choose another motion "
                       "area.")
      try:
        media_files.load_image(request.mask_file)
      except ValueError as e:
        raise AppError("The mask is not an image file that can be read: upload a PNG (white = moves).") from e
      try:  # the rule --mode=generate applies: the image's shape at another size is resized, another shape refused
        mask = media_files.load_mask(request.mask_file, shape[0], shape[1], image_size=(shape[1], shape[0])) > 0
      except ValueError as e:
        raise AppError(f"The mask cannot be used: {e}.") from e
    return mask

  def examples(self) -> list[tuple[str, str, str | None]]:
    """(image, prompt, mask or None) rows for the page: config.generate's inputs, else demo images."""
    generate_fields = self.config.generate
    if generate_fields.image or generate_fields.prompts_file:
      return [(str(s.image), s.prompt, str(s.mask) if s.mask else None)
              for s in prompts.samples_from_config(self.config)]
    demo = copy.deepcopy(self.config)
    demo.data.height, demo.data.width = 256, 448
    rows = []
    for index in range(NUM_DEMO_EXAMPLES):
      clip = demo_clips.synthesize_clip(index, demo)
      _, union = masks_lib.clip_masks(clip["keypoints"], clip["presence"], 256, 448, demo.data.build.mask_rule)
      image, mask = self.root / "examples" / f"demo_{index}.png", self.root / "examples" / f"demo_{index}_mask.png"
      media_files.write_png(image, clip["frames"][0])
      media_files.write_png(mask, union)
      rows.append((str(image), clip["caption"], str(mask)))
    return rows


def _page(app: App):
  """The gradio Blocks: widgets wired to App.handle."""
  os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")   # a local page calls no one
  import gradio as gr

  def generate_video(editor, prompt, mask_source, mask_file, motion, steps, guidance, seed, size,
          progress=gr.Progress()):  # noqa: B008 - gradio passes its progress tracker through this default
    editor = editor or {}
    layers = [layer for layer in editor.get("layers") or [] if layer is not None]
    drawn = np.any([layer[..., 3] > 0 for layer in layers], axis=0) if layers else None
    request = Request(editor.get("background"), prompt, mask_source, motion, int(steps), guidance, int(seed), size,
                      drawn=drawn, mask_file=mask_file)
    # gradio finds the request's progress bar through context variables, which the sampling loop's callback
    # thread lacks: every update runs in a copy of this thread's context.
    context = contextvars.copy_context()

    def show(phase, done, total):
      context.copy().run(progress, (done, total) if phase.startswith("stage") else done / total, desc=phase)

    try:
      response = app.handle(request, show)
    except AppError as e:
      raise gr.Error(str(e), duration=None, print_exception=False) from e
    return (str(response.folder / "video.mp4"), str(response.mask_overlay), str(response.folder / "flow.png"),
            str(response.archive), response.summary)

  weights = "Weights: " + "; ".join(f"{name} `{source}`" if source else f"{name} random"
                                    for name, source in weight_sources(app.config).items()) + "."
  if app.random:
    weights += (f" **Random weights** ({', '.join(app.random)}) show the machinery, not real hands: start the app "
                "with `--config.model.pretrained=DIR` and `--config.generate.stage1_pretrained=...` / "
                "`stage2_pretrained=...` for real results.")
  theme = gr.themes.Default(font=("ui-sans-serif", "system-ui", "sans-serif"), font_mono=("ui-monospace", "monospace"))
  with gr.Blocks(title="HANDI: hands doing an action, from one image") as page:
    gr.Markdown("## HANDI: hands doing an action, from one image\nUpload an egocentric photo (or pick an example), "
                "type the action, choose where the hands may move, and press **Generate**. " + weights)
    with gr.Row():
      with gr.Column():
        editor = gr.ImageEditor(label="Image (the brush paints the motion area)",
                                type="numpy", elem_id="image", transforms=(), layers=False,
                                brush=gr.Brush(colors=["#ff3030"], color_mode="fixed", default_size=24),
                                sources=("upload", "clipboard"))
        prompt = gr.Textbox(label="Action", placeholder="e.g. slice the carrot", elem_id="prompt")
        mask_source = gr.Radio(list(MASK_SOURCES), value=app.default_mask_source, label="Motion area",
                               elem_id="mask_source")
        mask_file = gr.File(label="Mask PNG (white = moves; the image's size)",
                            file_types=["image"], elem_id="mask_file")
        with gr.Accordion("Settings", open=False):
          motion = gr.Slider(0.0, 20.0, value=float(app.config.sampling.motion_strength), step=0.5,
                             label="Motion strength")
          steps = gr.Slider(1, 100, value=int(app.config.sampling.num_inference_steps), step=1, label="Steps")
          guidance = gr.Slider(1.0, 20.0, value=float(app.config.sampling.guidance_scale), step=0.5,
                               label="Guidance scale")
          seed = gr.Number(value=int(app.config.seed), precision=0, label="Seed")
          size = gr.Dropdown(list(app.sizes), value=app.default_size, label="Size")
        button = gr.Button("Generate", variant="primary", elem_id="generate")
      with gr.Column():
        video = gr.Video(label="Video", autoplay=True, loop=True, elem_id="video")
        summary = gr.Markdown(elem_id="summary")
        with gr.Row():
          overlay = gr.Image(label="Motion-area mask", height=200, elem_id="mask_overlay")
          flow = gr.Image(label="Motion-flow map", height=200, elem_id="flow")
        download = gr.File(label="The files --mode=generate writes (zip)", elem_id="download")
    examples = app.examples()
    gr.Examples([[image, text, UPLOADED if mask else STAGE1, mask] for image, text, mask in examples],
                [editor, prompt, mask_source, mask_file], label="Examples")
    button.click(generate_video, [editor, prompt, mask_source, mask_file, motion, steps, guidance, seed, size],
                 [video, overlay, flow, download, summary])
  page.queue(default_concurrency_limit=1)
  return page, theme


def launch(app: App, host: str, port: int, block: bool = True):
  """Serve the page; returns the launched gradio Blocks (`.local_url`, `.close()`). With block=False it returns
  at once, the server running in a thread."""
  page, theme = _page(app)
  page.launch(server_name=host, server_port=port, prevent_thread_lock=not block, quiet=True, theme=theme,
              allowed_paths=[str(app.root)], css=CSS)
  return page


def _main():
  """`python -m handi_jax.app`: serve the page until stopped."""
  from handi_jax import command_line

  def serve(config, workdir, port, host):
    app = App(config, workdir)
    print(f"starting the page at http://{host}:{port}/")  # the console shows no INFO lines
    launch(app, host, port)

  command_line.run(
      "app", (), "runs/app", "Outputs go to <workdir>/app/<request id>/.", serve,
      options=(command_line.Option("port", 7860, "Port to serve the page on."),
               command_line.Option("host", "127.0.0.1", "Address to listen on (0.0.0.0 serves other machines too).")))


if __name__ == "__main__":
  _main()
