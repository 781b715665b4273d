from budwood.cli import app

app(prog_name="budwood")
