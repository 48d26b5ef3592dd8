"""`make browser-test`: the workbook as a user sees it, in JupyterLab in headless Chromium.

    python -m cirlib.run.browser_test [--only 07,08] [--chromium PATH] [--chromedriver PATH]

1. A tiny synthetic CIRR world and tiny trained runs of its own (notebooks 01-04 through `cirlib.batch` with the
   tiny preset and smoke settings) under `outputs/browser-test/`; nothing of `make demo` is needed. The world is
   reused when it exists with the same settings; the runs are made afresh (overwrite=True), so that their executed
   copies hold the progress bars that step 4 checks.
2. Copies of notebooks 07 (explorer) and 08 (search) with their parameters pointing at that world (papermill's
   prepare-only: the parameters cell injected, nothing run).
3. JupyterLab on 127.0.0.1 (a free port, a random token, root folder the repository; its settings and workspaces in
   `outputs/browser-test/jupyter/`, so a user's own JupyterLab set-up changes nothing).
4. Headless Chromium through selenium: each notebook opened, Run All Cells, every cell run and the kernel idle, no
   error output; in 07 another query is chosen (and a fusion weight set) and the shown results must change; in 08 an
   image is uploaded through the FileUpload, a text typed, "search" pressed, and the results must change; the
   executed copies that the batch wrote for 01-04 are opened too and their progress bars must read 100%.
5. Screenshots in `outputs/browser-test/screenshots/`, a report in `outputs/browser-test/report.json`; the server
   and its kernels are stopped (by their own PID and API) whatever happened.

Exit status 0 when everything passed, 1 with a message naming the notebook and what failed, 2 with one line saying
what to install when Chromium, chromedriver or selenium is missing. `CIRLIB_CHROMIUM` / `CIRLIB_CHROMEDRIVER` point
at other binaries (default `/usr/bin/chromium`, `/usr/bin/chromedriver`: Debian's `chromium` and `chromium-driver`).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from cirlib import paths
from cirlib.progress import PROGRESS_ENV
from cirlib.run import batch

DEFAULT_CHROMIUM = "/usr/bin/chromium"
DEFAULT_CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_ENV = "CIRLIB_CHROMIUM"
CHROMEDRIVER_ENV = "CIRLIB_CHROMEDRIVER"
INSTALL_CHROMIUM = "apt-get install chromium chromium-driver"
INSTALL_SELENIUM = "pip install -e '.[browser]'"
OUT = paths.OUTPUTS / "browser-test"
NOTEBOOKS = ("07", "08")  # the interactive notebooks driven in the browser
EXECUTED = ("01", "02", "03", "04")  # the batch notebooks that make the world's runs (their copies are checked too)

# The tiny world and runs (the notebook smoke test's sizes): seconds per notebook on two CPU cores.
WORLD = dict(layout="cirr", n_train=32, n_val=24, n_test=12, seed=3)
STAGE1_RUN = "browser_test_stage1"
STAGE2_RUN = "browser_test_stage2"

WINDOW = (1400, 1000)
PAGE_TIMEOUT_S = 90.0  # page loaded and kernel started
RUN_ALL_TIMEOUT_S = 300.0  # every cell of a notebook run
UPDATE_TIMEOUT_S = 120.0  # a widget change answered


class BrowserTestError(RuntimeError):
    """The browser test failed: the message names the notebook and what was expected."""


# ------------------------------------------------------------------------------------------------ prerequisites


def browser_paths(chromium: str | None = None, chromedriver: str | None = None) -> tuple[Path, Path]:
    """Chromium and chromedriver: the arguments, else $CIRLIB_CHROMIUM / $CIRLIB_CHROMEDRIVER, else Debian's."""
    return (Path(chromium or os.environ.get(CHROMIUM_ENV) or DEFAULT_CHROMIUM),
            Path(chromedriver or os.environ.get(CHROMEDRIVER_ENV) or DEFAULT_CHROMEDRIVER))


