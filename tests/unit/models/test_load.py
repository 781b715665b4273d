import pytest
import torch

from budwood.errors import ModelError
from budwood.models.fingerprint import model_fingerprint
from budwood.models.load import TINY_DIR, load_base, pick_dtype, resolve_model_path


def test_names_resolve_to_the_shipped_model_a_folder_or_a_hub_id(tmp_path):
    assert resolve_model_path("budwood-tiny") == str(TINY_DIR)
    assert resolve_model_path(str(TINY_DIR)) == str(TINY_DIR)
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model_path(str(tmp_path))
    for bad in ("../../etc", "/no/such/dir", "a/b/c", "org/../x", "bad name"):
        with pytest.raises(ModelError):
            resolve_model_path(bad)


def test_tiny_model_is_a_small_llama_with_a_chat_template_that_stops():
    base = load_base("budwood-tiny", dtype=torch.float32)
    assert base.model.config.model_type == "llama"
    assert 5e6 < sum(p.numel() for p in base.model.parameters()) < 20e6
    tok = base.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|assistant|>\n")
    assert tok.eos_token == "<|end|>" and base.model.generation_config.eos_token_id == tok.eos_token_id
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    out = base.model.generate(**ids, max_new_tokens=120, do_sample=False)
    assert tok.eos_token_id in out[0, ids["input_ids"].shape[1]:].tolist(), "generation never ended its turn"


def test_fingerprint_is_stable_cached_and_content_addressed(tmp_path, monkeypatch):
    import shutil

    import budwood.models.fingerprint as fp

    monkeypatch.setattr(fp, "CACHE", tmp_path / "cache.json")
    a = model_fingerprint("budwood-tiny")
    assert a.startswith("sha256:") and a == model_fingerprint("budwood-tiny")
    assert (tmp_path / "cache.json").exists()
    copy = tmp_path / "copy"
    shutil.copytree(TINY_DIR, copy)
    assert model_fingerprint(str(copy)) == a
    cfg = (copy / "config.json").read_text().replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": 1e-06')
    (copy / "config.json").write_text(cfg)
    assert model_fingerprint(str(copy)) != a


def test_precision_auto_picks_bf16_only_where_fast():
    assert pick_dtype("fp32", torch.device("cpu")) == torch.float32
    assert pick_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert pick_dtype("auto", torch.device("cpu")) in (torch.float32, torch.bfloat16)
    with pytest.raises(ModelError):
        pick_dtype("fp8", torch.device("cpu"))
