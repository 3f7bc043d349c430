"""The dashboard in a real browser (Debian chromium through Playwright) against a live `safetrain up`.

Tests run in file order on one worker: the session's first job trains while the quick tests run, the browser's
job trains next, and the long job paused, resumed and cancelled comes last.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
from playwright.sync_api import Page, expect

from tests.dashboard.conftest import JOB_TIMEOUT, Dashboard

NewPage = Callable[..., Page]
XSS = "<img src=x onerror=window.__xss=1>"
LONG_RUN = {"use_lora": True, "lora_r": 4, "max_steps": 100_000, "save_steps": 10_000, "logging_steps": 5}


def metric_points(dashboard: Dashboard, job_id: str) -> dict[int, float]:
    """step -> train_loss of the job's metrics events (the newest event of a step wins)."""
    points: dict[int, float] = {}
    for event in dashboard.events(job_id):
        if event["type"] == "metrics":
            points.setdefault(int(event["data"]["step"]), float(event["data"]["train_loss"]))
    return points


def chart_points(page: Page, chart: str, series: str, count: int) -> list[tuple[float, float]]:
    """The (x, value) rows of a chart's data table for one series, as the page shows them (`count` of them)."""
    figure = page.locator("figure.chart").filter(has=page.get_by_role("img", name=chart, exact=True))
    details = figure.locator("details.data")
    if details.get_attribute("open") is None:
        details.locator("summary").click()
    rows = figure.locator(f"tbody tr[data-series='{series}']")
    expect(rows).to_have_count(count)
    return [(float(row.locator("td").nth(1).inner_text()), float(row.locator("td").nth(2).inner_text()))
            for row in rows.all()]


def drop_file(page: Page, slot: str, name: str, text: str) -> None:
    """Drop a file on the New job page's drop zone, as a user dragging it from their desktop."""
    page.evaluate(
        """([slot, name, text]) => {
            const data = new DataTransfer();
            data.items.add(new File([text], name, { type: "application/jsonl" }));
            const zone = document.querySelector(`.dropzone[data-slot="${slot}"]`);
            zone.dispatchEvent(new DragEvent("drop", { dataTransfer: data, bubbles: true, cancelable: true }));
        }""",
        [slot, name, text],
    )


def test_sign_in_keeps_the_key_in_storage_and_headers_only(dashboard: Dashboard, new_page: NewPage,
                                                           first_job: str) -> None:
    page = new_page(key=None)
    requests: list[tuple[str, str | None]] = []
    page.on("request", lambda request: requests.append((request.url, request.headers.get("authorization"))))
    answer = page.goto(dashboard.url + "/")
    assert answer is not None
    policy = answer.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy

    page.get_by_label("API key").fill("sk-st-not-a-key")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("not accepted")
    page.get_by_label("API key").fill(dashboard.key)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Jobs", exact=True)).to_be_visible()
    expect(page.get_by_role("region", name="Jobs list").get_by_role("link", name=first_job)).to_be_visible()
    expect(page.get_by_role("region", name="Queue").get_by_role("link", name=first_job)).to_be_visible()
    dashboard.screenshot(page, "jobs-first")

    page.reload()
    expect(page.get_by_role("link", name="New job")).to_be_visible()
    assert page.evaluate("localStorage.getItem('safetrain.apiKey')") == dashboard.key
    assert all(dashboard.key not in url for url, _ in requests), "the key must never be in a URL"
    api_calls = [auth for url, auth in requests if "/v1/" in url]
    assert api_calls and set(api_calls) == {f"Bearer {dashboard.key}", "Bearer sk-st-not-a-key"}

    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_label("API key")).to_be_visible()
    assert page.evaluate("localStorage.getItem('safetrain.apiKey')") is None


