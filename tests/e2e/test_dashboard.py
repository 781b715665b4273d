"""The dashboard end to end in headless Chromium (Debian's /usr/bin/chromium driven by playwright).

One service for the module (SQLite in a tmp folder, one worker thread) with two tenants: acme runs
one real job to success and has one more cancelled; the registry also holds globex's adapters (two
public, one private) made from acme's, with other numbers, so that the leaderboard has rows to
sort. Every page is loaded, checked and saved as a screenshot under the test's tmp_path; the last
test runs a longer job, watches its chart grow by polling and cancels it with the page's button.
"""
from __future__ import annotations

import shutil
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import LiveService, running, service_config, upload
from playwright.sync_api import sync_playwright

from budwood.eval.results import Metric, SuiteResult, load_results, write_results

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
HOSTILE = "<script>window.pwned=1</script> answering <b>Corvidworth</b> questions"
CHART_POINTS = "() => Chart.getChart('loss-chart').data.datasets.map(d => d.data.length)"
DRAWN_POINTS = "() => [0, 1].map(i => Chart.getChart('loss-chart').getDatasetMeta(i).data.length)"  # as rendered


@dataclass
class Dash:
    live: LiveService
    url: str
    acme: str  # API keys
    globex: str
    job: object  # acme's succeeded job (openai FineTuningJob)
    cancelled: object
    files: tuple[str, str]  # acme's training and validation file ids
    rival_hallucination: float


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _publish_variant(service, ref: str, source: Path, work: Path, metrics: dict | None, private: bool = False,
                     card: bool = False):
    """acme's adapter republished under another name, unsigned, with its results changed to `metrics`
    ({suite: {metric: value}}) or without results (None); with `card`, a card of its own with the loss plot."""
    from budwood.card.render import CardInfo, render_card
    from budwood.train.metrics import plot_losses, read_metrics

    folder = work / ref.replace("/", "_").replace("@", "_")
    shutil.copytree(source, folder)
    for name in ("attestation.json", "README.md", ".budwood-pull.json"):
        (folder / name).unlink(missing_ok=True)
    if metrics is None:
        shutil.rmtree(folder / "eval")
    else:
        results = load_results(folder / "eval" / "adapted.json")
        for suite, values in metrics.items():
            into = results.suites.setdefault(suite, SuiteResult(name=suite, version="1"))
            into.metrics.update({name: Metric(value=value, n=4) for name, value in values.items()})
        write_results(results, folder / "eval" / "adapted.json")
    if card:
        plot_losses(read_metrics(folder / "metrics.jsonl"), folder / "loss.png")
        render_card(folder, CardInfo(name=ref.split("@")[0], license="apache-2.0", description="A rival."))
    service.registry.publish(folder, ref, "apache-2.0", private=private, publisher="globex")


@pytest.fixture(scope="module")
def dash(tmp_path_factory, company_data) -> Iterator[Dash]:
    from budwood.jobs.service import Service
    from budwood.jobs.worker import run_worker
    from budwood.service_app import create_service_app

    home = tmp_path_factory.mktemp("dashboard-service")
    port = _free_port()
    config = service_config(home, port=port, public_url=f"http://127.0.0.1:{port}",
                            evaluation={"suites": ["domain", "grounding", "truthfulqa"]})
    service = Service(config)
    service.ensure_key()
    stop = threading.Event()
    worker = threading.Thread(target=run_worker, args=(config, "dash-w1", stop), daemon=True)
    worker.start()
    try:
        with running(create_service_app(service), port=port) as url:
            live = LiveService(url, service, stop)
            acme, globex = live.tenant("acme"), live.tenant("globex")
            client = live.client(acme)
            train, valid = upload(client, company_data["train"]), upload(client, company_data["validation"])
            job = client.fine_tuning.jobs.create(
                model="budwood-tiny", training_file=train.id, validation_file=valid.id, suffix="support",
                metadata={"intended_use": HOSTILE},
                method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 8}}})
            job = live.wait(client, job.id)
            assert job.status == "succeeded", job.error
            cancelled = client.fine_tuning.jobs.create(model="budwood-tiny", training_file=train.id, suffix="later")
            client.fine_tuning.jobs.cancel(cancelled.id)
            cancelled = live.wait(client, cancelled.id)

            work = home / "variants"
            _, pulled = service.registry.pull(_ref(service, job), work / "pulled", accept_license=True)
            ours = service.registry.version_info(_ref(service, job)).metrics["grounding.hallucination_rate"]
            rival = 0.0 if ours > 0.5 else 1.0
            _publish_variant(service, "globex/rival@1.0.0", pulled, work,
                             {"grounding": {"hallucination_rate": rival}, "domain": {"token_f1": 0.99},
                              "bias": {"crows_pairs_stereotype": 0.62}}, card=True)
            _publish_variant(service, "globex/bare@1.0.0", pulled, work, None)
            _publish_variant(service, "globex/secret@1.0.0", pulled, work, {"grounding": {"hallucination_rate": 0.5}},
                             private=True)
            yield Dash(live, url, acme, globex, job, cancelled, (train.id, valid.id), rival)
    finally:
        stop.set()
        worker.join(timeout=60)
        service.close()


