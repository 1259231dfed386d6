"""The web app: the request handler without a browser, the served page under two clients, and the page driven
by a real headless Chromium (Debian's chromium + chromium-driver through Selenium; `make browser` installs
them, and the test skips with the reason where they are missing).

One App (tiny models: a one-level UNet, an 8-channel VAE, 8 frames, 2 steps) serves the whole module, so the
sampling loop compiles once for the 88 x 48 px size the 448 x 256 demo images get at the smallest preset.
"""

import io
import json
import logging
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile

import numpy as np
import pytest
from PIL import Image, ImageFilter

from configs import common
from handi_jax import app as app_lib
from handi_jax import generate, pipeline
from handi_jax.media import files as media_files
from tests.conftest import REPO_ROOT

FRAMES, STEPS = 8, 2
HEIGHT, WIDTH = 48, 88   # a 448 x 256 image at the 64 x 64 px area preset
SMALL = next(iter(app_lib.SIZES))
GENERATE_FILES = ["done.json", "flow.png", "mask.png", "video.gif", "video.mp4"]   # + mask_video.mp4 after stage 1
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def small_config():
  config = common.get_config(stage=2)
  config.sampling.num_inference_steps = STEPS
  config.data.num_frames = FRAMES
  config.model.unet.block_out_channels = (32,)
  config.model.unet.transformer_in_heads = 2
  config.model.vae.block_out_channels = (8, 8, 8, 8)
  config.model.vae_without_weights = "random"  # 2 channels a norm group: too few for block_mean_weights
  config.sampling.fallback_area = app_lib.SIZES[SMALL]  # the random UNet records no training size: this area
  return config


@pytest.fixture(scope="module")
def app(tmp_path_factory):
  return app_lib.App(small_config(), tmp_path_factory.mktemp("app_workdir"))


@pytest.fixture(scope="module")
def example(app):
  """(image, prompt, mask) of the first demo example: a 448 x 256 PNG and its motion-area mask."""
  return app.examples()[0]


@pytest.fixture(scope="module")
def server(app):
  page = app_lib.launch(app, "127.0.0.1", _free_port(), block=False)
  yield page.local_url
  page.close()


def request(example, **fields):
  image, prompt, mask = example
  return app_lib.Request(**dict(image=image, prompt=prompt, mask_source=app_lib.UPLOADED, mask_file=mask,
                                motion_strength=3.0, steps=STEPS, guidance_scale=9.0, seed=0, size=SMALL) | fields)


def context_at_model_size(image_path) -> np.ndarray:
  image = media_files.load_image(image_path)
  return media_files.to_uint8(media_files.image_to_model_input(image, HEIGHT, WIDTH))


def test_handler_writes_what_generate_writes(app, example):
  image, _, mask_path = example
  events = []
  response = app.handle(request(example), lambda *event: events.append(event))   # as the page calls it
  assert [phase for phase, _, _ in events][-1] == "writing files"
  assert sorted(p.name for p in response.folder.iterdir()) == GENERATE_FILES
  assert media_files.read_video(response.folder / "video.mp4").shape == (FRAMES, HEIGHT, WIDTH, 3)
  result = response.result
  np.testing.assert_array_equal(result.mask, media_files.load_mask(mask_path, HEIGHT, WIDTH) > 0)
  assert 0.05 < result.mask.mean() < 0.5
  np.testing.assert_array_equal(result.context, context_at_model_size(image))
  assert (result.frames[:, ~result.mask] == result.context[~result.mask]).all()   # the background is the image
  with zipfile.ZipFile(response.archive) as zipped:
    assert sorted(zipped.namelist()) == [f"{response.request_id}/{name}" for name in GENERATE_FILES]
  assert np.asarray(Image.open(response.mask_overlay)).shape == (HEIGHT, WIDTH, 3)