def missing_prerequisites(chromium: Path, chromedriver: Path) -> str | None:
    """One line saying what to install, or None when Chromium, chromedriver and selenium are all there."""
    absent = [str(p) for p in (chromium, chromedriver) if not (p.is_file() and os.access(p, os.X_OK))]
    if absent:
        return (f"browser test: {' and '.join(absent)} not found; install Chromium and its driver "
                f"(`{INSTALL_CHROMIUM}` on Debian/Ubuntu, as root) or set {CHROMIUM_ENV} / {CHROMEDRIVER_ENV}")
    try:
        import selenium  # noqa: F401
    except ImportError:
        return f"browser test: the selenium package is missing; install it with `{INSTALL_SELENIUM}`"
    return None


# ------------------------------------------------------------------------------------------------ world and notebooks


def _relative(path: Path) -> str:
    """A path inside the repository as the notebooks take it (relative paths are anchored at the repository)."""
    try:
        return path.resolve().relative_to(paths.REPO_ROOT.resolve()).as_posix()
    except ValueError:
        raise BrowserTestError(f"{path} is outside the repository {paths.REPO_ROOT}: JupyterLab serves the "
                               "repository, so the browser test's folder must lie inside it") from None


def batch_parameters(out: Path) -> dict[str, Any]:
    """The tiny runs' parameters (the notebook smoke test's: tiny preset, smoke sizes, the demo's stage-II kind)."""
    return {
        "batch_name": "browser-test", "smoke": True, "dataset": "cirr", "data_root": _relative(out / "cirr"),
        "outputs": _relative(out / "outputs"), "preset": "tiny", "precision": "fp32",
        "stage1_run": STAGE1_RUN, "stage2_run": STAGE2_RUN, "train_image_encoder": True, "reranker": "joint",
        "init": "scratch", "joint_difference": True, "scoring": "pairs", "topk_k": 50, "topk_splits": "val", "k": 50,
        "trackers": "none", "overwrite": True,  # fresh runs: their executed copies show the progress bars checked
    }


def interactive_parameters(out: Path) -> dict[str, Any]:
    """Parameters of the interactive notebooks (each receives those it declares): the tiny world and its runs; for 08
    the world's validation images, indexed into <out>/index by the notebook itself with the tiny stage-I run."""
    base = batch_parameters(out)
    params = {k: base[k] for k in ("dataset", "data_root", "outputs", "stage1_run", "stage2_run")}
    params.update({"image_dir": _relative(out / "cirr" / "dev"), "index": _relative(out / "index"),
                   "reference": "", "k": 20})
    return params


def prepare_runs(out: Path, log: Callable[[str], None]) -> list[Path]:
    """The tiny world (skipped when it exists with this config) and notebooks 01-04 run on it; their executed copies."""
    from cirlib.data import synth

    world = synth.generate(synth.SynthConfig(**WORLD), root=out / "cirr")
    log(f"world: {world}")
    return batch.run_batch(batch_parameters(out), list(EXECUTED), output_dir=out / "executed", cell_timeout_s=600)


def prepare_notebooks(out: Path, stems: Sequence[str]) -> dict[str, Path]:
    """Copies of the interactive notebooks with their parameters injected (nothing executed), in <out>/notebooks/."""
    import papermill

    sources = batch._select(batch.notebook_paths(), list(stems))
    everything = batch.notebook_paths()
    declared = {n for p in everything for n in batch.declared_parameters(p)}
    params = {k: v for k, v in interactive_parameters(out).items() if k in declared}
    plan = batch.plan_batch(params, sources)
    written = {}
    for src, nb_params in plan.items():
        target = out / "notebooks" / src.name
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial.ipynb")
        papermill.execute_notebook(str(src), str(partial), parameters=nb_params, prepare_only=True,
                                   kernel_name=batch.KERNEL, progress_bar=False)
        paths.publish(partial, target)
        written[src.stem] = target
    return written


# ------------------------------------------------------------------------------------------------ JupyterLab


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# JupyterLab settings for an unattended run: no news or update pop-ups over the notebook, every cell in the page
# (windowing off) so that what the page shows is the whole notebook, and no autosave.
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                       "checkForUpdates": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},  # the copies stay as written
}