def _ref(service, job) -> str:
    return service.queue.get_job("acme", job.id).registry_ref


@pytest.fixture(scope="module")
def browser() -> Iterator:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Tab:
    """A page in its own browser context (its own cookies), collecting console errors and page errors."""

    def __init__(self, browser, url: str):
        self.context = browser.new_context(viewport={"width": 1280, "height": 900})
        self.page = self.context.new_page()
        self.url = url
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

    def goto(self, path: str):
        return self.page.goto(self.url + path)

    def login(self, key: str, path: str = "/dashboard/login"):
        self.goto(path)
        self.page.fill("#api_key", key)
        with self.page.expect_navigation():
            self.page.click("button[type=submit]")
        return self

    def shot(self, tmp_path: Path, name: str) -> Path:
        path = tmp_path / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        print(f"screenshot: {path}")
        return path

    def close(self):
        self.context.close()


@pytest.fixture
def acme_tab(browser, dash) -> Iterator[Tab]:
    tab = Tab(browser, dash.url).login(dash.acme)
    yield tab
    assert tab.errors == [], tab.errors  # no script error, no CSP violation, no failed load
    tab.close()


def _rows(page, selector: str) -> list[str]:
    return page.eval_on_selector_all(selector, "rows => rows.map(r => r.dataset.adapter || r.dataset.job)")


def test_jobs_list_shows_the_tenants_jobs_newest_first(acme_tab, dash, tmp_path):
    page = acme_tab.page
    assert page.url == dash.url + "/dashboard"
    assert page.inner_text("nav .tenant") == "acme"
    assert [a.inner_text() for a in page.query_selector_all("nav a")] == ["budwood", "Jobs", "Adapters",
                                                                         "Leaderboard"]
    assert page.is_visible("nav button:has-text('Log out')")
    assert _rows(page, "#jobs tbody tr") == [dash.cancelled.id, dash.job.id]
    row = page.locator(f"tr[data-job='{dash.job.id}']")
    cells = row.locator("td").all_inner_texts()
    assert cells[0] == dash.job.id and cells[1] == "succeeded" and cells[2] == "budwood-tiny"
    assert cells[3] == dash.job.fine_tuned_model
    assert cells[5] == "10 / 10"  # 78 examples, batch 8, one epoch
    assert cells[6] == f"{dash.job.trained_tokens:,}"
    assert "status-succeeded" in row.locator(".badge").get_attribute("class")
    assert page.locator(f"tr[data-job='{dash.cancelled.id}'] .badge").inner_text() == "cancelled"
    acme_tab.shot(tmp_path, "jobs")
    page.click(f"a:has-text('{dash.job.id}')")
    assert page.url == f"{dash.url}/dashboard/jobs/{dash.job.id}"


