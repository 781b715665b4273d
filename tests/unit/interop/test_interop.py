"""Axolotl and LLaMA-Factory configs (their own example files, configs/examples/) read as budwood's."""
import json
from pathlib import Path

import pytest

from budwood.config import load_config
from budwood.errors import ConfigError
from budwood.interop import Dialect, convert, load_train_config, to_yaml

EXAMPLES = Path(__file__).resolve().parents[3] / "configs" / "examples"


def test_axolotl_lora_example_maps_every_key():
    c = convert(EXAMPLES / "axolotl" / "lora-1b.yml")
    assert c.dialect is Dialect.AXOLOTL
    cfg, _ = load_train_config(EXAMPLES / "axolotl" / "lora-1b.yml")
    assert cfg.base_model == "NousResearch/Llama-3.2-1B" and cfg.quantization == "none"
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (16, 32, 0.05)
    assert cfg.lora.target_modules == ["gate_proj", "down_proj", "up_proj", "q_proj", "v_proj", "k_proj", "o_proj"]
    assert [(s.path, s.format) for s in cfg.data.sources] == [("teknium/GPT4-LLM-Cleaned", "alpaca")]
    t = cfg.training
    assert (t.max_seq_len, t.batching, t.batch_size, t.gradient_accumulation, t.epochs) == (2048, "packed", 2, 2, 1)
    assert (t.optimizer, t.scheduler, t.learning_rate, t.warmup_steps, t.weight_decay) == (
        "adamw_8bit", "cosine", 2e-4, 10, 0.0)
    assert (t.precision, t.gradient_checkpointing, t.evals_per_epoch, t.saves_per_epoch) == ("auto", True, 4, 1)
    assert (t.loss_watchdog_threshold, t.loss_watchdog_patience) == (5.0, 3)
    assert cfg.data.validation_split == 0.1 and cfg.logging.every == 1
    assert str(cfg.output_dir) == "outputs/lora-out"
    noted = {n.split(":")[0] for n in c.notes}
    assert {"pad_to_sequence_len", "flash_attention", "special_tokens", "dataset_prepared_path"} <= noted


def test_axolotl_qlora_and_chat_template_examples():
    q, _ = load_train_config(EXAMPLES / "axolotl" / "qlora-1b.yml")
    assert q.quantization == "nf4" and q.training.optimizer == "adamw_8bit" and q.training.warmup_ratio == 0.1
    assert (q.lora.r, q.lora.alpha) == (32, 16)
    i, _ = load_train_config(EXAMPLES / "axolotl" / "instruct-lora-8b.yml")
    assert i.quantization == "int8" and i.lora.target_modules == "all-linear"
    assert i.data.chat_template == "llama3" and i.data.sources[0].format == "openai"
    assert i.data.sources[0].roles == {} and i.data.validation_split == 0.05  # {user: [user]} renames nothing


def test_refusals_name_the_key_and_what_to_do(tmp_path):
    path = tmp_path / "ax.yml"
    path.write_text("base_model: x/y\nadapter: lora\ndatasets:\n  - path: d.jsonl\n    type: completion\n"
                    "lora_rr: 8\nfp16: true\ndeepspeed: ds.json\ntrain_on_inputs: true\nhub_model_id: me/out\n"
                    "wandb_project:\nfsdp_config:\n")
    with pytest.raises(ConfigError) as e:
        convert(path)
    text = str(e.value)
    assert "read as axolotl config; 6 key(s) budwood cannot honour" in text
    assert "lora_rr: budwood does not know this axolotl key (did you mean 'lora_r'?)" in text
    assert "fp16: True: budwood trains in bf16 or fp32; set bf16: true" in text
    assert "deepspeed: 'ds.json': budwood distributes with torchrun" in text
    assert "train_on_inputs: True: budwood trains on the assistant turns only" in text
    assert "hub_model_id: 'me/out': budwood does not upload while training; after it: budwood export" in text
    assert "datasets[0].type: 'completion'" in text
    assert "wandb_project" not in text and "fsdp_config" not in text  # empty keys ask for nothing


def test_full_fine_tune_and_conflicting_quantisation_are_refused(tmp_path):
    path = tmp_path / "full.yml"
    path.write_text("base_model: x/y\ndatasets: [{path: d.jsonl}]\nload_in_4bit: true\nload_in_8bit: true\n")
    with pytest.raises(ConfigError, match="(?s)adapter: missing: without it Axolotl fine-tunes every weight.*"
                                          "load_in_8bit: and load_in_4bit are both true"):
        convert(path)