class JupyterLab:
    """A JupyterLab server of our own: started on a free port with a random token, stopped by its API and its PID."""

    def __init__(self, root: Path, home: Path):
        self.root, self.home = root, home
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.proc: subprocess.Popen | None = None
        self.log_path = home / "server.log"

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def lab_url(self, notebook: Path) -> str:
        return f"{self.base}/lab/tree/{_relative(notebook)}?reset&token={self.token}"

    def api(self, method: str, path: str, timeout: float = 10.0) -> Any:
        request = urllib.request.Request(f"{self.base}{path}", method=method,
                                         headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
        return json.loads(body) if body else None

    def start(self, timeout: float = 60.0) -> None:
        for sub in ("config", "runtime", "workspaces"):
            (self.home / sub).mkdir(parents=True, exist_ok=True)
        settings = self.home / "settings"
        for name, value in LAB_SETTINGS.items():
            paths.write_json(settings / name, value)
        env = dict(os.environ)
        env.pop(PROGRESS_ENV, None)  # live widgets, as a user's JupyterLab draws them
        env.update(JUPYTER_CONFIG_DIR=str(self.home / "config"), JUPYTER_RUNTIME_DIR=str(self.home / "runtime"),
                   JUPYTERLAB_SETTINGS_DIR=str(settings), JUPYTERLAB_WORKSPACES_DIR=str(self.home / "workspaces"))
        cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={self.port}",
               "--ServerApp.port_retries=0", f"--IdentityProvider.token={self.token}",
               f"--ServerApp.root_dir={self.root}"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.append("--allow-root")  # JupyterLab refuses to run as root without it
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=self.root)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrowserTestError(f"JupyterLab exited with status {self.proc.returncode} while starting; its "
                                       f"log: {self.log_path}")
            try:
                self.api("GET", "/api/status", timeout=2.0)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        raise BrowserTestError(f"JupyterLab did not answer on {self.base} within {timeout:.0f} s; its log: "
                               f"{self.log_path}")

    def close_sessions(self) -> None:
        """Shut down every kernel session of this server."""
        for session in self.api("GET", "/api/sessions"):
            self.api("DELETE", f"/api/sessions/{session['id']}")

    def stop(self) -> None:
        """Kernels shut down, then the server (its API; then SIGTERM, then SIGKILL, to its own PID only)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                self.close_sessions()
                self.api("POST", "/api/shutdown")
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
                print(f"[browser-test] JupyterLab's shutdown API did not answer ({e}); stopping PID {self.proc.pid}",
                      file=sys.stderr)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=10)
        self._log.close()
        self.proc = None


# ------------------------------------------------------------------------------------------------ the page

# One read of the open notebook's state (one round trip): its prompts, the kernel status, error outputs.
_STATE_JS = r"""
const panel = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
if (!panel) { return null; }
const prompts = [...panel.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].map(e => e.textContent.trim());
const bar = document.querySelector('#jp-main-statusbar');
const outputs = [...panel.querySelectorAll('.jp-OutputArea-output')];
const errors = outputs.filter(e => e.getAttribute('data-mime-type') === 'application/vnd.jupyter.stderr'
                                   && /Traceback|Error:/.test(e.innerText)).map(e => e.innerText);
const broken = outputs.filter(e => /Error displaying widget|Error rendering output/.test(e.innerText))
                      .map(e => e.innerText);
return {prompts: prompts, status: bar ? bar.innerText : '', errors: errors.concat(broken),
        cells: panel.querySelectorAll('.jp-Cell').length};
"""

# What the last cell that shows an Output widget shows: its widgets' texts and the images they draw.
_WIDGETS_JS = r"""
const panel = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
const areas = [...panel.querySelectorAll('.jp-CodeCell .jp-OutputArea')].filter(a => a.querySelector('.widget-output'));
if (!areas.length) { return {text: '', html: '', images: []}; }
const area = areas[areas.length - 1];
const outs = [...area.querySelectorAll('.widget-output')];
return {text: outs.map(o => o.innerText).join('\n---\n'),
        html: [...area.querySelectorAll('.widget-html-content')].map(e => e.innerText).join('\n'),
        images: [...area.querySelectorAll('.widget-output img')].map(i => i.src)};