@pytest.mark.slow
def test_mode_generate_writes_the_same_files_for_the_same_inputs(app, example, tmp_path):
  image, prompt, mask_path = example
  response = app.handle(request(example, seed=3))
  # --mode=generate's function, on the original files, with a config built here (it compiles the loop without
  # the progress callback: slow).
  config = small_config()
  config.seed = 3
  config.sampling.guidance_scale = request(example).guidance_scale
  config.sampling.target_area = app_lib.SIZES[SMALL]
  config.generate.update(dict(image=image, prompt=prompt, mask=mask_path, output_dir=str(tmp_path / "cli")))
  (folder,) = generate.generate_from_config(config, tmp_path)
  assert sorted(p.name for p in folder.iterdir()) == GENERATE_FILES
  for name in ("mask.png", "flow.png"):
    np.testing.assert_array_equal(np.asarray(Image.open(folder / name)), np.asarray(Image.open(response.folder / name)))
  for name in ("video.gif", "video.mp4"):
    np.testing.assert_array_equal(media_files.read_video(folder / name), media_files.read_video(response.folder / name))
  ours, theirs = (json.loads((f / "done.json").read_text()) for f in (response.folder, folder))
  assert {k: v for k, v in ours.items() if k not in ("image", "mask_source", "seconds")} == {
      k: v for k, v in theirs.items() if k not in ("image", "mask_source", "seconds")}


def test_progress_reports_stage_1_clean_up_and_stage_2_steps(app, example):
  events = []
  response = app.handle(request(example, mask_source=app_lib.STAGE1), lambda *event: events.append(event))
  assert sorted(p.name for p in response.folder.iterdir()) == sorted(GENERATE_FILES + ["mask_video.mp4"])
  phases = [(phase.split(" (")[0], done, total) for phase, done, total in events]
  assert phases == ([("encoding", 0, 1)] + [("stage 1", i, STEPS) for i in range(STEPS + 1)] + [("clean-up", 0, 1)] +
                    [("stage 2", i, STEPS) for i in range(STEPS + 1)] + [("writing files", 0, 1)])


def test_the_configs_own_size_is_the_training_area_when_its_target_area_is_0(app, example):
  assert small_config().sampling.target_area == 0 and app.sizes[app_lib.TRAINING_SIZE] == 0
  response = app.handle(request(example, size=app_lib.TRAINING_SIZE))
  # the UNet records no training size: config.sampling.fallback_area, which small_config sets to the smallest preset
  assert (response.result.record["height"], response.result.record["width"]) == (HEIGHT, WIDTH)


