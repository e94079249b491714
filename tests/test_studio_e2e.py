"""storymem studio in a real browser (Debian's chromium, driven by selenium): write a three-shot story in the
page, render it with the tiny model, remove a keyframe from the memory, re-render shot 3, and check that the
page shows both takes and that the manifest records the edit.

Needs gradio, selenium, chromium and chromedriver (``apt-get install chromium chromium-driver``;
``pip install "storymem[studio]" selenium``); skipped when one is missing. Set STORYMEM_STUDIO_SCREENSHOT to a
PNG path to keep a screenshot of the page.
"""

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
MISSING = [name for name, ok in (("gradio", importlib.util.find_spec("gradio")),
                                 ("selenium", importlib.util.find_spec("selenium")),
                                 ("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)) if not ok]
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"browser test needs {', '.join(MISSING)}")

FLAGS = ["--base", "tiny", "--height", "32", "--width", "32", "--frames", "5", "--steps", "2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    workspace = tmp_path_factory.mktemp("studio")
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="2", HF_HUB_OFFLINE="1")
    log = open(workspace.parent / "studio.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "storymem.studio", "--workspace", str(workspace), "--port",
                                str(port), *FLAGS], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if process.poll() is not None or time.time() > deadline:
                process.kill()
                log.close()
                pytest.fail("the studio did not start:\n" + (workspace.parent / "studio.log").read_text())
            time.sleep(0.5)
    yield url, workspace, workspace.parent / "studio.log"
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1100", "--mute-audio"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


class Page:
    """The studio page as a person uses it: tabs, table cells, buttons, radios, checkboxes."""

    def __init__(self, driver, log: Path):
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        self.d, self.By, self.Wait, self.log = driver, By, WebDriverWait, log

    def wait(self, condition, timeout=60, what="condition"):
        try:
            return self.Wait(self.d, timeout, 0.3).until(lambda d: condition())
        except Exception:
            if os.environ.get("STORYMEM_STUDIO_DEBUG"):
                self.d.save_screenshot(os.environ["STORYMEM_STUDIO_DEBUG"])
            server = "\n".join(self.log.read_text().splitlines()[-20:])
            raise AssertionError(f"timed out waiting for {what}; message: {self.text('sm-message')!r}; progress: "
                                 f"{self.text('sm-progress')!r}; the server's log ends:\n{server}") from None

    def find(self, css):
        return self.d.find_elements(self.By.CSS_SELECTOR, css)

    def text(self, element_id):
        found = self.find(f"#{element_id}")
        return found[0].text if found else ""

    def click(self, element_id):
        self.d.find_element(self.By.ID, element_id).click()

    def tab(self, name):
        for button in self.find('button[role="tab"]'):
            if button.text.strip() == name:
                button.click()
                return
        raise AssertionError(f"no tab {name}")

    def type_cell(self, row, column, text):
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.keys import Keys

        self.wait(lambda: self.find(f'#sm-table [data-testid="cell-{row}-{column}"]'), what=f"cell {row},{column}")
        self.find(f'#sm-table [data-testid="cell-{row}-{column}"]')[0].click()
        time.sleep(0.3)  # the table selects the cell, then Enter edits it
        ActionChains(self.d).send_keys(Keys.ENTER).perform()
        time.sleep(0.3)
        ActionChains(self.d).key_down(Keys.CONTROL).send_keys("a").key_up(Keys.CONTROL).send_keys(text) \
            .send_keys(Keys.ENTER).perform()
        self.wait(lambda: self.cell_text(row, column) == text, what=f"cell {row},{column} = {text!r}")

    def cell_text(self, row, column):
        """What a table cell holds, shown or still in its editor."""
        cell = self.find(f'#sm-table [data-testid="cell-{row}-{column}"]')[0]
        editor = cell.find_elements(self.By.CSS_SELECTOR, "input, textarea")
        if editor:
            return editor[0].get_attribute("value").strip()
        shown = cell.find_elements(self.By.CSS_SELECTOR, "span[data-editable]")
        return (shown[0].text if shown else cell.text).strip()

    def labels(self, element_id):
        return [label.text.strip() for label in self.find(f"#{element_id} label")]

    def choose(self, element_id, text):
        self.wait(lambda: text in self.labels(element_id), what=f"{text!r} in {element_id}")
        for label in self.find(f"#{element_id} label"):
            if label.text.strip() == text:
                label.click()
                return

    def state(self):
        found = self.find("#sm-progress")
        return found[0].get_attribute("data-state") if found else None


def test_write_render_edit_memory_and_rerender_in_the_browser(server, browser):
    url, workspace, log = server
    page = Page(browser, log)
    browser.get(url)
    page.wait(lambda: page.find("#sm-add-shot"), 60, "the page")

    # Write a three-shot story in the table.
    run = page.find("#sm-run textarea, #sm-run input")[0]
    run.clear()
    run.send_keys("e2e")
    title = page.find("#sm-title textarea, #sm-title input")[0]
    title.clear()
    title.send_keys("Three shots")
    for rows in (2, 3):
        page.click("sm-add-shot")
        page.wait(lambda: page.find(f'#sm-table [data-testid="cell-{rows - 1}-2"]'), what=f"row {rows}")
    page.type_cell(0, 2, "a red circle")
    page.type_cell(1, 2, "the circle moves")
    page.type_cell(1, 1, "continue")
    page.type_cell(2, 2, "a blue square")
    page.type_cell(2, 0, "2")
    page.click("sm-check")
    page.wait(lambda: "3 shots in 2 scenes" in page.text("sm-issues"), what="the story check")

    # Render it.
    page.tab("Render")
    page.click("sm-render")
    page.wait(lambda: page.state() in ("finished", "failed"), 300, "the render")
    assert page.state() == "finished", page.text("sm-progress")
    page.wait(lambda: len(page.find("#sm-shots video")) == 3, what="three shot videos")

    # Remove one keyframe from the memory shot 3 is drawn from, and re-render shot 3.
    page.tab("Memory")
    page.choose("sm-memory-shot", "shot 3")
    page.wait(lambda: page.labels("sm-remove"), what="the memory frames")
    removed = page.labels("sm-remove")[-1]
    page.choose("sm-remove", removed)
    page.click("sm-save-edit")
    page.wait(lambda: "memory edit #1 saved" in page.text("sm-message"), what="the edit")
    page.click("sm-rerender")
    page.wait(lambda: "from shot 3" in page.text("sm-message"), what="the re-render to start")
    page.tab("Render")
    page.wait(lambda: page.state() == "failed" or (
        page.find('#sm-shots [data-stem="02_01"] [data-takes="2"]') and page.state() == "finished"), 300,
        "the re-render")
    assert page.state() == "finished", page.text("sm-progress")

    # The page shows both takes of shot 3.
    page.tab("Takes")
    page.choose("sm-take-shot", "shot 3 · 02_01")
    page.wait(lambda: page.find('#sm-takes[data-count="2"]'), what="two takes")
    assert page.labels("sm-take") == ["take 1", "take 2 (current)"]
    assert len(page.find("#sm-takes video")) == 2
    if os.environ.get("STORYMEM_STUDIO_SCREENSHOT"):
        browser.save_screenshot(os.environ["STORYMEM_STUDIO_SCREENSHOT"])

    # The manifest records the edit, and which take was drawn from it.
    manifest = json.loads((workspace / "runs" / "e2e" / "manifest.json").read_text())
    edit = manifest["edits"][0]
    assert edit["shot"] == "02_01" and [op["op"] for op in edit["operations"]] == ["remove"]
    stem, frame = removed.split()[1], int(removed.split()[3])
    assert (edit["operations"][0]["entry"]["shot_stem"], edit["operations"][0]["entry"]["frame"]) == (stem, frame)
    assert edit["rendered_takes"] == [2]
    assert not any(m.get("shot_stem") == stem and m.get("frame") == frame for m in manifest["shots"][2]["memory"])


def test_uploads_reach_the_studio_only_when_valid(server, browser, tmp_path):
    """A reference image and a story file uploaded through the page (the browser's file inputs)."""
    import numpy as np
    from PIL import Image

    url, workspace, log = server
    page = Page(browser, log)
    browser.get(url)
    page.wait(lambda: page.find("#sm-add-shot"), 60, "the page")
    story = tmp_path / "uploaded tale.json"
    story.write_text(json.dumps({"story_name": "Uploaded", "scenes": [
        {"scene_num": 1, "video_prompts": ["one", "two"], "cut": [True, False]}]}))
    page.find('input[type="file"][accept*=".json"]')[0].send_keys(str(story))
    page.wait(lambda: "kept as stories/uploaded-tale.json" in page.text("sm-message"), what="the story upload")
    assert (workspace / "stories" / "uploaded-tale.json").is_file()
    broken = tmp_path / "broken.json"
    broken.write_text('{"scenes": [{"scene_num": 1, "video_prompts": ["a"], "cut": [false]}]}')
    page.find('input[type="file"][accept*=".json"]')[0].send_keys(str(broken))
    page.wait(lambda: "scene 1, shot 1: 'cut' is false" in page.text("sm-message"), what="the refusal")

    run = page.find("#sm-run textarea, #sm-run input")[0]
    run.clear()
    run.send_keys("e2e")
    page.tab("Memory")
    page.choose("sm-memory-shot", "shot 3")
    image = tmp_path / "hero.png"
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(image)
    page.find('#sm-refs input[type="file"]')[0].send_keys(str(image))
    page.wait(lambda: any("hero" in (e.get_attribute("textContent") or "") for e in page.find("#sm-refs")),
              what="the image upload")
    page.click("sm-save-edit")
    page.wait(lambda: "memory edit #2 saved" in page.text("sm-message"), what="the second edit")
    manifest = json.loads((workspace / "runs" / "e2e" / "manifest.json").read_text())
    operation = manifest["edits"][1]["operations"][0]
    assert operation["op"] == "add_reference" and operation["name"] == "hero.png"
    assert (workspace / "runs" / "e2e" / operation["file"]).is_file()