"""


# The next click() on a file input (an ipywidgets FileUpload's, never in the page) puts it into the page instead of
# opening the file dialog; then one click() behaves as before.
_FILE_CHOOSER_JS = r"""
const original = HTMLInputElement.prototype.click;
HTMLInputElement.prototype.click = function () {
  if (this.type !== 'file') { return original.call(this); }
  HTMLInputElement.prototype.click = original;
  this.id = 'cirlib-file-chooser';
  document.body.appendChild(this);
};
"""


@dataclass
class PageState:
    prompts: list[str]
    status: str
    errors: list[str]
    cells: int

    @property
    def idle(self) -> bool:
        return bool(re.search(r"\|\s*Idle\b", self.status))

    @property
    def all_run(self) -> bool:
        return bool(self.prompts) and all(re.fullmatch(r"\[\d+\]:", p) for p in self.prompts)


@dataclass
class WidgetView:
    text: str
    html: str
    images: list[str]

    def key(self) -> tuple[str, str, tuple[str, ...]]:
        return (self.text, self.html, tuple(hashlib.sha1(s.encode()).hexdigest()[:12] for s in self.images))


@dataclass
class Result:
    notebook: str
    checks: list[str] = field(default_factory=list)
    screenshots: list[str] = field(default_factory=list)
    log_console: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None


def unfinished_bars(text: str) -> tuple[list[str], list[str]]:
    """The progress-bar lines of rendered output text, and those among them not at 100% (a bar's last state: a
    notebook's text bars end with their final line)."""
    bars = [line.strip() for line in re.split(r"[\r\n]", text) if re.search(r"\d+%\|", line)]
    return bars, [b for b in bars if not re.search(r"(^|\s|:)100%\|", b)]


class Page:
    """Headless Chromium on JupyterLab: open a notebook, run it, read and change its widgets, take screenshots."""

    def __init__(self, chromium: Path, chromedriver: Path, lab: JupyterLab, shots: Path):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = str(chromium)
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                    f"--window-size={WINDOW[0]},{WINDOW[1]}"):
            options.add_argument(arg)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        service = Service(str(chromedriver), log_output=str(lab.home / "chromedriver.log"))
        self.driver = webdriver.Chrome(service=service, options=options)
        self.lab, self.shots = lab, shots
        shots.mkdir(parents=True, exist_ok=True)

    def close(self) -> None:
        self.driver.quit()

    # -------------------------------------------------------------------------------------------- reading
    def state(self) -> PageState | None:
        raw = self.driver.execute_script(_STATE_JS)
        return PageState(**raw) if raw else None

    def wait(self, what: str, until: Callable[[], Any], timeout: float, interval: float = 0.5) -> Any:
        """Poll `until()` until it returns something truthy; an error output on the page fails at once."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.state()
            if state is not None and state.errors:
                raise BrowserTestError(f"{what}: error output on the page:\n" + "\n".join(state.errors)[-3000:])
            value = until()
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserTestError(f"{what}: not within {timeout:.0f} s (last state: {state})")
            time.sleep(interval)

    def open(self, notebook: Path, wait_kernel: bool = True) -> PageState:
        """Open a notebook (JupyterLab's layout reset) and wait for its cells and, if asked, an idle kernel."""
        self.driver.set_window_size(*WINDOW)
        self.driver.get(self.lab.lab_url(notebook))

        def ready() -> PageState | None:
            s = self.state()
            return s if s is not None and s.cells > 0 and (s.idle or not wait_kernel) else None

        return self.wait(f"{notebook.name}: open with an idle kernel", ready, PAGE_TIMEOUT_S)

    def widgets(self) -> WidgetView:
        return WidgetView(**self.driver.execute_script(_WIDGETS_JS))

    def output_text(self) -> str:
        return self.driver.execute_script(
            "return [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output')]"
            ".map(e => e.innerText).join('\\n');")

    # -------------------------------------------------------------------------------------------- acting
    def menu(self, menu: str, item: str) -> None:
        """Click a main-menu entry by its labels (JupyterLab's menu items carry no ids)."""
        from selenium.webdriver.common.by import By

        bar = [e for e in self.driver.find_elements(By.CSS_SELECTOR, ".lm-MenuBar-itemLabel") if e.text == menu]
        if not bar:
            raise BrowserTestError(f"no '{menu}' menu in JupyterLab's menu bar")
        bar[0].click()
        entries = self.wait(f"menu '{menu}' open", lambda: [
            e for e in self.driver.find_elements(By.CSS_SELECTOR, ".lm-Menu-item")
            if e.find_elements(By.CSS_SELECTOR, ".lm-Menu-itemLabel")
            and e.find_element(By.CSS_SELECTOR, ".lm-Menu-itemLabel").text == item], 10)
        entries[0].click()

    def run_all(self, name: str) -> PageState:
        """Run All Cells; wait until every code cell has its execution count and the kernel is idle (read twice)."""
        self.menu("Run", "Run All Cells")
        last: list[PageState] = []

        def done() -> PageState | None:
            s = self.state()
            ok = s is not None and s.all_run and s.idle
            settled = ok and last and last[-1].prompts == s.prompts
            last[:] = [s] if ok else []
            return s if settled else None

        return self.wait(f"{name}: Run All Cells", done, RUN_ALL_TIMEOUT_S, interval=1.0)

    def settle(self, what: str, before: WidgetView | None, timeout: float = UPDATE_TIMEOUT_S) -> WidgetView:
        """Wait for an idle kernel and the same widget view twice 0.5 s apart (different from `before`, if given)."""
        seen: list[WidgetView] = []

        def stable() -> WidgetView | None:
            s = self.state()
            view = self.widgets()
            changed = before is None or view.key() != before.key()
            same = bool(seen) and seen[-1].key() == view.key()
            seen[:] = [view]
            return view if (s is not None and s.idle and changed and same) else None

        return self.wait(what, stable, timeout)

    def control(self, label: str):
        """The element of the widget whose description is `label` (its inline box)."""
        from selenium.webdriver.common.by import By

        found = self.driver.find_elements(
            By.XPATH, f"//div[contains(@class,'widget-inline-hbox')][./label[normalize-space()='{label}']]")
        if not found:
            raise BrowserTestError(f"no widget labelled '{label}' on the page")
        return found[0]

    def type_into(self, element, text: str) -> None:
        from selenium.webdriver.common.keys import Keys

        element.click()
        element.send_keys(Keys.CONTROL, "a")
        element.send_keys(text, Keys.ENTER)

    def choose_file(self, button, file: Path) -> None:
        """Upload a file through an ipywidgets FileUpload as a user does: click its button, choose the file.

        The button clicks a file input that is never in the page and opens the system's file dialog, which headless
        Chromium cannot answer; so that one click on a file input puts the input into the page instead (no dialog),
        and the file is chosen on it (selenium's send_keys), which fires the same `change` event as the dialog."""
        from selenium.webdriver.common.by import By

        self.driver.execute_script(_FILE_CHOOSER_JS)
        button.click()
        inputs = self.driver.find_elements(By.ID, "cirlib-file-chooser")
        if not inputs:
            raise BrowserTestError("the upload button opened no file input")
        inputs[0].send_keys(str(file.resolve()))

    def screenshot(self, name: str) -> Path:
        """The whole notebook in one PNG: the window as tall as the notebook, scrolled to its top."""
        height = self.driver.execute_script(
            "const o = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-WindowedPanel-outer');"
            "return o ? [o.scrollHeight, window.innerHeight - o.clientHeight] : [0, 0];")
        total = max(WINDOW[1], min(16000, int(height[0] + height[1] + 40)))
        self.driver.set_window_size(WINDOW[0], total)
        time.sleep(0.7)
        self.driver.execute_script(
            "const o = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-WindowedPanel-outer');"
            "if (o) { o.scrollTop = 0; }")
        time.sleep(0.3)
        path = self.shots / f"{name}.png"
        partial = path.with_name(path.name + ".partial.png")
        if not self.driver.save_screenshot(str(partial)):
            raise BrowserTestError(f"could not save the screenshot {path}")
        paths.publish(partial, path)
        self.driver.set_window_size(*WINDOW)
        return path

    def log_console(self) -> list[str]:
        """The entries of JupyterLab's log console for the open notebook at its default level (warning): the outputs
        the kernel sent outside any cell, e.g. from widget callbacks (stray progress bars, errors)."""
        from selenium.webdriver.common.by import By

        self.menu("View", "Show Log Console")
        self.wait("the log console opens",
                  lambda: self.driver.find_elements(By.CSS_SELECTOR, ".jp-LogConsolePanel"), 10)
        time.sleep(0.5)
        entries = self.driver.execute_script(
            "return [...document.querySelectorAll('.jp-LogConsolePanel .jp-OutputArea-child')]"
            ".map(e => e.innerText);")
        self.menu("View", "Show Log Console")  # closed again: it would cover the notebook in screenshots
        return entries

    def console_errors(self) -> list[str]:
        """The browser console's SEVERE messages since the last call (JupyterLab logs failed requests there)."""
        return [e["message"] for e in self.driver.get_log("browser")
                if e.get("level") == "SEVERE" and "beforeunload" not in e["message"]]  # leaving an edited page


# ------------------------------------------------------------------------------------------------ the checks


def check_log_console(page: Page, name: str, result: Result) -> None:
    """No progress bar or error reached JupyterLab's log console while the widgets were used (the kernel's output
    outside any cell); other entries (warnings) are listed in the report."""
    entries = page.log_console()
    bad = [e for e in entries if re.search(r"\d+%\||Traceback|Error\b", e)]
    if bad:
        raise BrowserTestError(f"{name}: the widgets wrote progress bars or errors into JupyterLab's log console: "
                               + " | ".join(e.strip()[:200] for e in bad[:5]))
    result.checks.append(f"{name}: no progress bar or error in the log console ({len(entries)} other entries)")
    result.log_console = entries


def check_explorer(page: Page, notebook: Path, result: Result) -> None:
    """07: run all; the explorer shows a figure and a table; another query and a fusion weight change them."""
    page.open(notebook)
    page.run_all(notebook.name)
    first = page.settle("07: the explorer's first view", None)
    if not first.images or "re-ranked" not in first.text:
        raise BrowserTestError(f"07: the explorer shows no figure or no ranking table (text {first.text[:300]!r}, "
                               f"{len(first.images)} images)")
    result.checks.append(f"07 ran all cells; explorer drew {len(first.images)} image(s) and the ranking table")
    result.screenshots.append(str(page.screenshot("07_explorer_query0")))

    row = page.control("query row").find_element("css selector", "input")
    page.type_into(row, "1")
    second = page.settle("07: the explorer after choosing query row 1", first)
    if second.html == first.html or second.text == first.text:
        raise BrowserTestError(f"07: choosing query row 1 left the query line or the table unchanged "
                               f"({first.html!r} -> {second.html!r})")
    result.checks.append(f"07 query row 0 -> 1 changed the view: {second.html.strip()[:120]!r}")
    result.screenshots.append(str(page.screenshot("07_explorer_query1")))

    readout = page.control("fusion w").find_element("css selector", ".widget-readout")
    page.type_into(readout, "0.5")
    third = page.settle("07: the explorer after setting the fusion weight to 0.5", second)
    if "fused z-score (w=0.5)" not in third.text:
        raise BrowserTestError(f"07: with fusion weight 0.5 the table does not say its scores are fused z-scores "
                               f"(text {third.text[:400]!r})")
    result.checks.append("07 fusion weight 0.5: the score column reads 'fused z-score (w=0.5)'")
    result.screenshots.append(str(page.screenshot("07_explorer_fused")))
    check_log_console(page, "07", result)


def check_search(page: Page, notebook: Path, result: Result, image: Path) -> None:
    """08: run all (one search with the defaults); upload a reference image, type a text, set K, press search: the
    status names the new text and an uploaded reference, and the stage-I / stage-II grids and table change."""
    from selenium.webdriver.common.by import By

    page.open(notebook)
    page.run_all(notebook.name)
    before = page.settle("08: the search widget's first view", None)
    if not before.images:
        raise BrowserTestError(f"08: the default search drew no results (status {before.html!r})")
    result.checks.append(f"08 ran all cells; the default search drew {len(before.images)} image(s)")
    result.screenshots.append(str(page.screenshot("08_search_default")))

    uploads = page.driver.find_elements(By.CSS_SELECTOR, ".jp-OutputArea .widget-upload")
    if not uploads:
        raise BrowserTestError("08: no file upload button (ipywidgets FileUpload) on the page")
    page.choose_file(uploads[-1], image)
    page.wait("08: the upload button counts the uploaded file",
              lambda: any("(1)" in b.text for b in page.driver.find_elements(By.CSS_SELECTOR, ".widget-upload")), 30)
    text = "make it red"
    page.type_into(page.control("text").find_element(By.CSS_SELECTOR, "input"), text)
    page.type_into(page.control("K").find_element(By.CSS_SELECTOR, ".widget-readout"), "10")
    buttons = [b for b in page.driver.find_elements(By.CSS_SELECTOR, ".jp-OutputArea button.widget-button")
               if b.text.strip().lower() == "search"]
    if not buttons:
        raise BrowserTestError("08: no 'search' button")
    buttons[0].click()
    after = page.settle("08: results after uploading an image and pressing search", before)
    if "error" in after.html.lower():
        raise BrowserTestError(f"08: the search failed: {after.html}")
    if text not in after.html or "not in the index" not in after.html or "top 10" not in after.html:
        raise BrowserTestError(f"08: the status does not describe a search with the uploaded image, {text!r} and "
                               f"K=10: {after.html!r}")
    if not after.images or after.text == before.text:
        raise BrowserTestError(f"08: after the search the results did not change (text {after.text[:400]!r}, "
                               f"{len(after.images)} images)")
    result.checks.append(f"08 uploaded {image.name}, typed {text!r}, K=10, pressed search: {after.html.strip()!r}")
    result.screenshots.append(str(page.screenshot("08_search_uploaded")))
    check_log_console(page, "08", result)


# Executed copies whose steps keep a bar when done (the training loop's "epochs" bar): the check needs to see it.
KEPT_BARS = {"01_stage1_train": "epochs", "03_stage2_train": "epochs"}


def check_executed_copy(page: Page, notebook: Path, result: Result) -> None:
    """A batch's executed copy as a user reopens it: every progress bar it shows reads 100% (none left at 0% or
    part-way); the training notebooks show their finished "epochs" bar. Bars that clear themselves when done
    (leave=False) show nothing."""
    page.open(notebook, wait_kernel=False)
    seen: list[str] = []

    def rendered() -> str | None:
        text = page.output_text()
        same = bool(text) and seen == [text]
        seen[:] = [text]
        return text if same else None

    text = page.wait(f"{notebook.name}: outputs rendered", rendered, 30)
    result.screenshots.append(str(page.screenshot(f"executed_{notebook.stem}")))
    bars, unfinished = unfinished_bars(text)
    if unfinished:
        raise BrowserTestError(f"progress bars not at 100% in the executed copy: {unfinished[:6]}")
    kept = KEPT_BARS.get(notebook.stem)
    if kept is not None and not any(b.startswith(f"{kept}:") for b in bars):
        raise BrowserTestError(f"the finished {kept!r} bar is not shown (bars: {bars})")
    shown = f"{len(bars)} progress bar(s) shown, all at 100%" if bars else "no progress bar left showing"
    result.checks.append(f"{notebook.name}: {shown}")


# ------------------------------------------------------------------------------------------------ main


def run(stems: Sequence[str], chromium: Path, chromedriver: Path, out: Path = OUT) -> dict[str, Any]:
    """The whole browser test; returns the report (also written to <out>/report.json, passed or not).

    Every check runs even after one failed (each failure gets a screenshot `failure_<notebook>.png`); then
    BrowserTestError lists all failures. A failure before the browser starts (the runs, JupyterLab) stops at once.
    """
    t0 = time.monotonic()
    log = lambda message: print(f"[browser-test] {message}", flush=True)  # noqa: E731
    out.mkdir(parents=True, exist_ok=True)
    shots = out / "screenshots"
    if shots.exists():
        shutil.rmtree(shots)  # this run's screenshots only
    (out / "report.json").unlink(missing_ok=True)  # no earlier run's verdict left behind
    wanted = [s for s in stems if s in NOTEBOOKS]
    missing = [s for s in wanted if not list(paths.NOTEBOOKS.glob(f"{s}_*.ipynb"))]
    if missing:
        raise BrowserTestError(f"notebook(s) {missing} not found in {paths.NOTEBOOKS}")
    log("tiny world and runs (notebooks 01-04, tiny preset)")
    executed = prepare_runs(out, log)
    t_runs = time.monotonic() - t0
    prepared = prepare_notebooks(out, wanted)
    log(f"prepared {[str(p.relative_to(paths.REPO_ROOT)) for p in prepared.values()]}")
    image = sorted((out / "cirr" / "dev").glob("*.png"))[0]

    checks: list[tuple[Result, Path, Callable[[Page, Path, Result], None]]] = []
    for stem, notebook in prepared.items():
        check = check_explorer if stem.startswith("07") else (
            lambda page, nb, result: check_search(page, nb, result, image))
        checks.append((Result(notebook.name), notebook, check))
    checks += [(Result(str(c.relative_to(paths.REPO_ROOT))), c, check_executed_copy) for c in executed]

    from selenium.common.exceptions import WebDriverException

    lab = JupyterLab(paths.REPO_ROOT, out / "jupyter")
    failures: list[str] = []
    console: list[str] = []
    page = None
    try:
        lab.start()
        log(f"JupyterLab on {lab.base} (PID {lab.proc.pid})")
        page = Page(chromium, chromedriver, lab, shots)
        for result, notebook, check in checks:
            t = time.monotonic()
            log(result.notebook)
            try:
                check(page, notebook, result)
            except (BrowserTestError, WebDriverException) as e:
                what = str(e) if isinstance(e, BrowserTestError) else f"the browser failed: {type(e).__name__}: {e}"
                result.error = what
                failures.append(f"{result.notebook}: {what}")
                log(f"FAILED {result.notebook}: {what[:300]}")
                try:
                    result.screenshots.append(str(page.screenshot(f"failure_{notebook.stem}")))
                except WebDriverException as shot_error:  # the failure above is what is reported
                    log(f"no failure screenshot: {type(shot_error).__name__}: {shot_error}")
            lab.close_sessions()
            result.seconds = round(time.monotonic() - t, 1)
        console = page.console_errors()
    finally:
        if page is not None:
            page.close()
        lab.stop()

    from cirlib import provenance

    report = {
        "produced_by": provenance.record("browser_test", {"notebooks": list(prepared), "world": WORLD,
                                                          "stage1_run": STAGE1_RUN, "stage2_run": STAGE2_RUN},
                                         chromium=str(chromium), chromedriver=str(chromedriver)),
        "passed": not failures,
        "seconds": {"runs": round(t_runs, 1), "total": round(time.monotonic() - t0, 1)},
        "results": [r.__dict__ for r, _, _ in checks],
        "browser_console_severe": console,
    }
    paths.write_json(out / "report.json", report)
    if failures:
        raise BrowserTestError(f"{len(failures)} of {len(checks)} check(s) failed (report {out / 'report.json'}, "
                               f"screenshots {shots}):\n" + "\n".join(failures))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(NOTEBOOKS), help="interactive notebooks to drive (07,08)")
    parser.add_argument("--chromium", default=None, help=f"Chromium binary (default ${CHROMIUM_ENV} or "
                                                         f"{DEFAULT_CHROMIUM})")
    parser.add_argument("--chromedriver", default=None, help=f"chromedriver (default ${CHROMEDRIVER_ENV} or "
                                                             f"{DEFAULT_CHROMEDRIVER})")
    args = parser.parse_args(argv)
    chromium, chromedriver = browser_paths(args.chromium, args.chromedriver)
    missing = missing_prerequisites(chromium, chromedriver)
    if missing:
        print(missing, file=sys.stderr)
        return 2
    stems = [f"{int(t):02d}" if t.strip().isdigit() else t.strip() for t in args.only.split(",") if t.strip()]
    unknown = [s for s in stems if s not in NOTEBOOKS]
    if unknown:
        parser.error(f"--only {unknown}: the browser test drives {list(NOTEBOOKS)}")
    try:
        report = run(stems, chromium, chromedriver)
    except (BrowserTestError, batch.BatchError) as e:
        print(f"browser test failed: {e}", file=sys.stderr)
        return 1
    for r in report["results"]:
        for check in r["checks"]:
            print(f"  ok  {check}")
    rel = OUT.relative_to(paths.REPO_ROOT)
    print(f"browser test passed in {report['seconds']['total']:.0f} s; screenshots in {rel}/screenshots/, report "
          f"{rel}/report.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
