"""The CLI's one error boundary: a BudwoodError from any command, nested groups included, is one line and exit 2;
a bug keeps its traceback."""
import typer
from typer.testing import CliRunner

from budwood.cli import app
from budwood.cli.boundary import EXIT_BAD_INPUT, BoundaryGroup
from budwood.errors import BudwoodError


def _app() -> typer.Typer:
    root = typer.Typer(cls=BoundaryGroup)
    sub = typer.Typer()

    @root.command("refuse")
    def refuse() -> None:
        raise BudwoodError("data.jsonl:3: bad_json: not valid JSON")

    @root.command("bug")
    def bug() -> None:
        raise KeyError("ours")

    @sub.command("deep")
    def deep() -> None:
        raise BudwoodError("nested refusal")

    root.add_typer(sub, name="group")
    return root


def test_a_refusal_is_one_line_and_exit_2():
    done = CliRunner().invoke(_app(), ["refuse"])
    assert done.exit_code == EXIT_BAD_INPUT == 2
    assert done.stderr.strip() == "error: data.jsonl:3: bad_json: not valid JSON"


def test_nested_groups_are_inside_the_boundary():
    done = CliRunner().invoke(_app(), ["group", "deep"])
    assert done.exit_code == 2 and "error: nested refusal" in done.stderr


def test_a_bug_is_not_swallowed():
    done = CliRunner().invoke(_app(), ["bug"])
    assert isinstance(done.exception, KeyError)


def test_the_real_app_reports_a_missing_config_through_the_boundary(tmp_path):
    done = CliRunner().invoke(app, ["train", str(tmp_path / "nope.yaml")])
    assert done.exit_code == 2 and "no such config file" in done.stderr and "Traceback" not in done.stderr


def test_every_command_family_is_registered():
    names = set(typer.main.get_command(app).commands)
    assert {"train", "data", "demo", "eval", "card", "sign", "verify", "publish", "pull", "keys", "merge", "compose",
            "serve", "service", "worker", "tenants"} <= names


def test_an_option_error_is_blamed_on_the_option_not_on_a_set_never_given():
    done = CliRunner().invoke(app, ["eval", "--target", "budwood-tiny", "--precision", "xx"])
    assert done.exit_code == 2 and "error: --precision: precision: Input should be" in done.stderr, done.stderr
    done = CliRunner().invoke(app, ["eval", "--target", "budwood-tiny", "--suite", "groundin"])
    assert "error: --suite: suites: unknown suite 'groundin' (did you mean 'grounding'?)" in done.stderr
    done = CliRunner().invoke(app, ["eval", "--target", "budwood-tiny", "--set", "limt=3"])
    assert "error: --set limt: unknown key 'limt' (did you mean 'limit'?)" in done.stderr