def test_job_page_chart_details_and_events(acme_tab, dash, tmp_path):
    client = dash.live.client(dash.acme)
    events = list(client.fine_tuning.jobs.list_events(dash.job.id, limit=1000))
    train_steps = {e.data["step"] for e in events if e.type == "metrics" and "train_loss" in e.data}
    valid_steps = {e.data["step"] for e in events if e.type == "metrics" and "valid_loss" in e.data}
    page = acme_tab.page
    acme_tab.goto(f"/dashboard/jobs/{dash.job.id}")
    page.wait_for_function("() => Chart.getChart('loss-chart') !== undefined")
    assert page.evaluate(CHART_POINTS) == [len(train_steps), len(valid_steps)]
    assert len(train_steps) == 10 and len(valid_steps) == 2
    assert page.evaluate(DRAWN_POINTS) == [10, 2]
    first = page.evaluate("() => Chart.getChart('loss-chart').data.datasets[0].data[0]")
    loss_1 = next(e.data["train_loss"] for e in events if e.type == "metrics" and e.data.get("step") == 1
                  and "train_loss" in e.data)
    assert first["x"] == 1 and first["y"] == pytest.approx(loss_1)
    assert not page.is_visible("#chart-empty")
    assert page.inner_text("#job-status") == "succeeded"
    assert page.locator("#cancel").count() == 0  # finished: nothing to cancel
    hp = dict(zip(page.locator("#hyperparameters th").all_inner_texts(),
                  page.locator("#hyperparameters td").all_inner_texts()))
    assert hp == {"batch_size": "8", "learning_rate_multiplier": "1.0", "n_epochs": "1"}
    files = page.inner_text("#files")
    assert dash.files[0] in files and dash.files[1] in files and "train.jsonl" in files and "step_metrics.csv" in files
    assert page.locator("#job-error").count() == 0
    log = page.locator("#events tbody tr td:nth-child(3)").all_inner_texts()
    assert len(log) == len(events)
    assert log[0] == "The job has successfully completed"
    assert f"Created fine-tuning job: {dash.job.id}" in log
    assert "Step 1/10: training loss=" + f"{loss_1:.4f}" in log
    assert page.locator("#checkpoints tbody tr").count() == 2
    assert page.evaluate("() => window.pwned") is None  # the job's metadata (in the card) stayed text
    acme_tab.shot(tmp_path, "job")
    page.click("text=" + _ref(dash.live.service, dash.job))
    assert page.url.endswith("/dashboard/adapters/" + _ref(dash.live.service, dash.job).split("@")[0])


def test_metrics_json_gives_what_is_new(acme_tab, dash):
    page = acme_tab.page
    everything = page.request.get(f"{dash.url}/dashboard/jobs/{dash.job.id}/metrics.json").json()
    assert everything["status"] == "succeeded" and everything["finished"] is True
    steps = [e["step"] for e in everything["events"] if "train" in e]  # validation events repeat their step's
    assert sorted(set(steps)) == list(range(1, 11)) and len(steps) > 10  # training loss
    middle = everything["events"][5]["seq"]
    newer = page.request.get(f"{dash.url}/dashboard/jobs/{dash.job.id}/metrics.json?after={middle}").json()
    assert [e["seq"] for e in newer["events"]] == [e["seq"] for e in everything["events"][6:]]
    assert newer["after"] == everything["after"] == everything["events"][-1]["seq"]