def test_bad_file_shows_the_servers_line_numbered_error(dashboard: Dashboard, new_page: NewPage,
                                                        tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\nnot json\n')
    page = new_page()
    page.goto(dashboard.url + "/#/new")
    page.get_by_label("Training file", exact=True).set_input_files(bad)
    expect(page.get_by_role("alert")).to_contain_text("Line 3")
    expect(page.get_by_label("Training file preview")).to_contain_text("not json")
    page.get_by_role("button", name="Create job").click()
    expect(page.get_by_role("alert").last).to_contain_text("training file")


def test_untrusted_text_is_shown_literally_and_never_runs(dashboard: Dashboard, new_page: NewPage,
                                                          tmp_path: Path) -> None:
    dataset = tmp_path / "x.jsonl"
    dataset.write_text(json.dumps({"prompt": f"Say {XSS}", "completion": f" {XSS}"}) + "\n" * 1
                       + json.dumps({"prompt": "b", "completion": " c"}) + "\n")
    file_id = dashboard.upload(dataset, name=f"{XSS}.jsonl")
    job_id = dashboard.submit(file_id, metadata={"note": XSS})
    dashboard.api("POST", f"/v1/fine_tuning/jobs/{job_id}/cancel")
    # The API refuses such a suffix; plant it (and an event message) the way stored rows could still hold them.
    with sqlite3.connect(Path(dashboard.stack.env["SAFETRAIN_DATA_DIR"]) / "safetrain.db") as db:
        db.execute("UPDATE jobs SET suffix = ? WHERE id = ?", (XSS, job_id))
        db.execute(
            "INSERT INTO job_events (id, job_id, attempt, created_at, level, type, message) "
            "VALUES (?, ?, 0, 0, 'warn', 'message', ?)",
            (f"ftevent-{uuid.uuid4().hex}", job_id, f"worker said {XSS}"),
        )

    page = new_page()
    page.goto(dashboard.url + "/#/jobs")
    expect(page.get_by_text(XSS, exact=True)).to_be_visible()  # the suffix under the job's id
    page.goto(dashboard.url + f"/#/jobs/{job_id}")
    expect(page.get_by_text(f"worker said {XSS}")).to_be_visible()
    expect(page.locator("dd", has_text=XSS)).to_have_count(2)  # suffix and metadata
    page.goto(dashboard.url + "/#/files")
    expect(page.get_by_text(f"{XSS}.jsonl", exact=True)).to_be_visible()
    page.goto(dashboard.url + "/#/new")
    drop_file(page, "training", f"{XSS}.jsonl", dataset.read_text())
    expect(page.get_by_label("Training file preview")).to_contain_text(f"Say {XSS}")
    expect(page.locator(".notice.ok")).to_contain_text(f"{XSS}.jsonl")
    page.goto(dashboard.url + f"/#/compare?ids={job_id},{job_id}")
    page.get_by_label("Only differences").uncheck()
    expect(page.get_by_role("table", name="Options of the compared jobs")).to_contain_text(XSS)
    assert page.evaluate("window.__xss") is None, "planted markup ran"
    assert page.locator("img").count() == 0
    dashboard.screenshot(page, "xss")


def test_another_projects_key_sees_none_of_the_first_projects(dashboard: Dashboard, new_page: NewPage,
                                                              first_job: str) -> None:
    page = new_page(key=dashboard.other_key)
    page.goto(dashboard.url + "/#/jobs")
    expect(page.get_by_text("No jobs yet")).to_be_visible()
    expect(page.get_by_text("Nothing of this project is running.")).to_be_visible()
    page.goto(dashboard.url + "/#/files")
    expect(page.get_by_text("No files yet.")).to_be_visible()
    page.goto(dashboard.url + f"/#/jobs/{first_job}")
    expect(page.get_by_role("alert")).to_contain_text("No such fine-tuning job")


def test_new_job_from_a_dropped_file_succeeds_with_charts_of_its_real_metrics(
    dashboard: Dashboard, new_page: NewPage, training_file: Path
) -> None:
    page = new_page()
    page.goto(dashboard.url + "/#/jobs")
    page.get_by_role("link", name="New job").click()
    drop_file(page, "training", "count.jsonl", training_file.read_text())
    expect(page.locator(".notice.ok")).to_contain_text("16 examples")
    expect(page.get_by_label("Training file preview")).to_contain_text("Count from 0:")
    drop_file(page, "validation", "held-out.jsonl", training_file.read_text())
    expect(page.locator(".notice.ok", has_text="held-out.jsonl")).to_be_visible()
    page.get_by_label("Model").select_option("huge-llama")  # a 400B config: its plan fits nowhere
    expect(page.get_by_text("does not fit", exact=True)).to_be_visible(timeout=60_000)  # the first plan imports torch
    page.get_by_label("Model").select_option("tiny-gpt2")
    for name, value in {"max_steps": "4", "logging_steps": "1", "save_steps": "2", "lora_r": "4"}.items():
        page.locator(f"input[name={name}]").fill(value)
    page.get_by_label("Suffix").fill("browser")
    page.get_by_label("Metadata").fill("team=dashboard")
    expect(page.get_by_label("Memory estimate")).to_contain_text("total")
    expect(page.get_by_text("fits", exact=True)).to_be_visible()
    dashboard.screenshot(page, "new-job")
    page.get_by_role("button", name="Create job").click()

    page.wait_for_url("**/#/jobs/ftjob-*")
    job_id = page.url.rsplit("/", 1)[1]
    job = dashboard.job(job_id)
    assert job["metadata"] == {"team": "dashboard"} and job["training"]["max_steps"] == 4
    expect(page.locator(".page-head .badge")).to_have_text("succeeded", timeout=JOB_TIMEOUT * 1000)
    expect(page.get_by_role("button", name="Download")).to_be_visible()
    expect(page.get_by_role("button", name="Pause")).to_be_disabled()
    expect(page.get_by_role("button", name="Cancel")).to_be_disabled()

    losses = metric_points(dashboard, job_id)
    assert sorted(losses) == [1, 2, 3, 4]
    loss_chart = page.get_by_role("img", name="Loss", exact=True)
    expect(loss_chart.locator("path[data-label='train loss']")).to_have_attribute("data-points", "4")
    assert chart_points(page, "Loss", "train loss", 4) == sorted(losses.items())
    telemetry = dashboard.api("GET", f"/v1/fine_tuning/jobs/{job_id}/telemetry")["data"]
    rss = [(float(row["step"]), float(row["sample"]["rss_bytes"])) for row in telemetry]
    assert rss, "the trainer reported no memory samples"
    expect(page.get_by_role("img", name="Memory", exact=True).locator("path[data-label='RSS']")).to_have_attribute(
        "data-points", str(len(rss)))
    assert chart_points(page, "Memory", "RSS", len(rss)) == rss
    checkpoints = dashboard.api("GET", f"/v1/fine_tuning/jobs/{job_id}/checkpoints")["data"]
    validation = sorted((float(c["step_number"]), float(c["metrics"]["eval_loss"])) for c in checkpoints)
    assert [step for step, _ in validation] == [2.0, 4.0]
    assert chart_points(page, "Loss", "validation loss", 2) == validation
    expect(page.locator(".chart .summary").first).to_contain_text("at step 4")
    expect(page.get_by_text("ckpt-step-4")).to_be_visible()

    expect(page.get_by_role("link", name="Try in Playground")).to_have_attribute(
        "href", f"#/playground?model={dashboard.job(job_id)['fine_tuned_model'].replace(':', '%3A')}")
    with page.expect_download() as download:
        page.get_by_role("button", name="Download").click()
    assert download.value.suggested_filename.endswith(".zip")
    assert Path(download.value.path()).read_bytes()[:2] == b"PK"
    dashboard.screenshot(page, "job")


def test_compare_two_jobs_overlays_their_losses_and_diffs_their_options(
    dashboard: Dashboard, new_page: NewPage, first_job: str
) -> None:
    dashboard.wait_status(first_job, {"succeeded"})
    page = new_page()
    page.goto(dashboard.url + "/#/jobs?status=succeeded")
    expect(page.get_by_label("Status")).to_have_value("succeeded")
    rows = page.locator("tbody tr[data-job]")
    expect(rows.first).to_be_visible()
    assert all(row.locator(".badge").inner_text() == "succeeded" for row in rows.all())
    shown = [row.get_attribute("data-job") for row in rows.all()]
    browser_job = next(job_id for job_id in shown if job_id != first_job)
    page.get_by_label(f"Select {first_job} to compare").check()
    page.get_by_label(f"Select {browser_job} to compare").check()
    page.get_by_role("button", name="Compare selected").click()

    chart = page.get_by_role("img", name="Loss", exact=True)
    for job_id in (first_job, browser_job):
        expected = str(len(metric_points(dashboard, job_id)))
        expect(chart.locator(f"path[data-label^='{job_id}']")).to_have_attribute("data-points", expected)
    diff = page.get_by_role("table", name="Options of the compared jobs")
    expect(diff.locator("tr.diff-row", has_text="training_file")).to_be_visible()
    expect(diff.locator("tr", has_text="metadata.team")).to_contain_text("dashboard")
    for axis in ("epoch", "tokens"):
        page.get_by_label("X axis").select_option(axis)
        expect(chart.locator("path.series")).to_have_count(2)
    tokens = dashboard.job(browser_job)["trained_tokens"]
    expect(page.locator(".chart .summary")).to_contain_text(f"at tokens {tokens:,}")
    dashboard.screenshot(page, "compare")


def test_playground_streams_the_fine_tuned_model_and_its_base_side_by_side(dashboard: Dashboard,
                                                                            new_page: NewPage) -> None:
    tuned = next(job["fine_tuned_model"] for job in dashboard.api("GET", "/v1/fine_tuning/jobs")["data"]
                 if job["user_provided_suffix"] == "browser")
    page = new_page()
    page.goto(f"{dashboard.url}/#/playground?model={tuned}")
    expect(page.get_by_label("Fine-tuned model")).to_have_value(tuned)
    expect(page.get_by_label("Base model")).to_have_value("tiny-gpt2")
    page.get_by_label("Message").fill("Count from 3:")
    page.get_by_label("Max tokens").fill("4")
    page.get_by_role("button", name="Send").click()
    # The engine loads the base on its first request; a random tiny model may well answer in whitespace.
    page.wait_for_function(
        """() => [...document.querySelectorAll("main .grid section")].every(
            (panel) => panel.querySelector("pre").textContent.length > 0 || panel.querySelector(".notice"))""",
        timeout=150_000,
    )
    expect(page.locator("main .grid .notice")).to_have_count(0)
    dashboard.screenshot(page, "playground")


def test_narrow_viewport_has_no_sideways_scroll(dashboard: Dashboard, new_page: NewPage, first_job: str) -> None:
    page = new_page(width=390, height=844)
    routes = ("#/jobs", f"#/jobs/{first_job}", "#/new", f"#/compare?ids={first_job},{first_job}", "#/files",
              "#/playground")
    for route in routes:
        page.goto(f"{dashboard.url}/{route}")
        page.wait_for_load_state("networkidle")
        widths = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
        assert widths[0] <= widths[1], f"{route} scrolls sideways at 390 px: {widths}"
    dashboard.screenshot(page, "job-narrow")


def test_pause_resume_cancel_follow_the_jobs_state(dashboard: Dashboard, new_page: NewPage,
                                                   training_file: Path) -> None:
    job_id = dashboard.submit(dashboard.upload(training_file), training=LONG_RUN)
    page = new_page()
    page.goto(f"{dashboard.url}/#/jobs/{job_id}")
    expect(page.get_by_role("button", name="Resume")).to_be_disabled()
    status = page.locator(".page-head .badge")
    expect(status).to_have_text("running", timeout=JOB_TIMEOUT * 1000)
    loss = page.get_by_role("img", name="Loss", exact=True)
    expect(loss.locator("path.series")).to_have_count(1, timeout=JOB_TIMEOUT * 1000)
    jobs = new_page()
    jobs.goto(f"{dashboard.url}/#/jobs")
    expect(jobs.get_by_role("region", name="Queue").get_by_role("link", name=job_id)).to_be_visible()
    dashboard.screenshot(jobs, "jobs")
    page.get_by_role("button", name="Pause").click()
    expect(status).to_have_text("paused", timeout=60_000)
    expect(page.get_by_role("button", name="Pause")).to_be_disabled()
    assert dashboard.job(job_id)["status"] == "paused"
    page.get_by_role("button", name="Resume").click()
    expect(page.get_by_role("button", name="Resume")).to_be_disabled()
    assert dashboard.job(job_id)["status"] in {"queued", "validating_files", "running"}
    page.get_by_role("button", name="Cancel").click()
    expect(status).to_have_text("cancelled", timeout=60_000)
    expect(page.get_by_role("button", name="Cancel")).to_be_disabled()
    dashboard.wait_status(job_id, {"cancelled"})
    events = [event["message"] for event in dashboard.events(job_id)]
    assert "Job resumed" in events and any("ancel" in message for message in events)


def test_static_files_are_served_with_the_policy(dashboard: Dashboard) -> None:
    index = httpx.get(f"{dashboard.url}/")
    assert index.status_code == 200 and "text/html" in index.headers["content-type"]
    assert "<script" in index.text and "/dashboard/js/app.js" in index.text
    script = httpx.get(f"{dashboard.url}/dashboard/js/app.js")
    assert script.headers["content-type"].startswith("text/javascript")
    assert script.headers["content-security-policy"] == index.headers["content-security-policy"]
    again = httpx.get(f"{dashboard.url}/dashboard/js/app.js", headers={"If-None-Match": script.headers["etag"]})
    assert again.status_code == 304
    for missing in ("/dashboard/../api/app.py", "/dashboard/nope.js", "/dashboard/%2e%2e/__init__.py"):
        assert httpx.get(f"{dashboard.url}{missing}").status_code == 404


def test_long_series_are_downsampled_keeping_their_extremes(dashboard: Dashboard, new_page: NewPage) -> None:
    page = new_page()
    page.goto(dashboard.url + "/")
    drawn = page.evaluate(
        """async () => {
            const { downsample } = await import("/dashboard/js/chart.js");
            const n = 100000, xs = [], ys = [];
            for (let i = 0; i < n; i += 1) { xs.push(i); ys.push(Math.sin(i / 500)); }
            ys[54321] = 40;  // one spike among 100,000 points
            ys[77777] = -40;
            const started = performance.now();
            const out = downsample(xs, ys, (x) => (x / n) * 724);
            return { count: out.xs.length, max: Math.max(...out.ys), min: Math.min(...out.ys),
                     first: out.xs[0], last: out.xs[out.xs.length - 1], ms: performance.now() - started };
        }"""
    )
    assert drawn["count"] <= 4 * 725 and drawn["max"] == 40 and drawn["min"] == -40
    assert drawn["first"] == 0 and drawn["last"] == 99999
    assert drawn["ms"] < 200, drawn
