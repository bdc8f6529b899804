"""Loading a .pt2 can run code (torch.export.load unpickles some entries); lookupc refuses
such archives before torch sees them. The forged archives here carry a pickle that would
create a marker file when unpickled."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from lookupc.artifact.export import export_program, save_program
from lookupc.artifact.pt2_safety import UnsafePt2Error, check_pt2


class _Marker:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):  # unpickling this creates the marker file
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pt2") / "good.pt2"
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 4))
    program, names, _, _ = export_program(model.eval(), (torch.randn(2, 4),))
    save_program(program, str(path), names)
    return path


def _rewrite(src: Path, dst: Path, edit) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = edit(item.filename, zin.read(item.filename))
            if data is not None:
                zout.writestr(item, data)
    return dst


def test_a_plain_program_passes(good):
    check_pt2(good)


def test_pickled_weight_entries_are_refused(good, tmp_path):
    def edit(name, data):
        if name.endswith("_weights_config.json"):
            cfg = json.loads(data)
            first = next(iter(cfg["config"].values()))
            first["use_pickle"] = True
            return json.dumps(cfg).encode()
        return data

    bad = _rewrite(good, tmp_path / "bad.pt2", edit)
    with pytest.raises(UnsafePt2Error, match=r"weight '.*' \(pickled\)"):
        check_pt2(bad)


def test_malicious_example_inputs_run_code_in_torch_but_not_through_lookupc(good, tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Marker(str(marker)))

    def edit(name, data):
        return payload if "/data/sample_inputs/" in name else data

    bad = _rewrite(good, tmp_path / "evil.pt2", edit)
    # lookupc refuses it and nothing runs
    with pytest.raises(UnsafePt2Error, match="sample_inputs"):
        check_pt2(bad)
    from lookupc.artifact.model_load import load_model

    with pytest.raises(UnsafePt2Error):
        load_model(str(bad))
    assert not marker.exists()
    # plain torch.export.load does run it (in a subprocess): the reason for the check
    code = ("import sys, torch; sys.path.insert(0, sys.argv[2])\n"
            "try:\n    torch.export.load(sys.argv[1])\nexcept Exception:\n    pass\n")
    subprocess.run([sys.executable, "-c", code, str(bad), str(Path(__file__).parent)],
                   capture_output=True, timeout=300)
    assert marker.exists(), "torch.export.load no longer falls back to a full unpickler"
