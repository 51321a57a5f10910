"""Screenshots of the MLflow UI on a runs folder's store: the experiment's runs table and the compare view of its two
latest pipeline runs, written to docs/. What a user sees after `make demo` and a second run, checked by eye.

Needs Chromium (Debian: `apt-get install chromium`) and Playwright, kept out of the project's dependencies:

    python3.11 -m venv .venv-shots && .venv-shots/bin/pip install playwright==1.65.2
    .venv-shots/bin/python scripts/mlflow_screenshots.py --runs runs --out docs

It starts a real `mlflow server` (the project's .venv) on the folder's sqlite store on a free loopback port, finds
the experiment and its runs through MLflow's REST API, and drives headless Chromium with Playwright.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Flags that keep Chromium from reaching for the network at start (a closed network refuses it, noisily).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(url: str, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"{url}/api/2.0/mlflow/{path}", data=data,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def wait_up(url: str, server: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"mlflow server exited with {server.returncode}")
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    sys.exit(f"mlflow server did not answer on {url} within {timeout:.0f} s")


def close_assistant(page) -> None:
    """Close MLflow 3.17's assistant side panel, which opens by default and narrows the page: its Close button is
    the top-right-most one (the shared-view banner has another)."""
    boxes = [b for b in (c.bounding_box() for c in page.locator("button[aria-label='Close']").all()) if b]
    if boxes:
        box = max(boxes, key=lambda b: b["x"] - b["y"])
        page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        page.wait_for_timeout(1500)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="runs folder holding mlflow.db")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--experiment", default="unpoison")
    args = parser.parse_args()
    store = args.runs.resolve() / "mlflow.db"
    if not store.exists():
        sys.exit(f"no MLflow store at {store}; run a pipeline first (make demo) or pass --runs")
    from playwright.sync_api import sync_playwright

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([str(ROOT / ".venv" / "bin" / "mlflow"), "server", "--backend-store-uri",
                               f"sqlite:///{store}", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_up(url, server)
        experiment = api(url, f"experiments/get-by-name?experiment_name={args.experiment}")["experiment"]
        runs = api(url, "runs/search", {"experiment_ids": [experiment["experiment_id"]],
                                        "filter": "tags.`unpoison.defense` != ''",
                                        "order_by": ["attributes.start_time DESC"], "max_results": 50})["runs"]
        parents = [r["info"]["run_id"] for r in runs
                   if not any(t["key"] == "mlflow.parentRunId" for t in r["data"].get("tags", []))][:2]
        if len(parents) < 2:
            sys.exit("the compare view needs two pipeline runs in the store; run a second defense first")
        args.out.mkdir(parents=True, exist_ok=True)
        exp = experiment["experiment_id"]
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 2400, "height": 900})
            page.goto(f"{url}/#/experiments/{exp}/runs?viewStateShareKey=unpoison")  # tracking.ui_link
            page.wait_for_timeout(8000)  # the UI polls, so the network never idles: give it time to render
            close_assistant(page)
            page.screenshot(path=str(args.out / "mlflow-runs.png"))
            compare = f"{url}/#/compare-runs?runs={json.dumps(parents)}&experiments={json.dumps([exp])}"
            page.set_viewport_size({"width": 2400, "height": 2800})  # the page scrolls inside a panel: show it whole
            page.goto(compare.replace(" ", ""))
            page.wait_for_timeout(8000)
            close_assistant(page)
            page.screenshot(path=str(args.out / "mlflow-compare.png"))
            browser.close()
        print(f"wrote {args.out / 'mlflow-runs.png'} and {args.out / 'mlflow-compare.png'}")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
