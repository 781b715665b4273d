"""web/views.py: what the dashboard's pages show, as pure functions."""
from types import SimpleNamespace

from budwood.web.views import MISSING, live_state, render_card, safe_next


def test_after_login_only_a_dashboard_path_on_this_site():
    root = "/dashboard"
    assert safe_next("/dashboard/jobs/ftjob-1?x=1", root) == "/dashboard/jobs/ftjob-1?x=1"
    for hostile in ("https://evil.example/dashboard", "//evil.example/dashboard", "/\\evil.example", "/other",
                    "/dashboardx", None, ""):
        assert safe_next(hostile, root) == root, hostile


def test_a_card_is_rendered_without_its_raw_html_and_links_its_own_files():
    text = "---\nlicense: mit\n---\n# Card\n<!-- hidden -->\n<script>x()</script>\n![loss](loss.png) [up](../x.md)\n"
    html = render_card(text, "/dashboard/adapters/a/b/files/1.0.0", {"loss.png"})
    assert "<script>" not in html and "&lt;script&gt;" in html and "hidden" not in html and "license" not in html
    assert 'src="/dashboard/adapters/a/b/files/1.0.0/loss.png"' in html and 'href="../x.md"' in html


def test_live_state_shows_an_estimate_only_while_running():
    job = SimpleNamespace(status="running", progress={"step": 1200, "total_steps": 5000, "tokens_per_s": 812.4},
                          estimated_finish=0.0)
    state = live_state(job)
    assert state["progress"] == "1,200 / 5,000" and state["tokens_per_s"] == "812" and not state["finished"]
    assert state["estimated_finish"] == "1970-01-01 00:00:00 UTC"
    done = live_state(SimpleNamespace(status="succeeded", progress={}, estimated_finish=0.0))
    assert done["finished"] and done["estimated_finish"] == MISSING and done["progress"] == MISSING
