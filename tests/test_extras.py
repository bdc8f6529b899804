"""Optional dependencies: a missing one is a clear error that names the extra to install."""

import sys

import pytest

from lookupc.extras import MissingExtraError, require


@pytest.mark.parametrize("module, extra", [("matplotlib", "plot"), ("faiss", "memo"),
                                           ("transformers", "hf"), ("xgboost", "tune")])
def test_missing_extra_names_what_to_install(monkeypatch, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    with pytest.raises(MissingExtraError, match=rf"pip install 'lookupc\[{extra}\]'"):
        require(module, "this feature")


def test_loading_an_hf_dir_without_transformers_says_which_extra(monkeypatch, tmp_path):
    from lookupc.artifact.model_load import load_model

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(MissingExtraError, match=r"lookupc\[hf\]"):
        load_model(str(tmp_path))


def test_a_present_module_is_returned():
    import json

    assert require("json", "x") is json
