"""A real browser: JupyterLab (headless, localhost, token auth) driven by Debian's Chromium through Playwright.

Opens notebook 02 on the toy model, runs all cells, changes a form field, clicks the form's Train button and sees
the progress bar, the live loss plot and the sample grid appear in the page. Screenshots go to
`test-artifacts/browser/`. The server is always shut down, even when the test fails.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts" / "browser"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
NOTEBOOK = "02_train_dreambooth_lora.ipynb"
STEPS, NEW_STEPS = 2, 3
MINUTE = 60_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_notebook(folder: Path) -> None:
    """Notebook 02 with injected parameters (toy model, a few steps, one short sample prompt)."""
    (folder / "prompts.txt").write_text("a sks shape --s 2 --d 1\n")
    nb = nbformat.read(ROOT / "notebooks" / NOTEBOOK, as_version=4)
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", []))
    overrides = {"max_train_steps": STEPS, "train_batch_size": 2, "sample_every_n_steps": 1}
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(
        f'OVERRIDES = {overrides!r}\nSAMPLE_PROMPTS = "prompts.txt"', metadata={"tags": ["injected-parameters"]}))
    nbformat.write(nb, folder / NOTEBOOK)


class JupyterLab:
    """`jupyter lab` on 127.0.0.1:<free port> with a random token, in an isolated config; stopped on exit."""

    def __init__(self, root: Path, home: Path):
        self.port, self.token = free_port(), secrets.token_hex(16)
        env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}  # the notebook shows its progress bar
        env.update(PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
                   JUPYTER_CONFIG_DIR=str(home / "config"), JUPYTER_RUNTIME_DIR=str(home / "runtime"),
                   JUPYTERLAB_SETTINGS_DIR=str(home / "settings"), JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"))
        news = home / "settings" / "@jupyterlab" / "apputils-extension"
        news.mkdir(parents=True)
        (news / "notification.jupyterlab-settings").write_text('{"fetchNews": "false", "checkForUpdates": false}')
        self.log = home / "jupyterlab.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.open_browser=False",
             "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0",
             f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={root}", "--ServerApp.allow_root=True",
             "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
            env=env, stdout=open(self.log, "w"), stderr=subprocess.STDOUT)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}?token={self.token}"

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited:\n{self.log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(self.url("api/status"), timeout=2)
                return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"JupyterLab did not start:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@pytest.mark.slow
@pytest.mark.browser
def test_notebook_02_in_jupyterlab(tmp_path):
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).is_file(), "install Debian's chromium (apt-get install chromium)"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    prepare_notebook(work)
    lab = JupyterLab(work, home)
    try:
        lab.wait_ready()
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.set_default_timeout(2 * MINUTE)
                try:
                    drive(page, lab)
                finally:
                    page.screenshot(path=str(ARTIFACTS / "final.png"), full_page=True)
            finally:
                browser.close()
    finally:
        lab.stop()
    assert (work / "output" / "dreambooth" / "sks_shape.safetensors").is_file()


def all_cells_done(page) -> None:
    """Wait until no cell is running or queued and every code cell has run."""
    page.wait_for_function("""() => {
        const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')].map(e => e.textContent);
        return prompts.length > 0 && prompts.every(t => /\\[\\d+\\]/.test(t));
    }""", timeout=5 * MINUTE)


def drive(page, lab: JupyterLab) -> None:
    page.goto(lab.url(f"lab/tree/{NOTEBOOK}"))
    page.wait_for_selector(".jp-Notebook")
    page.wait_for_selector("#jp-main-statusbar >> text=/ipykernel.*Idle/")
    # Run → Run All Cells
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
    form = page.locator(".lorakit-form")
    form.wait_for(timeout=3 * MINUTE)
    page.wait_for_selector(".lorakit-live .lorakit-sample-grid", timeout=5 * MINUTE)
    all_cells_done(page)
    page.screenshot(path=str(ARTIFACTS / "1-run-all.png"), full_page=True)
    stderr = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']").all_inner_texts()
    assert not [t for t in stderr if "Traceback" in t], stderr

    # change a field in the form, then press its Train button
    steps = form.locator(".lorakit-field-max_train_steps input")
    steps.fill(str(NEW_STEPS))
    steps.press("Tab")
    form.locator(".lorakit-errors").wait_for(state="attached")
    assert "lorakit-error" not in form.locator(".lorakit-errors").inner_html()
    form.locator(".lorakit-run").click()

    live = form.locator(".lorakit-live")
    live.locator(".lorakit-loss-plot").wait_for(timeout=3 * MINUTE)
    live.locator(".lorakit-progress").wait_for(timeout=3 * MINUTE)
    page.screenshot(path=str(ARTIFACTS / "2-training-from-the-button.png"), full_page=True)
    live.locator(".lorakit-sample-grid").wait_for(timeout=3 * MINUTE)
    page.wait_for_function(f"""() => [...document.querySelectorAll('.lorakit-form .lorakit-progress')]
        .some(e => e.textContent.includes('step {NEW_STEPS}/{NEW_STEPS}'))""", timeout=3 * MINUTE)
    page.wait_for_function("""() => document.querySelector('.lorakit-form').textContent.includes('done')""",
                           timeout=MINUTE)
    for cls in ("lorakit-loss-plot", "lorakit-sample-grid"):  # the images were drawn, not just their boxes
        size = live.locator(f".{cls}").evaluate("e => [e.naturalWidth, e.naturalHeight]")
        assert size[0] > 100 and size[1] > 60, (cls, size)
    live.scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "3-after-training.png"), full_page=True)