def test_drawn_and_prior_masks(app, example):
  drawn = np.zeros((256, 448), bool)
  drawn[100:200, 150:300] = True
  response = app.handle(request(example, mask_source=app_lib.DRAWN, drawn=drawn, mask_file=None))
  np.testing.assert_array_equal(response.result.mask, media_files.load_mask(
      response.result.record["image"].replace("image.png", "mask.png"), HEIGHT, WIDTH) > 0)
  assert response.result.mask[HEIGHT // 2, WIDTH // 2] and not response.result.mask[0, 0]
  prior = app.handle(request(example, mask_source=app_lib.PRIOR, mask_file=None))
  assert prior.result.mask.all()


def test_bad_requests_are_refused_in_one_sentence(app, example, tmp_path):
  broken = tmp_path / "broken.png"
  broken.write_bytes(b"not a png")
  small_mask = tmp_path / "small_mask.png"
  Image.fromarray(np.full((10, 10), 255, np.uint8)).save(small_mask)
  cases = {
      "No image": dict(image=None),
      "The action text is empty": dict(prompt="  "),
      "The image is not an image file": dict(image=str(broken)),
      "The mask is not an image file": dict(mask_file=str(broken)),
      "The mask cannot be used: mask": dict(mask_file=str(small_mask)),
      "Nothing is drawn": dict(mask_source=app_lib.DRAWN, drawn=np.zeros((256, 448), bool)),
  }
  for expected, fields in cases.items():
    with pytest.raises(app_lib.AppError) as error:
      app.handle(request(example, **fields))
    message = str(error.value)
    assert message.startswith(expected), message
    assert message.endswith(".") and not re.search(r"\.\s+[A-Z]|\n", message), message   # one sentence


def test_two_clients_at_once_queue_one_after_the_other(app, example, server, caplog):
  from gradio_client import Client, handle_file

  image, prompt, mask = example
  client = Client(server, verbose=False)
  compiled_before = pipeline._sample_video_reporting._cache_size()
  with caplog.at_level(logging.INFO):
    jobs = [client.submit({"background": handle_file(image), "layers": [], "composite": None}, prompt,
                          app_lib.UPLOADED, handle_file(mask), 3.0, STEPS, 9.0, 7, SMALL, api_name="/generate_video")
            for _ in range(2)]
    results = [job.result(timeout=600) for job in jobs]
  events = [re.match(r"request (\S+): (start|done)", r.getMessage()) for r in caplog.records]
  events = [m.groups() for m in events if m]
  (first, _), (second, _) = events[0], events[2]
  assert events == [(first, "start"), (first, "done"), (second, "start"), (second, "done")]
  folders = [pathlib.Path(re.search(r"Files: (\S+)", result[-1]).group(1)) for result in results]
  assert {f.name for f in folders} == {first, second}
  for name in ("mask.png", "flow.png", "video.gif"):
    assert (folders[0] / name).read_bytes() == (folders[1] / name).read_bytes(), name
  np.testing.assert_array_equal(*(media_files.read_video(result[0]) for result in results))   # the served mp4s
  assert pipeline._sample_video_reporting._cache_size() - compiled_before <= 1   # one size: one compilation


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_command_line_explains_its_flags_and_serves_the_page(example, tmp_path):
  from gradio_client import Client, handle_file

  command = [sys.executable, "-m", "handi_jax.app"]
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  result = subprocess.run(command + ["--help"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=env)
  for flag in ("--config", "--workdir", "--port", "--host", "make app"):   # absl's --help exits with status 1
    assert flag in result.stdout, result.stdout + result.stderr[-2000:]
  port = _free_port()
  small = ["--config.sampling.num_inference_steps=2", "--config.data.num_frames=8",
           "--config.model.unet.block_out_channels=(32,)", "--config.model.unet.transformer_in_heads=2",
           "--config.model.vae.block_out_channels=(8,8,8,8)", "--config.model.vae_without_weights=random"]
  with open(tmp_path / "app.log", "w") as log:
    server = subprocess.Popen(command + small + [f"--port={port}", f"--workdir={tmp_path}"], cwd=REPO_ROOT, env=env,
                              stdout=log, stderr=subprocess.STDOUT)
  try:
    url = f"http://127.0.0.1:{port}/"
    for _ in range(600):
      assert server.poll() is None, (tmp_path / "app.log").read_text()[-3000:]
      try:
        urllib.request.urlopen(url, timeout=5)
        break
      except OSError:
        time.sleep(1)
    image, prompt, mask = example
    video, *_, summary = Client(url, verbose=False).predict(
        {"background": handle_file(image), "layers": [], "composite": None}, prompt, app_lib.UPLOADED,
        handle_file(mask), 3.0, STEPS, 9.0, 0, SMALL, api_name="/generate_video")
    assert media_files.read_video(video).shape == (FRAMES, HEIGHT, WIDTH, 3)
    assert str(tmp_path / "app") in summary
  finally:
    server.terminate()
    server.wait(timeout=60)


@pytest.fixture(scope="module")
def browser():
  """Headless Chromium under Selenium; requested before the app fixtures, so a skip costs no compilation."""
  pytest.importorskip("selenium", reason="selenium is not installed (requirements-dev.txt)")
  if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip("Chromium or chromedriver is not installed: `make browser` installs Debian's chromium and "
                "chromium-driver (as root, with apt-get)")
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service

  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
    options.add_argument(argument)
  driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
  yield driver
  driver.quit()


def _save_small_png(png: bytes, path: pathlib.Path, width: int = 1000) -> None:
  """A palette PNG of the screenshot, `width` px wide: small enough to commit."""
  image = Image.open(io.BytesIO(png)).convert("RGB")
  image = image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)
  path.parent.mkdir(parents=True, exist_ok=True)
  image.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def test_browser_generates_then_refuses_an_empty_prompt_then_generates_again(browser, example, server, tmp_path):
  from selenium.webdriver.common.action_chains import ActionChains
  from selenium.webdriver.common.by import By
  from selenium.webdriver.common.keys import Keys
  from selenium.webdriver.support.ui import WebDriverWait

  image, prompt, _ = example
  wait = WebDriverWait(browser, 120)
  browser.get(server)
  wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#image input[type=file]"))
  browser.find_element(By.CSS_SELECTOR, "#image input[type=file]").send_keys(image)
  wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#image canvas"))
  text = browser.find_element(By.CSS_SELECTOR, "#prompt textarea")
  text.send_keys(prompt)
  browser.find_element(By.XPATH, f"//*[@id='mask_source']//label[contains(., '{app_lib.DRAWN}')]").click()
  canvas = browser.find_element(By.CSS_SELECTOR, "#image canvas")
  ActionChains(browser).move_to_element_with_offset(canvas, -40, -10).click_and_hold().move_by_offset(60, 10) \
      .move_by_offset(20, 25).release().perform()

  def generate_and_wait(previous_folder):
    """Press Generate; wait for the new request's summary and a playable video -> (frames, folder)."""
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda b: (m := re.search(r"Files: (\S+)", b.find_element(By.ID, "summary").text))
               and m.group(1) != previous_folder)
    folder = re.search(r"Files: (\S+)", browser.find_element(By.ID, "summary").text).group(1)
    video = browser.find_element(By.CSS_SELECTOR, "#video video")
    wait.until(lambda b: b.execute_script("return arguments[0].readyState >= 1 && arguments[0].duration > 0", video))
    mp4 = tmp_path / "served.mp4"
    mp4.write_bytes(urllib.request.urlopen(video.get_attribute("src"), timeout=60).read())
    return media_files.read_video(mp4), pathlib.Path(folder)

  frames, folder = generate_and_wait(None)
  assert frames.shape == (FRAMES, HEIGHT, WIDTH, 3)
  mask = media_files.load_mask(folder / "mask.png", HEIGHT, WIDTH) > 0
  assert 0.01 < mask.mean() < 0.5, mask.mean()   # the brush stroke, not the whole frame
  # Outside the mask the decoded mp4 is the image up to H.264 (yuv420p, quality 8) loss, measured away from the
  # mask's edge where chroma blocks mix both sides; inside, the random model paints something else.
  context = context_at_model_size(image).astype(np.int16)
  far_outside = ~np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(9)), bool)
  error_outside = np.abs(frames.astype(np.int16) - context)[:, far_outside]
  error_inside = np.abs(frames[1:].astype(np.int16) - context)[:, mask]
  assert error_outside.mean() < 3 and np.percentile(error_outside, 99) < 16, (error_outside.mean(),)
  assert error_inside.mean() > 4 * error_outside.mean(), (error_inside.mean(), error_outside.mean())

  text.send_keys(Keys.CONTROL, "a", Keys.DELETE)   # as a person clears it (clear() fires no input event)
  browser.find_element(By.ID, "generate").click()
  wait.until(lambda b: b.find_elements(By.XPATH, "//*[contains(text(), 'The action text is empty')]"))
  browser.find_element(By.CSS_SELECTOR, ".toast-close").click()   # read, dismissed

  text.send_keys("wash the cucumber")
  frames, second_folder = generate_and_wait(str(folder))
  assert second_folder != folder and frames.shape == (FRAMES, HEIGHT, WIDTH, 3)
  assert json.loads((second_folder / "done.json").read_text())["prompt"] == "wash the cucumber"
  browser.set_window_size(1280, browser.execute_script("return document.body.scrollHeight") + 200)
  browser.execute_script("window.scrollTo(0, 0)")
  screenshot = browser.get_screenshot_as_png()
  (tmp_path / "app.png").write_bytes(screenshot)
  if os.environ.get("HANDI_APP_SCREENSHOT"):
    _save_small_png(screenshot, pathlib.Path(os.environ["HANDI_APP_SCREENSHOT"]))


