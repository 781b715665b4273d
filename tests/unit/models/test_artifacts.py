"""The adapter directory's file set: what is signed, published and pulled."""
from budwood.artifacts import ARTIFACT_PATH, AdapterDir


def test_calibration_travels_with_the_adapter(tmp_path):
    for name in ("adapter_config.json", "adapter_model.safetensors", "budwood.json", "calibration.json"):
        (tmp_path / name).write_text("{}")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "notes.txt").write_text("local only")
    files = AdapterDir.open(tmp_path).files()
    assert "calibration.json" in files and "notes.txt" not in files
    assert ARTIFACT_PATH.match("calibration.json") and not ARTIFACT_PATH.match("calibration.json.bak")
