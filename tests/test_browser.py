"""`crate browse`: the static site's data files, and the pages in a real headless Chromium (Playwright)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from crate.cli import main
from test_report_helpers import NASTY, make_paper_like

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
INSTALL = "apt-get install -y chromium && pip install playwright  (never `playwright install`)"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    root = make_paper_like(tmp_path_factory.mktemp("results"))
    out = root / "browser"
    assert main(["browse", str(root / "interpret"), "--out", str(out)]) == 0
    return out


def _data(path: Path) -> dict:
    text = path.read_text()
    return json.loads(text[text.index("=", text.index("CB.")) + 1:].rstrip().rstrip(";"))


def test_data_files_escape_and_scale(site: Path) -> None:
    index = _data(site / "data" / "index.js")
    names = {m["name"] for m in index["models"]}
    assert names == {"crate-2L", "gpt-2L", "crate-2L-random-init", "crate-S", "gpt-S"}
    crate = next(m for m in index["models"] if m["name"] == "crate-2L")
    assert [(L["layer"], L["n"], L["n_scored"]) for L in crate["layers"]] == [("0", 4, 3), ("1", 2, 2)]
    layer = _data(site / "data" / "crate-2L" / "0.js")
    by_n = {n["n"]: n for n in layer["neurons"]}
    assert by_n[1]["scores"]["TaR"] == pytest.approx(20.0) and by_n[3]["scores"] == {"TaR": None}  # NaN score
    assert by_n[1]["explanation"].endswith("commas and periods") and by_n[0]["max"] == pytest.approx(1.0)
    raw = (site / "data" / "crate-2L" / "0" / "1.js").read_text()
    assert "<" not in raw and "&" not in raw  # inert even if inlined into a page
    neuron = _data(site / "data" / "crate-2L" / "0" / "1.js")
    assert neuron["top"][0]["tokens"][:len(NASTY)] == NASTY  # the text survives exactly
    assert [r["id"] for r in neuron["scored"]["TaR"]["records"]] == ["top:1", "random:0"]
    assert neuron["scored"]["TaR"]["records"][0]["tokens"][6] == " t1_6"  # tokens looked up by record id
    for page in ("index.html", "layer.html", "neuron.html"):
        html = (site / page).read_text()
        assert not re.search(r"(src|href)=\"(https?:)?//", html), page  # self-contained: no CDN, no network
        assert "innerHTML" not in html


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip(f"chromium is not installed: {INSTALL}")
    sync_api = pytest.importorskip("playwright.sync_api", reason=f"playwright is not installed: {INSTALL}")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def _open(browser, url: str, wait: str):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("dialog", lambda d: errors.append(f"dialog {d.message}") or d.dismiss())  # an injected alert()
    page.goto(url)
    page.wait_for_selector(wait, timeout=10_000)
    return page, errors


def test_pages_in_chromium(browser, site: Path, tmp_path: Path) -> None:
    base = site.resolve().as_uri() + "/"
    page, errors = _open(browser, base + "index.html", "table")
    assert page.locator("table.models tr").count() - 2 == 2 + 2 + 2 + 6 + 6  # (model, layer) rows under two sizes
    page.fill("#search", "commas periods")
    page.wait_for_selector("#hit-table")
    # odd neurons are "commas and periods": crate-2L 1,3 | 1; gpt-2L 1 | 1; random-init 1 | -; crate-S 1 x 6; gpt-S 1 x 6
    assert page.locator("#hit-table tr").count() - 1 == 2 + 1 + 2 + 1 + 6 + 6
    assert not errors, errors

    page, errors = _open(browser, base + "layer.html?m=crate-2L,gpt-2L&l=0", "table.neurons")
    assert page.locator("table.neurons").count() == 2  # CRATE and GPT side by side
    first = lambda: page.locator("table.neurons").first.locator("tr").nth(1).locator("td").first.inner_text()  # noqa: E731
    assert first() == "#2"  # sorted by score, best first (30 > 20 > 10 > NaN)
    page.locator("table.neurons").first.locator("th[data-key=score0]").click()
    assert first() == "#0"  # ascending: 10 first, NaN still last
    page.fill("#filter", "names")
    assert page.locator("table.neurons").first.locator("tr").count() == 1 + 2
    assert not errors, errors

    page, errors = _open(browser, base + "neuron.html?m=crate-2L&l=0&n=1", "#top-records .rec")
    assert page.locator("#top-records .rec").count() == 10 and page.locator("#random-records .rec").count() == 4
    text = page.locator("#top-records .rec").first.inner_text()
    assert "<script>alert('x')</script>" in text and "&amp;" in text and "</td>" in text  # shown, never run
    scored = page.locator("section.scored[data-protocol=TaR]")
    assert "score 20.00" in scored.locator("h2").inner_text()
    assert "commas and periods" in scored.locator(".expl").inner_text()
    assert scored.locator(".rec").count() == 4  # 2 scoring records x (true, simulated)
    shot = tmp_path / "neuron.png"
    page.screenshot(path=str(shot), full_page=False)
    assert shot.stat().st_size > 10_000
    shutil.copy(shot, "/tmp/browser_screenshot.png")
    assert not errors, errors

    page, errors = _open(browser, base + "neuron.html?m=crate-2L&l=0&n=999", ".err")
    assert "missing data file" in page.locator(".err").inner_text()  # a clear message for a neuron without data