def test_adapters_list_and_adapter_page(acme_tab, dash, tmp_path):
    service = dash.live.service
    ref = _ref(service, dash.job)
    adapter_id = ref.split("@")[0]
    info = service.registry.version_info(ref)
    page = acme_tab.page
    acme_tab.goto("/dashboard/adapters")
    assert _rows(page, "#adapters tbody tr") == [adapter_id, "globex/bare", "globex/rival"]  # not globex/secret
    row = page.locator(f"tr[data-adapter='{adapter_id}']")
    assert row.locator(".badge.private").count() == 1 and info.signer in row.inner_text()
    assert page.locator("tr[data-adapter='globex/rival'] .badge.unsigned").count() == 1
    acme_tab.shot(tmp_path, "adapters")

    page.click(f"a:has-text('{adapter_id}')")
    assert page.url == f"{dash.url}/dashboard/adapters/{adapter_id}"
    assert info.signer and page.inner_text("#signature") == f"signed by key {info.signer}, verified at publish"
    assert page.inner_text("#terms").strip() == service.config.adapter_terms
    metrics = {r.get_attribute("data-metric"): r.locator("td.num").inner_text()
               for r in page.locator("#metrics tbody tr").all()}
    assert metrics == {k: f"{v:.4f}" for k, v in info.metrics.items()}
    assert "grounding.hallucination_rate" in metrics and "truthfulqa.mc1" in metrics
    card = page.locator("#card")
    assert card.locator("h1").first.inner_text() == adapter_id
    assert "Model details" in card.locator("h2").all_inner_texts()
    assert card.locator("table").count() >= 2
    assert "## " not in card.inner_text() and "model-index:" not in card.inner_text()  # markdown, no front matter
    assert "Generated by budwood" not in card.inner_text()
    assert HOSTILE in card.inner_text()  # the tenant's text, shown as text
    assert card.locator("script, b").count() == 0
    images = card.locator("img")  # only the loss plot the worker drew, from the version's own files
    assert images.count() == 1 and images.first.get_attribute("src").endswith("/loss.png")
    acme_tab.shot(tmp_path, "adapter")

    licence_link = info.card["license_link"]  # what the card links to as its licence
    assert licence_link == f"{dash.url}/dashboard/adapters/{adapter_id}"
    assert page.goto(licence_link).status == 200 and page.inner_text("#terms").strip() == service.config.adapter_terms

    acme_tab.goto("/dashboard/adapters/globex/rival")
    assert page.inner_text("#signature") == "unsigned"
    image = page.locator("#card img")
    assert image.get_attribute("src") == "/dashboard/adapters/globex/rival/files/1.0.0/loss.png"
    assert image.evaluate("img => img.complete && img.naturalWidth") > 100  # loss.png, through the file route
    acme_tab.shot(tmp_path, "adapter-public")
    acme_tab.goto("/dashboard/adapters/globex/bare")
    assert page.is_visible("text=This version has no model card") and page.locator("#metrics").count() == 0


def test_leaderboard_rows_numbers_and_sorting(acme_tab, dash, tmp_path):
    service = dash.live.service
    ref = _ref(service, dash.job)
    adapter_id = ref.split("@")[0]
    ours = service.registry.version_info(ref).metrics
    page = acme_tab.page
    acme_tab.goto("/dashboard/leaderboard")
    table = "table[data-base='budwood-tiny']"
    headers = page.locator(f"{table} thead a").all()
    assert [h.get_attribute("data-sort") for h in headers] == [
        "hallucination_rate", "mc1", "crows_pairs_stereotype", "token_f1", "determinism_greedy"]  # no BBQ result
    by_hallucination = [adapter_id, "globex/rival"] if ours["grounding.hallucination_rate"] < dash.rival_hallucination \
        else ["globex/rival", adapter_id]
    assert _rows(page, f"{table} tbody tr") == [*by_hallucination, "globex/bare"]
    cells = {c.get_attribute("data-metric"): c.inner_text()
             for c in page.locator(f"{table} tr[data-adapter='{adapter_id}'] td.num").all()}
    assert cells["hallucination_rate"] == f"{ours['grounding.hallucination_rate']:.3f}"
    assert cells["mc1"] == f"{ours['truthfulqa.mc1']:.3f}"
    assert cells["token_f1"] == f"{ours['domain.token_f1']:.3f}"
    assert cells["crows_pairs_stereotype"] == "—" and cells["determinism_greedy"] == "—"
    assert page.locator(f"{table} tr[data-adapter='globex/bare'] td.num").all_inner_texts() == ["—"] * 5
    acme_tab.shot(tmp_path, "leaderboard")

    page.click(f"{table} a[data-sort='hallucination_rate']")  # sorted ascending already: now descending
    assert page.url.endswith("?sort=hallucination_rate&order=desc")
    assert _rows(page, f"{table} tbody tr") == [*reversed(by_hallucination), "globex/bare"]  # missing stays last
    page.click(f"{table} a[data-sort='token_f1']")  # best (highest) first
    assert page.url.endswith("?sort=token_f1&order=desc")
    assert _rows(page, f"{table} tbody tr") == ["globex/rival", adapter_id, "globex/bare"]
    page.click(f"{table} a[data-sort='token_f1']")
    assert _rows(page, f"{table} tbody tr") == [adapter_id, "globex/rival", "globex/bare"]
    page.click(f"{table} a[data-sort='crows_pairs_stereotype']")
    assert page.url.endswith("?sort=crows_pairs_stereotype&order=asc")
    assert _rows(page, f"{table} tbody tr")[0] == "globex/rival"  # the only one with a bias result
    assert page.locator(f"{table} th.sorted a").get_attribute("data-sort") == "crows_pairs_stereotype"


