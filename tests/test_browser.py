"""Reports in a real browser: headless chromium driven by selenium (Debian's chromium + chromium-driver).

Each page must render every figure, log no SEVERE console message, request nothing from the
network, switch the position-aware QK heatmap when another (query, key) pair is picked, show
the same findings numbers as ``qkov analyze --json``, and render a ``<script>`` label as text.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from urllib.parse import urlparse

import numpy as np
import pytest

from qkov.cli import main
from qkov.report import gather, write_report

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs chromium and chromedriver (apt-get install chromium chromium-driver; .ci/run installs them)",
)

STEPS = {"max": 200, "add": 30}
LOCAL_SCHEMES = {"file", "data", "blob", "about", "chrome", "chrome-extension", "devtools"}
EVIL = "<script>window.__qkov_pwned = 1</script>"



@pytest.fixture(scope="module")
def driver():
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="qkov-chromium-")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--window-size=1300,1000", f"--user-data-dir={profile}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    d = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)   # an explicit driver: no download
    d.set_page_load_timeout(120)
    yield d
    d.quit()
    shutil.rmtree(profile, ignore_errors=True)


def _open(driver, path) -> dict:
    """Load a page, wait until every figure has drawn, and return its logs (read once)."""
    driver.get_log("browser"), driver.get_log("performance")                # drop earlier pages' entries
    driver.get(path.resolve().as_uri())
    n = driver.execute_script("return document.querySelectorAll('.qkov-figure').length")
    deadline = time.time() + 90
    drawn = -1
    while time.time() < deadline:
        drawn = driver.execute_script(
            "return document.querySelectorAll('.qkov-figure.js-plotly-plot svg.main-svg').length ? "
            "Array.from(document.querySelectorAll('.qkov-figure')).filter("
            "  d => d.classList.contains('js-plotly-plot') && d.querySelector('svg.main-svg')).length : 0")
        if drawn == n:
            break
        time.sleep(0.2)
    requests = []
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg["method"] in ("Network.requestWillBeSent", "Network.webSocketCreated"):
            requests.append(msg["params"].get("request", {}).get("url") or msg["params"].get("url"))
    return {"figures": n, "drawn": drawn, "console": driver.get_log("browser"), "requests": requests}


@pytest.fixture(scope="module", params=["max", "add"])
def page(request, short_trained, tmp_path_factory, driver):
    run = short_trained(request.param, STEPS[request.param])
    out = write_report(run.path, out=tmp_path_factory.mktemp("browser") / f"{request.param}.html")
    return {"task": request.param, "run": run, "path": out, **_open(driver, out)}


def test_every_figure_renders_without_errors(page):
    assert page["figures"] >= 9
    assert page["drawn"] == page["figures"], f"{page['drawn']} of {page['figures']} figures drew a plot"
    severe = [e for e in page["console"] if e["level"] == "SEVERE"]
    assert not severe, severe


def test_no_network_requests(page, driver):
    remote = [u for u in page["requests"] if urlparse(u).scheme not in LOCAL_SCHEMES]
    assert not remote, remote
    resources = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(urlparse(u).scheme in ("file", "data", "blob") for u in resources), resources


def _qk_state(driver, fid: str) -> dict:
    return driver.execute_script(
        "var gd = document.getElementById(arguments[0]); var im = gd.querySelector('.hm image');"
        "return {z: gd.data[0].z, title: gd.layout.title.text, image: im ? im.getAttribute('href') : null};", fid)


def test_qk_position_dropdown_changes_the_heatmap(page, driver):
    from selenium.webdriver.common.by import By

    fid = "fig-qk-positions-0-0"
    before = _qk_state(driver, fid)
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", driver.find_element(By.ID, fid))
    driver.find_element(By.CSS_SELECTOR, f"#{fid} .updatemenu-header").click()
    time.sleep(0.3)
    buttons = [b for b in driver.find_elements(By.CSS_SELECTOR, f"#{fid} .updatemenu-dropdown-button")
               if b.is_displayed() and b.text and b.text not in before["title"]]
    current = re.search(r"query at position (\d+), key at position (\d+)", before["title"]).groups()
    # the open list scrolls to the active pair; take the nearest other pair (clear of the mode bar)
    target = [b for b in buttons if b.text != f"query pos {current[0]}, key pos {current[1]}"][-1]
    label = target.text
    target.click()
    deadline = time.time() + 10
    after = _qk_state(driver, fid)
    while after["image"] == before["image"] and time.time() < deadline:
        time.sleep(0.1)
        after = _qk_state(driver, fid)
    q, k = map(int, re.match(r"query pos (\d+), key pos (\d+)", label).groups())
    assert f"query at position {q}, key at position {k}" in after["title"]
    assert after["image"] != before["image"], "the drawn heatmap did not change"
    assert np.asarray(after["z"]).shape == np.asarray(before["z"]).shape
    assert not np.array_equal(after["z"], before["z"])
    expected = gather(page["run"]).heads[0].qk_pairs[(q, k)]
    np.testing.assert_allclose(np.asarray(after["z"], dtype=float), expected, rtol=0, atol=1e-9)


def _numbers(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?", text)]


def test_findings_match_qkov_analyze_json(page, driver, capsys):
    capsys.readouterr()
    assert main(["analyze", str(page["run"].path), "--json"]) == 0
    expected = json.loads(capsys.readouterr().out)["findings"]
    shown = driver.execute_script(
        "return Array.from(document.querySelectorAll('#findings li.finding')).map("
        "  li => ({id: li.dataset.id, value: li.dataset.value, text: li.textContent}))")
    assert [s["id"] for s in shown] == [f["id"] for f in expected]
    for s, f in zip(shown, expected):
        assert json.loads(s["value"]) == f["value"]
        assert _numbers(s["text"]) == _numbers(f["text"]), (s["text"], f["text"])


def test_script_label_renders_as_text(short_trained, tmp_path, driver):
    run = short_trained("max", STEPS["max"])
    labels = [EVIL if i == 0 else str(i) for i in range(64)]   # tick 0 is always drawn
    out = write_report(run, out=tmp_path / "evil.html", token_labels=labels, title=f"run {EVIL}")
    opened = _open(driver, out)
    assert opened["drawn"] == opened["figures"]
    assert driver.execute_script("return window.__qkov_pwned === undefined")
    assert EVIL in driver.find_element("css selector", "h1").text
    ticks = driver.execute_script(
        "return Array.from(document.querySelectorAll('#fig-qk-0-0 .xtick text')).map(t => t.textContent)")
    assert EVIL in ticks
    assert not [e for e in opened["console"] if e["level"] == "SEVERE"]


def test_report_size(page):
    assert page["path"].stat().st_size < 10e6


def _rect(driver, fid: str, selector: str) -> dict:
    return driver.execute_script(
        "var el = document.querySelector('#' + arguments[0] + ' ' + arguments[1]);"
        "if (!el) return null; var r = el.getBoundingClientRect();"
        "return {left: r.left, right: r.right, top: r.top, bottom: r.bottom, width: r.width};", fid, selector)


def test_eigenvalue_title_is_clear_of_the_mode_bar_and_full_width(page, driver):
    from selenium.webdriver import ActionChains
    from selenium.webdriver.common.by import By

    fid = "fig-eigenvalues-0-0"
    el = driver.find_element(By.ID, fid)
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", el)
    ActionChains(driver).move_to_element(el).perform()              # the mode bar shows on hover
    title, bar = _rect(driver, fid, ".gtitle"), _rect(driver, fid, ".modebar")
    assert title is not None and bar is not None
    overlap = not (title["right"] <= bar["left"] or bar["right"] <= title["left"]
                   or title["bottom"] <= bar["top"] or bar["bottom"] <= title["top"])
    assert not overlap, (title, bar)
    width = _rect(driver, fid, "svg.main-svg")["width"]
    assert width == _rect(driver, "fig-ov-0-0", "svg.main-svg")["width"]   # as wide as the others


def test_positional_qk_leaves_acausal_cells_blank(page, driver):
    z = driver.execute_script("return document.getElementById('fig-positional-qk-0-0').data[0].z")
    n = len(z)
    assert all(z[q][k] is None for q in range(n) for k in range(q + 1, n))
    assert all(isinstance(z[q][k], (int, float)) for q in range(n) for k in range(q + 1))


WALKTHROUGH = ["52 59", "46 41 41", "35 14 47 61 38 54"]


def test_report_inputs_render_as_titled_panels(short_trained, tmp_path, driver):
    run = short_trained("max", STEPS["max"])
    out = write_report(run, out=tmp_path / "inputs.html", inputs=WALKTHROUGH)
    opened = _open(driver, out)
    assert opened["drawn"] == opened["figures"]
    assert not [e for e in opened["console"] if e["level"] == "SEVERE"]
    fig = driver.execute_script(
        "var gd = document.getElementById('fig-attention-0-0');"
        "return {titles: gd.layout.annotations.map(a => a.text), shapes: gd.data.map(t => [t.z.length, t.z[0].length]),"
        "        drawn: gd.querySelectorAll('.hm image').length};")
    assert fig["titles"] == ["52 59 → 59", "46 41 41 → 46", "35 14 47 61 38 54 → 61"]
    assert fig["shapes"] == [[2, 2], [3, 3], [6, 6]] and fig["drawn"] == 3
    shown = [t.text for t in driver.find_elements("css selector", "#fig-attention-0-0 .annotation-text")]
    assert shown == fig["titles"]


def test_pages_sharing_one_plotly_js_render_offline(short_trained, tmp_path, driver):
    from qkov.report import write_plotly_js

    write_plotly_js(tmp_path / "plotly.min.js")
    run = short_trained("max", STEPS["max"])
    out = write_report(run, out=tmp_path / "max" / "report.html", plotly_js="../plotly.min.js")
    assert out.stat().st_size < 2e6                                # plotly.js is not in the page
    opened = _open(driver, out)
    assert opened["figures"] >= 9 and opened["drawn"] == opened["figures"]
    assert all(urlparse(u).scheme in LOCAL_SCHEMES for u in opened["requests"]), opened["requests"]
    assert not [e for e in opened["console"] if e["level"] == "SEVERE"]