def test_make_app_uses_the_demo_checkpoint_and_the_page_names_every_weight(tmp_path):
  shutil.copy(REPO_ROOT / "Makefile", tmp_path / "Makefile")
  dry_run = lambda: subprocess.run(["make", "-n", "app", "RUNTIME="], cwd=tmp_path, capture_output=True,
                                   text=True, check=True).stdout
  assert "stage2_pretrained" not in dry_run()                    # before make demo: the config's own weights
  (tmp_path / "runs" / "demo" / "checkpoints").mkdir(parents=True)
  assert "--config.generate.stage2_pretrained=runs/demo" in dry_run() and "stage1_pretrained" not in dry_run()
  (tmp_path / "runs" / "demo" / "stage1" / "checkpoints").mkdir(parents=True)   # the demo trains stage 1 too
  assert "--config.generate.stage1_pretrained=runs/demo/stage1" in dry_run()
  config = common.get_config(stage=2)
  config.generate.stage2_pretrained = "runs/demo"
  assert app_lib.weight_sources(config) == {"VAE and text encoder": "", "stage-1 UNet": "",
                                            "stage-2 UNet": "runs/demo"}
  assert app_lib.random_components(config) == ["VAE and text encoder", "stage-1 UNet"]
  config.generate.stage1_pretrained = "runs/demo/stage1"
  assert app_lib.random_components(config) == ["VAE and text encoder"]
