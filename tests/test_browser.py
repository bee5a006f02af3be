"""The notebooks as a person uses them: JupyterLab in headless Chromium (Debian's ``chromium``,
driven by playwright with ``executable_path``; no browser is downloaded).

Notebooks 01 and 04 are opened in a live JupyterLab, every cell is run from the Run menu, and
the widgets must render (interactive=None turns them on in a live kernel) and answer: moving a
slider changes the figure. Skips when Chromium or playwright is missing (``make test``
installs Chromium where it can).
"""
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory, affectnet_checkpoint):
    """A JupyterLab server on a folder holding notebooks 01 and 04, parameterised (not run) for a
    tiny trained run; yields ``(base url, token)``."""
    import papermill

    root = tmp_path_factory.mktemp("lab")
    run_dir = str(affectnet_checkpoint.parent.parent)
    papermill.execute_notebook(str(NOTEBOOKS / "01_diversity_explained.ipynb"), str(root / "01.ipynb"),
                               parameters=dict(run_dir=run_dir, n_faces=8, L_max=4, output_dir=str(root / "o1")),
                               prepare_only=True, kernel_name="fer_lab")
    papermill.execute_notebook(str(NOTEBOOKS / "04_attention_explorer.ipynb"), str(root / "04.ipynb"),
                               parameters=dict(run_dir=run_dir, n_images=2, n_region_images=4,
                                               output_dir=str(root / "o4")),
                               prepare_only=True, kernel_name="fer_lab")
    port, token = _free_port(), "fer-lab-test"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
           f"--ServerApp.token={token}", f"--ServerApp.root_dir={root}", "--allow-root",
           "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("JupyterLab did not start within 60 s")
        yield url, token
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


def _run_all(page, url, token, name):
    # a workspace of its own, reset: the other notebook's tab (and kernel status) must not be restored here
    page.goto(f"{url}/lab/workspaces/{Path(name).stem}/tree/{name}?token={token}&reset", wait_until="domcontentloaded")
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
    # the kernel must be up before "Run All Cells", or JupyterLab runs nothing
    page.wait_for_function("() => /\\| Idle/.test(document.body.innerText)", timeout=120_000)
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()


def _wait_for(page, selector: str, timeout: int, **kw):
    """``page.wait_for_selector``; on a timeout the notebook's error outputs are in the failure."""
    try:
        page.wait_for_selector(selector, timeout=timeout, **kw)
    except playwright.TimeoutError:
        errors = page.eval_on_selector_all(".jp-OutputArea-output[data-mime-type*='error'], .jp-RenderedText",
                                           "els => els.map(e => e.innerText.slice(0, 400))")
        pytest.fail(f"{selector} did not appear in {timeout / 1000:.0f} s; outputs: {errors[-4:]}")


def _images(page, scope: str) -> list[str]:
    return page.eval_on_selector_all(f"{scope} img", "els => els.map(e => e.src.slice(-200))")


def _nudge(page, handle_selector: str, key: str = "ArrowRight"):
    handle = page.locator(handle_selector).first
    handle.scroll_into_view_if_needed()
    handle.focus()
    handle.press(key)


def test_notebook_04_explorer_widgets_render_and_answer(lab, browser):
    url, token = lab
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    _run_all(page, url, token, "04.ipynb")
    box = ".jp-Notebook .widget-vbox"
    # JupyterLab skips rendering cells outside the viewport: wait for the widgets in the DOM, then scroll to them
    _wait_for(page, f"{box} .widget-slider", 240_000, state="attached")
    page.locator(f"{box} .widget-slider").first.scroll_into_view_if_needed()
    _wait_for(page, f"{box} .widget-output img", 240_000)
    assert page.locator(f"{box} .widget-dropdown").count() >= 1           # layer picker
    assert page.locator(f"{box} .widget-upload").count() == 1            # your photo
    before = _images(page, f"{box} .widget-output")
    status = page.locator(f"{box} .widget-html").first.inner_text()
    _nudge(page, f"{box} .widget-slider .noUi-handle")
    page.wait_for_function(
        "([sel, old]) => { const s = [...document.querySelectorAll(sel + ' img')].map(e => e.src.slice(-200));"
        " return s.length > 0 && JSON.stringify(s) !== JSON.stringify(old); }",
        arg=[f"{box} .widget-output", before], timeout=120_000)
    assert page.locator(f"{box} .widget-html").first.inner_text() != status     # "face 1 of ..." now
    page.close()


def test_notebook_01_sliders_render_and_answer(lab, browser):
    url, token = lab
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    _run_all(page, url, token, "01.ipynb")
    area = ".jp-Notebook .widget-interact"
    _wait_for(page, f"{area} .widget-slider", 180_000, state="attached")
    page.locator(f"{area} .widget-slider").first.scroll_into_view_if_needed()
    _wait_for(page, f"{area} .widget-output img", 180_000)
    assert page.locator(f"{area} .widget-slider").count() == 3            # gamma, squared distance, L
    before = _images(page, f"{area} .widget-output")
    _nudge(page, f"{area} .widget-slider >> nth=2 >> .noUi-handle")         # L: 3 -> 4 learners
    page.wait_for_function(
        "([sel, old]) => { const s = [...document.querySelectorAll(sel + ' img')].map(e => e.src.slice(-200));"
        " return s.length > 0 && JSON.stringify(s) !== JSON.stringify(old); }",
        arg=[f"{area} .widget-output", before], timeout=60_000)
    page.close()
