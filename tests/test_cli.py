"""The bertfast command line: info (bench is tested with the benchmarking pieces)."""

import json
import subprocess
import sys

import pytest
import torch

import bertfast
from bertfast.cli import main


def test_info_reports_versions_gpu_and_backends(capsys):
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert f"torch         {torch.__version__}" in text
    for backend in ("reference", "triton", "ext"):
        assert backend in text
    if not torch.cuda.is_available():
        assert "no GPU" in text


def test_info_json_explains_unavailable_backends(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backends"]["reference"] == "available"
    for status in info["backends"].values():
        assert status == "available" or status.startswith("unavailable: ") and len(status) > len("unavailable: ")


def test_console_script_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "bertfast.cli", "info"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "backends:" in done.stdout


def test_info_lists_what_each_backend_declares(capsys):
    """Ops and dropout per backend, as the dispatcher sees them (ext: no varlen attention, no dropout)."""
    assert main(["info", "--json"]) == 0
    capabilities = json.loads(capsys.readouterr().out)["capabilities"]
    assert set(capabilities) == {"reference", "triton", "ext"}
    assert capabilities["reference"] == (
        "ops: layer_norm, bias_gelu, attention, attention_varlen, embedding_layer_norm, mean_pool, "
        "quantize_rows, layer_norm_fp8, bias_gelu_fp8; dropout in: layer_norm, attention, attention_varlen"
    )
    assert capabilities["triton"].endswith("dropout in: layer_norm, attention, attention_varlen")
    assert "quantize_rows, layer_norm_fp8, bias_gelu_fp8;" in capabilities["triton"]
    assert "fp8" not in capabilities["ext"] and "quantize_rows" not in capabilities["ext"]
    assert "attention_varlen" not in capabilities["ext"] and capabilities["ext"].endswith("dropout in: -")


def test_info_says_what_auto_picks(capsys, monkeypatch):
    """Per device, the backend ``auto`` runs for each op of a BERT-large layer, as the model's plan resolves it."""
    from bertfast.ops import _dispatch

    assert main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["auto picks"]["cpu (float32)"] == (
        "reference: attention, attention_varlen, attention_varlen_qkv, bias_gelu, embedding_layer_norm, layer_norm"
    )
    # Were ext first on the CPU, info would say so: it reads the dispatcher, not a fixed list.
    monkeypatch.setitem(_dispatch.AUTO_ORDER, "cpu", ("ext", "reference"))
    monkeypatch.setattr("bertfast.layers._PLANS", {})
    assert main(["info", "--json"]) == 0
    picks = json.loads(capsys.readouterr().out)["auto picks"]["cpu (float32)"]
    if bertfast.ops.backend_availability("ext") is None:
        assert picks.startswith(
            "ext: attention, bias_gelu, embedding_layer_norm, layer_norm; reference: attention_varlen"
        )


def test_version(capsys):
    import bertfast

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"bertfast {bertfast.__version__}"