def _llama_factory_data(root: Path) -> None:
    data = root / "data"
    data.mkdir()
    (data / "identity.json").write_text(json.dumps(
        [{"instruction": "hi", "input": "", "output": f"I am budwood {i}."} for i in range(4)]))
    (data / "alpaca_en_demo.json").write_text(json.dumps(
        [{"instruction": f"Double {i}.", "input": "", "output": str(2 * i)} for i in range(6)]))
    (data / "dpo_en_demo.json").write_text(json.dumps(
        [{"conversations": [{"from": "human", "value": f"Is {i} even?"}],
          "chosen": {"from": "gpt", "value": "yes" if i % 2 == 0 else "no"},
          "rejected": {"from": "gpt", "value": "no" if i % 2 == 0 else "yes"}} for i in range(4)]))
    (data / "dataset_info.json").write_text(json.dumps({
        "identity": {"file_name": "identity.json"},
        "alpaca_en_demo": {"file_name": "alpaca_en_demo.json"},
        "dpo_en_demo": {"file_name": "dpo_en_demo.json", "ranking": True, "formatting": "sharegpt",
                        "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}}}))


def test_llama_factory_examples_with_their_dataset_info(tmp_path, monkeypatch):
    from budwood.models.load import load_tokenizer
    from budwood.train.data import prepare_data

    _llama_factory_data(tmp_path)
    monkeypatch.chdir(tmp_path)
    cfg, c = load_train_config(EXAMPLES / "llama-factory" / "llama3_lora_sft.yaml")
    assert c.dialect is Dialect.LLAMA_FACTORY
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.target_modules) == (8, 16, "all-linear")  # alpha: 2 x rank there
    assert [(Path(s.path).name, s.format, s.max_examples) for s in cfg.data.sources] == [
        ("identity.json", "alpaca", 1000), ("alpaca_en_demo.json", "alpaca", 1000)]
    t = cfg.training
    assert (t.batch_size, t.gradient_accumulation, t.learning_rate, t.epochs, t.precision) == (1, 8, 1e-4, 3, "bf16")
    assert t.gradient_checkpointing and t.save_every == 500 and cfg.data.chat_template == "llama3"
    q, _ = load_train_config(EXAMPLES / "llama-factory" / "llama3_lora_sft_otfq.yaml")
    assert q.quantization == "nf4" and q.data.validation_split == 0.1 and q.training.eval_every == 500
    d, _ = load_train_config(EXAMPLES / "llama-factory" / "llama3_lora_dpo.yaml",
                             ["base_model=budwood-tiny", "data.chat_template=null"])
    assert d.training.method == "dpo" and d.training.dpo.beta == 0.1 and d.training.dpo.loss_type == "sigmoid"
    prepared = prepare_data(d, load_tokenizer("budwood-tiny"))  # the sharegpt pairs read as preference pairs
    assert len(prepared.train) == 4


def test_llama_factory_stage_and_dataset_mismatches(tmp_path, monkeypatch):
    _llama_factory_data(tmp_path)
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "lf.yaml"
    path.write_text("model_name_or_path: x/y\nstage: sft\ndataset: dpo_en_demo,nope\nfinetuning_type: full\n"
                    "pref_beta: 0.2\nmix_strategy: interleave_under\n")
    with pytest.raises(ConfigError) as e:
        convert(path)
    text = str(e.value)
    assert "'dpo_en_demo' (dataset_info.json): is preference data (ranking) but stage is sft" in text
    assert "dataset: 'nope' is not in data/dataset_info.json" in text
    assert "finetuning_type: 'full': budwood trains LoRA adapters" in text
    assert "pref_beta: 0.2: set stage: dpo to use it" in text
    assert "mix_strategy: 'interleave_under': budwood mixes by weight" in text


def test_convert_writes_budwood_yaml_that_loads_to_the_same_config(tmp_path):
    c = convert(EXAMPLES / "axolotl" / "qlora-1b.yml")
    text = to_yaml(c, ["training.max_steps=5"])
    assert text.startswith("# budwood config converted from axolotl config")
    assert "# attn_implementation: 'flash_attention_2'" in text
    (tmp_path / "native.yaml").write_text(text)
    native = load_config(tmp_path / "native.yaml")
    converted, _ = load_train_config(EXAMPLES / "axolotl" / "qlora-1b.yml", ["training.max_steps=5"])
    assert native.config_hash() == converted.config_hash() and native.training.max_steps == 5


def test_budwood_configs_are_not_converted():
    cfg, converted = load_train_config(Path(__file__).resolve().parents[3] / "configs" / "tiny_company.yaml")
    assert converted is None and cfg.data.train is not None


def test_keys_left_out_get_the_dialects_defaults_not_budwoods(tmp_path, monkeypatch):
    _llama_factory_data(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lf.yaml").write_text("model_name_or_path: x/y\ndataset: identity\n")
    t = load_train_config(tmp_path / "lf.yaml")[0].training
    assert (t.learning_rate, t.scheduler, t.warmup_ratio, t.epochs, t.batch_size, t.max_seq_len, t.precision) == (
        5e-5, "linear", 0.0, 3.0, 8, 2048, "fp32")
    (tmp_path / "ax.yml").write_text("base_model: x/y\nadapter: lora\ndatasets: [{path: d.jsonl}]\n")
    t = load_train_config(tmp_path / "ax.yml")[0].training
    assert (t.warmup_ratio, t.warmup_steps, t.precision) == (0.0, None, "fp32")
    (tmp_path / "ax2.yml").write_text("base_model: x/y\nadapter: lora\ndatasets: [{path: d.jsonl, "
                                      "train_on_eos: all}]\nwarmup_steps: 5\n")
    with pytest.raises(ConfigError, match="datasets\\[0\\].train_on_eos: 'all': budwood trains the end-of-turn"):
        load_train_config(tmp_path / "ax2.yml")


def test_odd_values_and_pairs_that_disagree_are_refused_by_name_not_crashes(tmp_path, monkeypatch):
    (tmp_path / "ax.yml").write_text(
        "base_model: x/y\nadapter: lora\ndatasets:\n  - path: d.jsonl\n    type: {field_instruction: q}\n"
        "  - path: e.txt\n    ds_type: csv\n  - path: f.jsonl\n    type: chat_template.default\n"
        "optimizer: [adamw]\nbf16: [true]\nmicro_batch_size: 2x\nval_set_size: 200\neval_steps: 0.1\n"
        "rl: dpo\nrl_beta: 0.1\ndpo_beta: 0.2\nshuffle_merged_datasets: false\n"
        "batch_size: 16\ngradient_accumulation_steps: 2\n")
    with pytest.raises(ConfigError) as e:
        convert(tmp_path / "ax.yml")
    text = str(e.value)
    for expected in ("datasets[0].type: {'field_instruction': 'q'}", "datasets[1].ds_type: 'csv': budwood reads",
                     "datasets[2].type: 'chat_template.default'", "optimizer: ['adamw']", "bf16: [True]",
                     "micro_batch_size: '2x': expected a whole number", "val_set_size: 200: budwood holds out",
                     "eval_steps: 0.1",
                     "rl_beta and dpo_beta: 0.1, 0.2", "shuffle_merged_datasets: false",
                     "batch_size: and gradient_accumulation_steps are both set"):
        assert expected in text, expected
    _llama_factory_data(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lf.yaml").write_text("model_name_or_path: x/y\ndataset: identity\nquantization_bit: 4\n"
                                      "quantization_method: bnb\ndouble_quantization: false\ndo_train: false\n"
                                      "lora_rank: 8x\nbf16: 'yes'\nval_size: 100\n")
    with pytest.raises(ConfigError) as e:
        convert(tmp_path / "lf.yaml")
    text = str(e.value)
    for expected in ("double_quantization: False", "do_train: false", "lora_rank: '8x'", "bf16: 'yes'",
                     "val_size: 100: budwood holds out"):
        assert expected in text, expected
    assert "quantization_method" not in text  # bnb is LLaMA-Factory's name for bitsandbytes


def test_axolotl_chat_template_data_with_sharegpt_roles_reads_by_default(tmp_path):
    from budwood.data.formats import read_dataset

    rows = [{"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]}
            for i in range(2)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "ax.yml").write_text(
        f"base_model: x/y\nadapter: lora\ndatasets:\n  - path: {tmp_path / 'd.jsonl'}\n    type: chat_template\n"
        "    field_messages: conversations\n    message_property_mappings: {role: from, content: value}\n")
    cfg, _ = load_train_config(tmp_path / "ax.yml")
    source = cfg.data.sources[0]
    ds = read_dataset(source.path, source.format, fields=source.field_map())
    assert [(m.role, m.content) for m in ds.examples[1].messages] == [("user", "q1"), ("assistant", "a1")]
    t = cfg.training  # Axolotl's defaults for what the file leaves out
    assert (t.batch_size, t.epochs, t.max_seq_len) == (1, 1.0, 512)