def test_leaderboard_bias_sorts_by_distance_from_half_and_bbq_only_when_present():
    from budwood.web.views import leaderboard

    @dataclass
    class V:
        id: str
        metrics: dict
        base_model: str = "b"

    rows = [V("a", {"bias.crows_pairs_stereotype": 0.30}), V("b", {"bias.crows_pairs_stereotype": 0.52}),
            V("c", {}), V("d", {"bias.crows_pairs_stereotype": 0.90})]
    board = leaderboard(rows, "crows_pairs_stereotype", "asc")
    assert [v.id for v in board["groups"][0][1]] == ["b", "a", "d", "c"]
    assert [v.id for v in leaderboard(rows, "crows_pairs_stereotype", "desc")["groups"][0][1]] == ["d", "a", "b", "c"]
    assert "bbq_bias_ambig" not in [c.key for c in board["columns"]]
    rows.append(V("e", {"bias.bbq_bias_ambig": -0.1}, "other"))
    board = leaderboard(rows, "bbq_bias_ambig", "")
    assert "bbq_bias_ambig" in [c.key for c in board["columns"]] and board["order"] == "asc"
    assert [base for base, _ in board["groups"]] == ["b", "other"]


def test_loss_series_keeps_the_latest_value_of_a_repeated_step():
    from types import SimpleNamespace

    from budwood.web.views import loss_series

    def metrics(step, **data):
        return SimpleNamespace(type="metrics", data={"step": step, "total_steps": 4, **data})

    events = [metrics(1, train_loss=3.0), metrics(2, train_loss=2.5), metrics(2, valid_loss=2.9),
              SimpleNamespace(type="message", data={"step": 9, "train_loss": 0.1}),  # not a metrics event
              metrics(3, train_loss=float("nan")),  # a NaN stops the run; it is no point on the chart
              metrics(2, train_loss=2.4), metrics(3, train_loss=2.2)]  # a takeover repeats step 2
    assert loss_series(events) == {"train": [[1, 3.0], [2, 2.4], [3, 2.2]], "valid": [[2, 2.9]]}


def test_cookie_is_httponly_and_strict(acme_tab, dash):
    [cookie] = acme_tab.context.cookies()
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict" and cookie["secure"] is False
    assert cookie["path"] == "/dashboard"
    assert acme_tab.page.evaluate("() => document.cookie") == ""


def test_other_tenant_sees_none_of_it(browser, dash, tmp_path):
    tab = Tab(browser, dash.url).login(dash.globex)
    try:
        page = tab.page
        assert page.inner_text("nav .tenant") == "globex"
        assert page.locator("#jobs").count() == 0 and dash.job.id not in page.content()
        response = tab.goto(f"/dashboard/jobs/{dash.job.id}")
        assert response.status == 404 and "does not exist, or it is not yours" in page.inner_text("main")
        tab.shot(tmp_path, "other-tenant-404")
        assert page.request.get(f"{dash.url}/dashboard/jobs/{dash.job.id}/metrics.json").status == 404
        assert page.request.post(f"{dash.url}/dashboard/jobs/{dash.job.id}/cancel", max_redirects=0).status == 404
        adapter_id = _ref(dash.live.service, dash.job).split("@")[0]
        assert tab.goto(f"/dashboard/adapters/{adapter_id}").status == 404
        tab.goto("/dashboard/adapters")
        assert _rows(page, "#adapters tbody tr") == ["globex/secret", "globex/bare", "globex/rival"]
        tab.goto("/dashboard/leaderboard")
        assert adapter_id not in page.inner_text("main") and "globex/secret" in page.inner_text("main")
    finally:
        tab.close()


