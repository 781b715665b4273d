"""Quantised bases: which library each (quantization, device) gets, the configs it builds, and what refuses."""
import importlib.util
import json

import pytest
import torch

from budwood.errors import ModelError
from budwood.models.load import load_base
from budwood.models.quant import (
    adapter_quantization,
    bnb_config,
    check_quantization,
    is_quantized_linear,
    linear_shape,
    quant_plan,
    weight_bytes,
)


def test_none_is_an_ordinary_load():
    plan = quant_plan("none", "cpu", torch.float32)
    assert not plan.quantized and plan.kwargs == {} and not plan.kbit_prep and plan.describe() is None


def test_int8_on_cpu_is_torchao_weight_only():
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    plan = quant_plan("int8", "cpu", torch.bfloat16)
    config = plan.kwargs["quantization_config"]
    assert plan.library == "torchao" and not plan.kbit_prep and plan.kwargs["device_map"] == {"": "cpu"}
    assert isinstance(config, TorchAoConfig) and isinstance(config.quant_type, Int8WeightOnlyConfig)
    assert plan.describe().startswith("torchao ")


def test_nf4_on_cpu_is_refused_naming_the_device_and_the_alternative():
    with pytest.raises(ModelError, match=r"quantization 'nf4' needs a CUDA GPU.*device is cpu.*int8"):
        quant_plan("nf4", "cpu", torch.float32)


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_other_devices_are_refused_by_name(quantization):
    with pytest.raises(ModelError, match=rf"quantization '{quantization}': no quantised path on device 'mps'"):
        quant_plan(quantization, "mps", torch.float32)


def test_unknown_value_is_refused_naming_quantization():
    with pytest.raises(ModelError, match=r"quantization 'fp8': expected one of none, nf4, int8"):
        check_quantization("fp8")


def test_cuda_without_bitsandbytes_names_the_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ModelError, match=r"quantization 'nf4' needs bitsandbytes.*budwood\[quant\]"):
        quant_plan("nf4", "cuda", torch.bfloat16)


def test_bnb_nf4_config_is_the_qlora_recipe():
    c = bnb_config("nf4", torch.bfloat16)
    assert c.load_in_4bit and not c.load_in_8bit
    assert c.bnb_4bit_quant_type == "nf4" and c.bnb_4bit_use_double_quant is True
    assert c.bnb_4bit_compute_dtype == torch.bfloat16


def test_bnb_int8_config_is_llm_int8():
    c = bnb_config("int8", torch.bfloat16)
    assert c.load_in_8bit and not c.load_in_4bit


def test_int8_load_holds_the_linear_weights_in_int8():
    fp32 = load_base("budwood-tiny", dtype=torch.float32)
    int8 = load_base("budwood-tiny", dtype=torch.float32, quantization="int8")
    q, ref = int8.model.model.layers[0].self_attn.q_proj, fp32.model.model.layers[0].self_attn.q_proj
    assert int8.quantization == "int8" and is_quantized_linear(q) and not is_quantized_linear(ref)
    assert q.weight.qdata.dtype == torch.int8 and linear_shape(q) == linear_shape(ref) == (256, 256)
    assert not is_quantized_linear(int8.model.lm_head)  # the (tied) head stays float, as transformers keeps it
    # per-row scales: each weight within half a step of its int8 value
    err = (q.weight.dequantize() - ref.weight.detach()).abs()
    assert (err <= q.weight.scale / 2 + 1e-7).all()
    # the embedding (tied to the head) is most of budwood-tiny; the linears shrink 4x
    assert weight_bytes(int8.model) < 0.7 * weight_bytes(fp32.model)
    ids = torch.tensor([[1, 400, 401, 402, 403, 404]])
    with torch.no_grad():
        a, b = fp32.model(ids).logits.log_softmax(-1), int8.model(ids).logits.log_softmax(-1)
    kl = (a.exp() * (a - b)).sum(-1)  # KL(fp32 || int8) per position: 3e-5..8e-4 measured
    assert not torch.equal(a, b) and (kl < 0.01).all()


def test_adapter_quantization_reads_provenance(tmp_path):
    assert adapter_quantization(tmp_path) == "none"  # no budwood.json: a plain peft adapter
    (tmp_path / "budwood.json").write_text(json.dumps({"base_model": {"name": "budwood-tiny", "quantization": "int8"}}))
    assert adapter_quantization(tmp_path) == "int8"
    (tmp_path / "budwood.json").write_text(json.dumps({"base_model": {"name": "budwood-tiny"}}))
    assert adapter_quantization(tmp_path) == "none"  # trained before quantization existed
    (tmp_path / "budwood.json").write_text("{not json")
    assert adapter_quantization(tmp_path) == "none"


def test_int8_backward_keeps_the_weight_quantised_and_exact():
    """Training's gradient through an int8 linear is grad @ dequantised W, computed from the int8 weight in the
    backward instead of from a float copy saved in the forward."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    from budwood.models.quant import keep_quantized_in_backward

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32, bias=True))
    quantize_(model, Int8WeightOnlyConfig())
    keep_quantized_in_backward(model)
    x = torch.randn(5, 64, requires_grad=True)
    g = torch.randn(5, 32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = model(x)
    y.backward(g)
    assert torch.equal(x.grad, g @ model[0].weight.dequantize())
    assert not any(t.dtype.is_floating_point and t.numel() == 32 * 64 for t in saved)  # no float copy of W kept
    with torch.no_grad():  # inference: torchao's forward, unchanged
        assert torch.equal(model(x), torch.nn.functional.linear(x, model[0].weight, model[0].bias))
