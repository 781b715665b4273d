"""The core install (no extras) trains, evaluates and serves; each extra's feature says which extra it needs."""
import subprocess
import sys
import textwrap

EXTRAS = ["psycopg", "nevergrad", "python_multipart", "multipart", "markdown_it", "wandb", "mlflow", "tensorboard",
          "bitsandbytes", "torchao", "lm_eval"]

SCRIPT = textwrap.dedent('''
    import json, sys
    for name in EXTRAS:  # as if never installed: importing any of them fails
        sys.modules[name] = None
    from pathlib import Path
    from fastapi.testclient import TestClient
    from budwood import train
    from budwood.config import load_config
    from budwood.errors import BudwoodError
    from budwood.engine.engine import EngineConfig
    from budwood.eval.run import EvalConfig, run_eval
    from budwood.serve.app import create_app

    tmp = Path(sys.argv[1])
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(8)]
    (tmp / "d.jsonl").write_text("\\n".join(json.dumps(r) for r in rows))
    out = train(load_config(None, ["base_model=budwood-tiny", f"data.train={tmp / 'd.jsonl'}", "training.max_steps=2",
                                   f"output_dir={tmp / 'a'}", "training.compile=false", "training.precision=fp32"]))
    assert (out / "adapter_model.safetensors").is_file()
    print("trained")
    results = run_eval(EvalConfig(target=f"budwood-tiny+{out}", suites=["reproducibility"], limit=2, bootstrap=0))
    assert results.suites["reproducibility"].metrics
    print("evaluated")
    with TestClient(create_app(EngineConfig(base="budwood-tiny"))) as client:  # with: the app's lifespan runs
        r = client.post("/v1/chat/completions", json={"model": "budwood-tiny", "max_tokens": 3,
                                                       "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    print("served")
    from budwood.db.database import open_database
    from budwood.merge.compose import compose
    from budwood.service_app import create_service_app
    for call, extra in ((lambda: open_database("postgresql://u@localhost/db"), "postgres"),
                        (lambda: compose([str(out)], tmp / "d.jsonl", tmp / "c"), "merge"),
                        (lambda: create_service_app(None), "service")):
        try:
            call()
        except BudwoodError as e:
            assert f"pip install 'budwood[{extra}]'" in str(e), e
            print("refused:", extra)
        else:
            raise AssertionError(extra)
''').replace("EXTRAS", repr(EXTRAS))


def test_core_install_trains_evaluates_serves_and_names_each_extra(tmp_path):
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stdout.split() == ["trained", "evaluated", "served", "refused:", "postgres", "refused:", "merge",
                                "refused:", "service"]
