"""QLoRA on CPU: train LoRA on an int8 base, serve and evaluate it on that base, load it on a float one."""
import json
import math

import pytest
import torch
from conftest import chat_rows, tiny_train_config, write_jsonl
from safetensors.torch import load_file
from typer.testing import CliRunner

from budwood.errors import BudwoodError, ModelError
from budwood.models.load import load_base
from budwood.models.quant import is_quantized_linear

STEPS = 8


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The same 8 steps on budwood-tiny twice: an fp32 base and an int8 one; {quantization: adapter dir}."""
    from budwood.train.recipe import train

    root = tmp_path_factory.mktemp("quant")
    data = write_jsonl(root / "train.jsonl", chat_rows(16, "What is {i} times 7?", "{i} times 7 is {x}."))
    return {q: train(tiny_train_config(data, root / q, f"training.max_steps={STEPS}", f"quantization={q}",
                                       "training.learning_rate=1e-3"))
            for q in ("none", "int8")}


def losses(adapter) -> list[float]:
    rows = [json.loads(line) for line in (adapter / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_int8_training_follows_fp32(trained):
    fp32, int8 = losses(trained["none"]), losses(trained["int8"])
    assert len(int8) == STEPS and all(math.isfinite(v) for v in int8)
    assert int8[-1] < 0.5 * int8[0]  # it learns
    assert int8[-1] == pytest.approx(fp32[-1], rel=0.03)  # measured: 1.302 vs 1.310 after 8 steps
    assert int8 != fp32  # and it did run on other weights


def test_quantization_is_recorded_in_provenance(trained):
    base = json.loads((trained["int8"] / "budwood.json").read_text())["base_model"]
    assert base["quantization"] == "int8" and base["quantized_with"].startswith("torchao ")
    assert json.loads((trained["none"] / "budwood.json").read_text())["base_model"]["quantization"] == "none"


def test_the_adapter_is_a_plain_float_peft_adapter(trained):
    int8, fp32 = (load_file(trained[q] / "adapter_model.safetensors") for q in ("int8", "none"))
    assert int8.keys() == fp32.keys() and all(t.dtype == torch.float32 for t in int8.values())
    assert any(k.endswith("lora_B.weight") and t.abs().sum() > 0 for k, t in int8.items())  # B starts at zero


def test_the_training_base_is_quantised(tmp_path):
    from budwood.train.distributed import Single
    from budwood.train.recipe import TrainingRun

    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(4, "Q{i}?", "A{i}."))
    run = TrainingRun(tiny_train_config(data, tmp_path / "out", "quantization=int8"), Single(), _Silent())
    run.setup(resume=False)
    q_proj = run.model.get_base_model().model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == "TorchaoLoraLinear" and is_quantized_linear(q_proj.base_layer)
    assert all(p.dtype == torch.float32 and "lora_" in n for n, p in run.model.named_parameters() if p.requires_grad)


class _Silent:
    def start(self, total_steps, first_step): ...
    def update(self, record): ...
    def note(self, message): ...
    def stop(self): ...


def test_int8_adapter_loads_on_an_fp32_base(trained):
    from peft import PeftModel

    ids = torch.tensor([[1, 400, 401, 402, 403]])
    base = load_base("budwood-tiny", dtype=torch.float32).model
    with torch.no_grad():
        plain = base(ids).logits
        adapted = PeftModel.from_pretrained(base, str(trained["int8"])).eval()(ids).logits
    assert not is_quantized_linear(base.model.layers[0].self_attn.q_proj.base_layer)
    assert (adapted - plain).abs().max() > 1e-3  # the adapter acts on the float base


def test_engine_greedy_tokens_equal_transformers_on_the_same_int8_model(trained):
    """The engine's own forward (per-row LoRA, paged attention) over the int8 base gives the greedy tokens that
    transformers + peft give on the very same quantised model and adapter (fp32 activations; in bf16 the
    engine's fp32 LoRA and peft's bf16 one part after a few tokens, as on a float base)."""
    from peft import PeftModel

    from budwood.engine import Engine, EngineConfig, SamplingParams
    from budwood.engine.runner import QuantizedProjection

    engine = Engine(EngineConfig(precision="fp32", quantization="int8", lora_modules={"q": str(trained["int8"])}))
    assert isinstance(engine.runner.fused[0]["qkv"][0], QuantizedProjection)
    model = PeftModel.from_pretrained(load_base("budwood-tiny", quantization="int8").model, str(trained["int8"]))
    model.eval()
    for question in ("What is 3 times 7?", "What is 12 times 7?"):
        ids = engine.chat_prompt([{"role": "user", "content": question}])
        got = engine.generate([ids], SamplingParams(max_tokens=12, temperature=0), ["q"])[0].choices[0].token_ids
        x = torch.tensor([ids])
        with torch.no_grad():
            for _ in range(len(got)):
                x = torch.cat([x, model(x).logits[:, -1].argmax(-1, keepdim=True)], 1)
        assert got == x[0, len(ids):].tolist()


def test_eval_loads_the_base_as_the_adapter_was_trained(trained):
    from budwood.engine.runner import QuantizedProjection
    from budwood.eval.targets import LocalTarget

    target = LocalTarget(f"budwood-tiny+{trained['int8']}", precision="fp32")
    assert target.info.quantization == "int8"
    assert isinstance(target.engine.runner.fused[0]["o"][0], QuantizedProjection)
    assert LocalTarget(f"budwood-tiny+{trained['none']}", precision="fp32").info.quantization == "none"


def test_nf4_training_on_cpu_is_refused_naming_the_device(tmp_path):
    from budwood.train.recipe import train

    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(4, "Q{i}?", "A{i}."))
    config = tiny_train_config(data, tmp_path / "out", "quantization=nf4", "training.device=cpu")
    with pytest.raises(ModelError, match=r"'nf4' needs a CUDA GPU.*device is cpu.*quantization: int8"):
        train(config)


def test_serve_refuses_nf4_on_cpu_and_maps_vllms_name():
    from budwood.cli import app
    from budwood.cli.serve import serve_quantization
    from budwood.serve.vllm import vllm_command

    done = CliRunner().invoke(app, ["serve", "--quantization", "nf4", "--device", "cpu"])
    assert done.exit_code != 0 and "device is cpu" in done.output
    done = CliRunner().invoke(app, ["serve", "-q", "fp8"])
    assert done.exit_code != 0 and "--quantization 'fp8'" in done.output
    assert serve_quantization("bitsandbytes") == "nf4"
    cmd = vllm_command("budwood-tiny", None, "127.0.0.1", 8000, None, 4, quantization="nf4")
    assert cmd[cmd.index("--quantization") + 1] == "bitsandbytes"
    assert "--quantization" not in vllm_command("budwood-tiny", None, "127.0.0.1", 8000, None, 4)
    with pytest.raises(BudwoodError, match="--quantization int8 with --engine vllm"):
        vllm_command("budwood-tiny", None, "127.0.0.1", 8000, None, 4, quantization="int8")
