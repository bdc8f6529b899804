"""Trusted artifacts: Ed25519 signatures decide whether an artifact's native code loads.

The forged artifact replaces ``kernels.so`` with a library whose constructor writes a
marker file, and recomputes every sha256 (what an attacker can do): without a trusted
signature or ``--trust-artifact`` the marker never appears, because the kernels are
rebuilt here instead; with the opt-in it does (proving the check is what protects).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("cryptography")

import lookupc  # noqa: E402
from lookupc.artifact import format as art  # noqa: E402
from lookupc.artifact import signing  # noqa: E402
from lookupc.cli.main import cli  # noqa: E402


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    r = CliRunner().invoke(cli, ["keygen", str(d / "me")])
    assert r.exit_code == 0, (r.stderr, r.exception)
    assert (d / "me").stat().st_mode & 0o777 == 0o600
    signing.keygen(d / "other")
    return d


@pytest.fixture(scope="module")
def signed(keys, tmp_path_factory):
    out = tmp_path_factory.mktemp("signed") / "tiny.lookupc"
    r = CliRunner().invoke(cli, ["compile", "examples.tiny_bert:factory", "-o", str(out),
                                 "--seq-len", "8", "--sign-key", str(keys / "me")])
    assert r.exit_code == 0, (r.stderr, r.exception)
    assert (out / signing.SIGNATURE).is_file()
    return out


@pytest.fixture(autouse=True)
def _no_ambient_keys(monkeypatch, tmp_path):
    monkeypatch.setenv("LOOKUPC_TRUSTED_KEYS", str(tmp_path / "none"))


def test_trust_depends_on_the_key(signed, keys):
    manifest = art.verify(signed)
    mine = signing.trusted_keys([keys / "me.pub"])
    assert signing.trust_of(signed, manifest, mine).kind == "trusted"
    assert signing.trust_of(signed, manifest, signing.trusted_keys([keys / "other.pub"])
                            ).kind == "untrusted"
    m = lookupc.load(signed, trusted_keys=[keys / "me.pub"])
    assert m.kernel_source == "artifact kernels.so"
    m = lookupc.load(signed)  # signed, but by nobody trusted here: rebuilt
    assert m.kernel_source.startswith("rebuilt")
    torch.testing.assert_close(m(*m.example_inputs)[0],
                               m.run(*m.example_inputs, schedule="reference")[0],
                               rtol=1e-4, atol=1e-4)


def test_a_signature_over_another_manifest_is_refused(signed, tmp_path, keys):
    d = tmp_path / "a"
    shutil.copytree(signed, d)
    m = json.loads((d / "manifest.json").read_text())
    m["schedule"] = "naive"
    m["manifest_sha256"] = art._manifest_digest(m)
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(art.ArtifactError, match="changed after it was signed"):
        lookupc.load(d, trusted_keys=[keys / "me.pub"])
    r = CliRunner().invoke(cli, ["inspect", str(d)])
    assert "signature does not verify" in r.stdout


def _forge(src: Path, dst: Path, marker: Path) -> Path:
    """src with kernels.so replaced by a library that writes ``marker`` when loaded."""
    shutil.copytree(src, dst)
    (dst / signing.SIGNATURE).unlink(missing_ok=True)
    c = dst / "evil.c"
    c.write_text('#include <stdio.h>\n__attribute__((constructor)) static void f(void) {'
                 f' FILE *h = fopen("{marker}", "w"); if (h) fclose(h); }}\n')
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(dst / "kernels.so"), str(c)],
                   check=True)
    c.unlink()
    m = json.loads((dst / "manifest.json").read_text())
    for name in m["files"]:
        p = dst / name
        m["files"][name] = {"sha256": art.sha256_file(p), "bytes": p.stat().st_size}
    m["manifest_sha256"] = art._manifest_digest(m)
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to build the forgery")
def test_forged_native_code_never_runs_without_opt_in(signed, tmp_path):
    marker = tmp_path / "pwned"
    d = _forge(signed, tmp_path / "forged", marker)
    art.verify(d)  # the hashes are consistent: only a signature can tell
    r = CliRunner().invoke(cli, ["inspect", str(d)])
    assert "not signed" in r.stdout and "verify     ok" in r.stdout
    r = CliRunner().invoke(cli, ["run", str(d), "--repeat", "0"])
    assert r.exit_code == 0, (r.stderr, r.exception)
    assert "kernels: rebuilt on this machine" in r.stderr
    assert not marker.exists()
    # the opt-in loads it: its constructor runs (and it has no kernels, so it then fails)
    r = CliRunner().invoke(cli, ["run", str(d), "--repeat", "0", "--trust-artifact"])
    assert marker.exists()
