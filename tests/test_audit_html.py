"""report.html of an audit, rendered by headless Chromium (Debian's `chromium` package): what the page shows,
and that a screenshot renders."""

import json
import re
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import main
from onnxproxy.audit_report import _ticks, gain_chart
from tests.conftest import DEFAULT_MODEL

CHROMIUM = Path("/usr/bin/chromium")
needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install chromium)")


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    if not DEFAULT_MODEL.exists():
        pytest.skip(f"{DEFAULT_MODEL} not present yet")
    out = tmp_path_factory.mktemp("audit") / "run"
    options = ["--nodes", "conv2,fc,logits", "--units-per-node", "3", "--steps", "4", "--seeds", "1", "--device", "cpu",
               "--quiet", "--out", str(out)]
    result = CliRunner().invoke(main, ["audit", str(DEFAULT_MODEL), *options])
    assert result.exit_code == 0, result.output
    return out, json.loads((out / "audit.json").read_text())


def chromium(tmp_path, *arguments):
    command = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp_path / 'profile'}", *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


@needs_chromium
def test_the_rendered_page_shows_table_images_and_gain_plot(audited, tmp_path):
    out, document = audited
    dom = chromium(tmp_path, "--dump-dom", (out / "report.html").as_uri()).stdout
    for node in document["nodes"]:
        assert f"<code>{node['node']}</code></h2>" in dom
    table = dom[dom.index('<table class="summary">'):dom.index("</table>")]
    assert table.count("<tr>") == 2 + len(document["nodes"])  # two header rows
    images = re.findall(r'<img src="([^"]+)"', dom)
    assert len(images) == len(document["results"]) == 3 * 3 * 2
    assert all(src.startswith("data:image/png;base64,") for src in images)
    chart = dom[dom.index('class="gain-chart"'):dom.index("</svg>")]
    assert chart.count('class="bar ') == len(document["nodes"])
    assert chart.count("<circle") == 3 * len(document["nodes"])
    assert not re.search(r'(src|href)="(https?:)?//', dom)  # self-contained: nothing fetched from elsewhere


@needs_chromium
def test_a_screenshot_renders(audited, tmp_path):
    out, _ = audited
    screenshot = tmp_path / "report.png"
    chromium(tmp_path, f"--screenshot={screenshot}", "--window-size=1200,1600", (out / "report.html").as_uri())
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 20_000


def test_gain_axis_has_round_ticks_around_zero():
    assert _ticks(-1.07, 0.0) == pytest.approx([-1.5, -1.0, -0.5, 0.0])
    assert _ticks(0.0, 0.0) == [0.0, 0.2]
    assert 0.0 in _ticks(-3.3, 12.0)


def test_bars_start_at_zero_and_point_the_way_of_the_median():
    rows = [{"gain": gain, "unit": index} for index, gain in enumerate([-2.0, 1.0, 3.0])]
    summary = {"node": "n", "median_gain": 1.0, "proxygrad_higher": 2, "compared_units": 3, "units": rows}
    chart = gain_chart([summary, {**summary, "node": "m", "median_gain": -2.0}])
    rising, falling = chart["rows"]
    assert rising["bar_x"] == pytest.approx(chart["zero"]) and rising["rising"]
    assert falling["bar_x"] + falling["bar_width"] == pytest.approx(chart["zero"]) and not falling["rising"]
    assert gain_chart([{**summary, "median_gain": None}]) is None
