"""The web UI: the request function on its own, and the page driven in headless Chromium."""

import os
import shutil
import socket
from pathlib import Path

import pytest

from ldm_pipeline.app import MODEL_SCHEDULER, build_app, generate

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
SCREENSHOT = os.environ.get("LDM_APP_SCREENSHOT")  # where to keep the page's picture (README)


def test_generate_returns_images_and_the_seed_it_used(pipe):
    images, seed = generate(pipe, "a red circle", "", 2, 2.5, -1, "euler", 2, 32, 32)
    assert len(images) == 2 and images[0].size == (32, 32) and 0 <= seed < 2**31
    again, same = generate(pipe, "a red circle", "", 2, 2.5, seed, MODEL_SCHEDULER, 2, 32, 32)
    first, _ = generate(pipe, "a red circle", "", 2, 2.5, seed, MODEL_SCHEDULER, 2, 32, 32)
    assert same == seed and list(again[0].getdata()) == list(first[0].getdata())
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"  # "euler" was for one request
    steps = []
    generate(pipe, "x", "", 3, 2.5, 0, MODEL_SCHEDULER, 1, 32, 32, on_step=lambda done, total: steps.append(done))
    assert steps == [1, 2, 3]
    with pytest.raises(ValueError, match="type a prompt first"):
        generate(pipe, "  ", "", 2, 2.5, 0, MODEL_SCHEDULER, 1, 32, 32)
    with pytest.raises(ValueError, match="height"):
        generate(pipe, "x", "", 2, 2.5, 0, MODEL_SCHEDULER, 1, 32, 31)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"seed": 1e30}, r"Seed must be at most 2147483647"),
        ({"seed": float("nan")}, "Seed must be a whole number, got nan"),
        ({"steps": "many"}, "Steps must be a whole number, got 'many'"),
        ({"steps": 2.5}, "Steps must be a whole number, got 2.5"),
        ({"num_images": True}, "Images must be a whole number"),
        ({"width": float("inf")}, "Width must be a whole number"),
        ({"scheduler": "warp-drive"}, "Scheduler must be one of"),
        ({"prompt": None}, "type a prompt first"),
        ({"height": 32768, "width": 32768}, "needs at least .* GiB of memory"),
    ],
)
def test_hostile_field_values_are_refused_naming_the_field(pipe, fields, message):
    request = {"prompt": "x", "negative_prompt": "", "steps": 2, "guidance": 2.5, "seed": 0}
    request |= {"scheduler": MODEL_SCHEDULER, "num_images": 1, "width": 32, "height": 32, **fields}
    with pytest.raises(ValueError, match=message):
        generate(pipe, **request)
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver")
def test_the_page_starts_at_an_lcm_pipelines_few_steps_without_guidance_for_a_lora(pipe):
    from diffusers import LCMScheduler

    def sliders(app) -> dict:
        return {b.label: b.value for b in app.blocks.values() if type(b).__name__ == "Slider"}

    assert {k: v for k, v in sliders(build_app(pipe)).items() if k in ("Steps", "Guidance")} == {
        "Steps": 20,
        "Guidance": 2.5,
    }
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)  # `ldm app --scheduler lcm --lora ...`
    assert sliders(build_app(pipe))["Steps"] == 4 and sliders(build_app(pipe))["Guidance"] == 1.0


def test_page_in_headless_chromium_generates_images(pipe, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    port = _free_port()
    app = build_app(pipe, title="ldm-pipeline test")
    app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,900",
    ):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        browser.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(browser, 120)
        box = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "#prompt textarea")))
        # An empty prompt shows an error on the page, and the page stays usable.
        browser.find_element(By.CSS_SELECTOR, "#generate").click()
        wait.until(lambda b: "type a prompt first" in b.page_source)
        box.send_keys("a red circle on a white background")
        browser.find_element(By.CSS_SELECTOR, "#generate").click()
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#gallery img")))
        wait.until(lambda b: "Seed: " in b.find_element(By.CSS_SELECTOR, "#used-seed").text)
        images = browser.find_elements(By.CSS_SELECTOR, "#gallery img")
        assert len(images) >= 1
        shot = Path(SCREENSHOT) if SCREENSHOT else tmp_path / "app.png"
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
    finally:
        browser.quit()
        app.close()
