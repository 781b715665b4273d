import pytest
import torch

from budwood.errors import ModelError
from budwood.models.generate import chat_generate, load_for_generation


def test_only_safetensors_adapters_load(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    torch.save({"x": torch.zeros(1)}, tmp_path / "adapter_model.bin")
    with pytest.raises(ModelError, match="no adapter_model.safetensors"):
        load_for_generation("budwood-tiny", tmp_path)


def test_base_model_answers_and_stops(tiny_tokenizer):
    model, tok = load_for_generation("budwood-tiny")
    answers = chat_generate(model, tok, ["Who wrote Treasure Island?", "Continue the story: Once upon a time"],
                            max_new_tokens=120)
    assert len(answers) == 2 and all(a and "<|end|>" not in a for a in answers)
    # greedy budwood-tiny answers this in one sentence and ends its turn there (no run-on text)
    assert "Stevenson" in answers[0] and len(answers[0]) < 80 and "\n" not in answers[0]
