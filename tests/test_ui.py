"""What a user opens, rendered by a real browser: Debian's `chromium`, headless, with a fresh
profile each time (no remembered UI choices). `make test-ui` installs it and runs these.

- the HTML report: its sections are there and every chart decodes to a non-empty image;
- the MLflow UI of a finished `methodlab train` run, on a local `mlflow server`: the page the
  report links to is the runs table (not MLflow 3's GenAI overview), with the Dataset column filled.

Set METHODLAB_UI_SHOTS=<dir> to keep the screenshots (they go to the test's tmp dir otherwise).
"""

from __future__ import annotations

import html as htmllib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from methodlab.config import load_config
from methodlab.registry import method_names
from methodlab.report import ROLE_LABEL_TAG, ROLE_TAG, write_report
from methodlab.tracking import METHOD_TAG, Tracker
from tests.conftest import tiny

pytestmark = pytest.mark.ui

# Written into a copy of the report only: once the page has loaded, each image's decoded size.
PROBE = """<script>addEventListener("load", () => document.body.setAttribute("data-images", JSON.stringify(
  [...document.images].map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight]))));</script>"""


def chromium(tmp_path: Path, url: str, *flags: str, budget_ms: int = 15000) -> str:
    """chromium's stdout for `url` (with --dump-dom: the DOM once scripts have run and the
    virtual-time budget, which waits out pending fetches, is spent)."""
    exe = shutil.which("chromium")
    if exe is None:
        pytest.fail("chromium is not installed; `make test-ui` installs it (apt-get install -y chromium)")
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    proc = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--hide-scrollbars", "--no-first-run", f"--user-data-dir={profile}",
                           f"--virtual-time-budget={budget_ms}", *flags, url],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def screenshot(tmp_path: Path, url: str, name: str, size: str) -> Path:
    shots = Path(os.environ.get("METHODLAB_UI_SHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    out = shots / f"{name}.png"
    chromium(tmp_path, url, f"--window-size={size}", f"--screenshot={out}")
    from PIL import Image

    with Image.open(out) as im:
        colors = im.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colors is None or len(colors) > 16, f"{out} is (nearly) blank"     # None: more than 65536
    return out


def text_of(dom: str) -> str:
    body = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return htmllib.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", body)))


def test_the_report_renders_with_its_sections_and_decoded_charts(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("METHODLAB_BENCH_TRACKING_URI", uri)        # the committed results, recorded here
    runs = Tracker(uri, "methodlab")
    run_id = runs.start_run("toast-ui", {}, {METHOD_TAG: "toast", ROLE_TAG: "method", ROLE_LABEL_TAG: "toast"}, "x: 1\n")
    runs.log_metrics(run_id, {"test_acc": 0.5}, 0)
    runs.end_run(run_id, "FINISHED")
    report = write_report(uri, str(tmp_path / "report.html"))
    source = report.read_text()
    probe = tmp_path / "probe.html"
    probe.write_text(source.replace("</body>", PROBE + "</body>"))

    dom = chromium(tmp_path, probe.as_uri(), "--dump-dom", budget_ms=5000)
    ids = re.findall(r'<(?:section|h2|table|h3)[^>]* id="([^"]+)"', dom)
    assert ids.index("claims") < ids.index("claim-table") < ids.index("methods") < ids.index("infrastructure")
    assert [i for i in ids if i.startswith("method-")] and {f"method-{m}" for m in method_names()} <= set(ids)
    assert {"bench-overhead", "bench-toast"} <= set(ids)
    assert ids.index("method-toast") < ids.index("bench-toast") < ids.index("infrastructure") < ids.index("bench-overhead")
    claims = json.loads((Path(__file__).parents[1] / "bench" / "results" / "quality.json").read_text())["claims"]
    table = dom[dom.index('id="claim-table"'):]
    assert table[:table.index("</table>")].count("</tr>") == 1 + len(claims) + len({c["method"] for c in claims})
    images = json.loads(htmllib.unescape(re.search(r'<body[^>]* data-images="([^"]*)"', dom).group(1)))
    assert len(images) == source.count("<img ") >= 10
    bad = [alt for alt, complete, w, h in images if not (complete and w > 100 and h > 50)]
    assert bad == [], f"charts that did not decode: {bad}"

    shot = screenshot(tmp_path, report.as_uri(), "report", "1250,3000")
    assert shot.stat().st_size > 20_000


@pytest.mark.slow
def test_mlflow_ui_opens_a_finished_run_on_the_runs_table_with_its_dataset(ray_cluster, home, mlflow_server, tmp_path):
    from methodlab.train.launch import train

    summary = train(load_config("supervised", None, tiny("supervised", f"tracking.uri={mlflow_server.uri}")))
    tracker = Tracker(mlflow_server.uri, "methodlab")
    dataset = tracker.client.get_run(summary.run_id).inputs.dataset_inputs[0].dataset
    report = write_report(mlflow_server.uri, str(tmp_path / "report.html"), record=False).read_text()
    link = htmllib.unescape(re.search(r'<a id="mlflow-experiment" href="([^"]+)"', report).group(1))
    assert link.startswith(f"{mlflow_server.uri}/#/experiments/{tracker.experiment_id}/")

    def page(url: str) -> tuple[str, str, str]:
        """(title, the experiment's side navigation, all text) of the page a fresh browser opens."""
        dom = chromium(tmp_path, url, "--dump-dom", "--window-size=1400,900")
        nav = " ".join(text_of(n) for n in re.findall(r"<nav\b.*?</nav>", dom, flags=re.S))
        return re.search(r"<title>(.*?)</title>", dom).group(1), nav, text_of(dom)

    title, nav, text = page(link)
    # the runs table of the "Model training" workflow: its navigation is Runs / Models / Traces,
    # not the GenAI one (Overview, Judges, Evaluation runs, ...), and nothing of token usage
    assert title.startswith("Runs - "), title
    assert "Runs" in nav and "Models" in nav and "Overview" not in nav and "Judges" not in nav, nav
    assert "Token Usage" not in text and "Run Name" in text and summary.run_name in text
    # the Dataset column: MLflow renders an input as "name (digest)" in the run's row
    assert "Dataset" in text and f"{dataset.name} ({dataset.digest})" in text, text[:2000]
    screenshot(tmp_path, link, "mlflow-runs", "1400,900")
    # Why the link carries report.UI_QUERY: without it MLflow 3.17 opens the same experiment,
    # experimentKind tag and all, on the GenAI overview.
    bare, nav, _ = page(f"{mlflow_server.uri}/#/experiments/{tracker.experiment_id}")
    assert bare.startswith("Overview - ") and "Judges" in nav, (bare, nav)