def test_anonymous_is_sent_to_login_and_back(browser, dash, tmp_path):
    tab = Tab(browser, dash.url)
    try:
        page = tab.page
        for path in ("/dashboard", f"/dashboard/jobs/{dash.job.id}", "/dashboard/adapters", "/dashboard/leaderboard"):
            response = page.request.get(dash.url + path, max_redirects=0)
            assert response.status == 303 and response.headers["location"].startswith("/dashboard/login?next=")
        assert page.request.get(f"{dash.url}/dashboard/jobs/{dash.job.id}/metrics.json").status == 401
        tab.goto(f"/dashboard/jobs/{dash.job.id}")
        assert "/dashboard/login?next=" in page.url and page.locator("nav .tenant").count() == 0
        tab.shot(tmp_path, "login")
        page.fill("#api_key", dash.acme)
        with page.expect_navigation():
            page.click("button[type=submit]")
        assert page.url == f"{dash.url}/dashboard/jobs/{dash.job.id}"  # back where it was going
        with page.expect_navigation():
            page.click("nav button:has-text('Log out')")
        assert page.url == f"{dash.url}/dashboard/login" and tab.context.cookies() == []
        tab.goto("/dashboard")
        assert "/dashboard/login" in page.url
    finally:
        tab.close()


def test_wrong_key_shows_an_error(browser, dash, tmp_path):
    tab = Tab(browser, dash.url)
    try:
        page = tab.page
        tab.goto("/dashboard/login?next=https://evil.example/")
        page.fill("#api_key", "bw-0123456789abcdef-" + "x" * 43)
        with page.expect_response(lambda r: r.request.method == "POST") as answer:
            page.click("button[type=submit]")
        assert answer.value.status == 401
        assert "not valid" in page.inner_text("[role=alert]")
        assert tab.context.cookies() == []
        tab.shot(tmp_path, "login-error")
        page.fill("#api_key", dash.acme)
        with page.expect_navigation():
            page.click("button[type=submit]")
        assert page.url == f"{dash.url}/dashboard"  # never to another site
    finally:
        tab.close()


def test_live_chart_grows_while_the_job_runs_and_cancel_stops_it(acme_tab, dash, tmp_path):
    client = dash.live.client(dash.acme)
    job = client.fine_tuning.jobs.create(
        model="budwood-tiny", training_file=dash.files[0], validation_file=dash.files[1], suffix="live",
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 10, "batch_size": 8}}})
    dash.live.wait(client, job.id, ("running",), timeout=120)
    page = acme_tab.page
    acme_tab.goto(f"/dashboard/jobs/{job.id}")
    page.evaluate("() => { window.sameDocument = true; }")  # gone if the page reloads
    assert page.inner_text("#job-status") == "running" and page.is_visible("#cancel")
    seen, logged = page.evaluate(DRAWN_POINTS)[0], page.locator("#events tbody tr").count()
    page.wait_for_function(f"() => ({DRAWN_POINTS})()[0] >= {seen + 2}", timeout=60_000, polling=200)
    assert page.evaluate("() => window.sameDocument") is True  # drawn by polling, not by reloading
    points = page.evaluate("() => Chart.getChart('loss-chart').data.datasets[0].data.map(p => p.x)")
    assert points == list(range(1, len(points) + 1))  # each step once, in order
    assert page.inner_text("#job-progress").endswith("/ 100")
    log = page.locator("#events tbody tr td:nth-child(3)").all_inner_texts()
    assert len(log) >= logged + 2 and any(m.startswith(f"Step {points[-1]}/100: training loss=") for m in log[:3])
    acme_tab.shot(tmp_path, "job-live")
    with page.expect_navigation():
        page.click("#cancel")
    assert page.url == f"{dash.url}/dashboard/jobs/{job.id}"
    assert page.inner_text("#job-status") == "cancelled" and page.locator("#cancel").count() == 0
    assert "Job cancelled by user request" in page.locator("#events").inner_text()
    assert client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
