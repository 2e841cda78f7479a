"""The MLflow UI on a demo study, in a real browser (Debian's headless Chromium through Selenium
and its chromedriver): what a person sees after `mlflow ui` in the study's folder.

Screenshots are saved in each test's temporary folder; with `VLMEXP_SCREENSHOTS=DIR` the runs
view is also written to `DIR/mlflow_ui.png` (the README's picture:
`VLMEXP_SCREENSHOTS=docs/img pytest tests/test_mlflow_ui.py`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _servers import free_port, wait_for
from mlflow import MlflowClient

pytestmark = pytest.mark.slow

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1500,900"]


@pytest.fixture(scope="module")
def ui(demo_study: Path, tmp_path_factory):
    """`mlflow ui` on the demo study's store, started as a user starts it (in that folder)."""
    port = free_port()
    exe = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen(
        [str(exe), "ui", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", "sqlite:///mlflow.db"],
        cwd=demo_study, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    try:
        wait_for(f"http://127.0.0.1:{port}/health", proc, seconds=120)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    for path in (CHROMIUM, CHROMEDRIVER):
        assert Path(path).is_file(), (f"{path} is missing: apt-get install -y chromium "
                                      f"chromium-driver (.ci/run does)")
    options = Options()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_text(driver, *texts: str, seconds: float = 60) -> str:
    """The page's text once it contains every one of `texts`."""
    from selenium.webdriver.common.by import By

    end = time.monotonic() + seconds
    body = ""
    while time.monotonic() < end:
        body = driver.find_element(By.TAG_NAME, "body").text
        if all(t in body for t in texts):
            return body
        time.sleep(0.5)
    raise AssertionError(f"never saw {[t for t in texts if t not in body]} on {driver.current_url}:"
                         f" {body[:600]!r}")


def shot(driver, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.png"
    driver.save_screenshot(str(path))
    if os.environ.get("VLMEXP_SCREENSHOTS") and name == "mlflow_ui":
        out = Path(os.environ["VLMEXP_SCREENSHOTS"])
        out.mkdir(parents=True, exist_ok=True)
        from PIL import Image

        # a palette PNG: a third of the size, for the README
        Image.open(path).convert("RGB").quantize(colors=128).save(out / path.name, optimize=True)
    return path


@pytest.fixture(scope="module")
def study_runs(demo_study: Path):
    client = MlflowClient(f"sqlite:///{demo_study / 'mlflow.db'}")
    exp = client.get_experiment_by_name("demo")
    runs = client.search_runs([exp.experiment_id], "", max_results=1000)
    parent = next(r for r in runs if r.data.tags.get("vlmexp.role") == "study")
    children = sorted((r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id),
                      key=lambda r: int(r.data.tags["vlmexp.trial"]))
    return exp, parent, children


def test_the_experiment_is_a_training_experiment(study_runs):
    """MLflow 3 opens experiments of this kind on their runs (not the GenAI overview) where it
    reads the kind; the UI shows it as 'Machine learning'."""
    exp, _, _ = study_runs
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


def close_assistant(driver) -> None:
    """MLflow 3.17 opens its assistant panel on first use; a person closes it."""
    from selenium.webdriver.common.by import By

    for button in driver.find_elements(By.CSS_SELECTOR, "button[aria-label=Close]"):
        if button.get_attribute("data-component-id") == "mlflow.assistant.chat_panel.close":
            button.click()


def test_the_trials_are_listed_as_children_of_the_study_run(ui, browser, study_runs, tmp_path):
    from selenium.webdriver.common.by import By

    exp, parent, children = study_runs
    browser.get(ui)
    # cosmetic, for the screenshot: the objectives and searched weights as columns (the page
    # keeps its column choice here; a person picks them under "Columns")
    columns = [f"metrics.`objective.{o}`" for o in ("combined", "vl", "text")] + [
        f"params.`{k}`" for k in sorted(children[0].data.params) if k.startswith("optuna.")]
    state = {"selectedColumns": columns, "orderByKey": "attributes.start_time",
             "orderByAsc": False}
    browser.execute_script(
        "window.localStorage.setItem(arguments[0], arguments[1])",
        f'MLflowLocalStorage-1.1-ExperimentPage-["{exp.experiment_id}"]-ReactComponentState',
        json.dumps(state))
    browser.get(f"{ui}/#/experiments/{exp.experiment_id}/runs")
    wait_text(browser, "Training runs", "study-demo")
    close_assistant(browser)
    assert "trial-0000 (base)" not in browser.find_element(By.TAG_NAME, "body").text  # collapsed
    link = browser.find_element(By.LINK_TEXT, "study-demo")
    cell = link.find_element(By.XPATH, "./ancestor::*[@role='gridcell'][1]")
    cell.find_element(By.TAG_NAME, "button").click()  # expand the parent
    names = [c.data.tags["mlflow.runName"] for c in children]
    assert names[:4] == ["trial-0000 (base)", "trial-0001 (vqa alone)", "trial-0002 (text alone)",
                         "trial-0003 (uniform average)"]
    body = wait_text(browser, *names)
    assert body.index("study-demo") < min(body.index(n) for n in names)
    time.sleep(1)
    shot(browser, tmp_path, "mlflow_ui")


def test_the_study_runs_plots_render(ui, browser, study_runs, tmp_path):
    from selenium.webdriver.common.by import By

    exp, parent, _ = study_runs
    plots = ["optimization_history.png", "param_importances.png", "weights_vs_depth.png"]
    browser.get(f"{ui}/#/experiments/{exp.experiment_id}/runs/{parent.info.run_id}"
                f"/artifacts/plots/{plots[0]}")
    wait_text(browser, "config.yaml", *plots)  # the artifact tree, plots/ opened
    for name in plots:
        # a person clicks the file in the tree (a new URL within the page selects nothing)
        browser.find_element(By.XPATH, f"//*[normalize-space(text())='{name}']").click()
        wait_text(browser, f"plots/{name}")  # the viewer's title: this file is shown
        end = time.monotonic() + 60
        width = 0
        while time.monotonic() < end and not width:
            # the viewer shows the file as a blob: image (icons are data: URLs)
            images = [i for i in browser.find_elements(By.TAG_NAME, "img")
                      if (i.get_attribute("src") or "").startswith("blob:")]
            width = max([browser.execute_script(
                "return arguments[0].complete ? arguments[0].naturalWidth : 0", i)
                for i in images] + [0])
            time.sleep(0.5)
        assert width >= 400, f"{name}: no rendered image (naturalWidth {width})"
        shot(browser, tmp_path, f"plot_{name.removesuffix('.png')}")


def test_a_trials_recipe_is_readable(ui, browser, study_runs, tmp_path):
    exp, parent, children = study_runs
    best = parent.data.tags["vlmexp.best_run"]
    browser.get(f"{ui}/#/experiments/{exp.experiment_id}/runs/{best}/artifacts/recipe.yaml")
    body = wait_text(browser, "vlmexp_recipe: 1", "method: task_arithmetic", "components:")
    assert "vision:" in body and "weight:" in body
    shot(browser, tmp_path, "recipe")


def test_compare_shows_the_searched_weights_by_name(ui, browser, study_runs, tmp_path):
    exp, parent, children = study_runs
    ids = [c.info.run_id for c in children[:4]]
    browser.get(f"{ui}/#/compare-runs?runs={json.dumps(ids)}"
                f"&experiments={json.dumps([exp.experiment_id])}")
    body = wait_text(browser, "trial-0001 (vqa alone)", "components.vision.vqa.weight",
                     "optuna.language_embed_head.text.weight", "objective.combined")
    assert "components.language.text.weight" in body
    shot(browser, tmp_path, "compare")
