"""The load test's direct run (model.generate in its own process) decodes the weights the server does."""

from __future__ import annotations

import pytest

from recyclegpt.core import RecycleGPT, quant_kernels
from recyclegpt.core.quantize import W8A8Linear
from recyclegpt.serve import loadtest

from .conftest import build_model_dir


def test_the_direct_run_loads_the_weights_quantize_names(tmp_path, monkeypatch) -> None:
    if not quant_kernels.dynamic_available():
        pytest.skip("w8a8's kernels need AVX-512 VNNI or AVX2")
    model_dir = build_model_dir(tmp_path / "tiny")
    loaded: list[RecycleGPT] = []
    load = RecycleGPT.from_pretrained.__func__

    def recorded(cls, path, **kwargs):  # noqa: ANN001, ANN202
        loaded.append(load(cls, path, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(RecycleGPT, "from_pretrained", classmethod(recorded))
    seconds = loadtest.direct_generate_seconds(str(model_dir), "auto", 1, "standard", 2, 4, quantize="w8a8")
    assert len(seconds) == 2 and all(s > 0 for s in seconds)
    qkv = loaded[0].model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, W8A8Linear), type(qkv)  # it decoded the w8a8 weights


def test_an_unknown_quantize_is_a_one_line_error(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        loadtest.main(["--quantize", "int3"])
    assert exit_info.value.code != 0
    assert "quantize" in capsys.readouterr().err
