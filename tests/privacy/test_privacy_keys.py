"""The pseudonymisation key: length, fingerprint, no silent creation, executors' key file, the lake's key."""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conf.settings import PseudonymSettings
from lake.archive import Archive, ArchivePathError
from lake.keys import (KeyFile, LakeKeyMismatch, PseudonymKeyError, bind_lake, check_lake_key,
                       create_key_file, executor_key_file, key_fingerprint, key_relative_path,
                       lake_key_fingerprint, load_key, read_key_file)

REPO = Path(__file__).resolve().parents[2]
KEY_A = "a" * 40
KEY_B = "b" * 40


def _key_file(path: Path, text: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def test_short_keys_are_refused_from_file_and_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSCREEN_PSEUDONYM_KEY", "x" * 31)
    with pytest.raises(PseudonymKeyError, match="31 bytes; at least 32"):
        load_key(PseudonymSettings())
    monkeypatch.delenv("MEDSCREEN_PSEUDONYM_KEY")
    short = _key_file(tmp_path / "short.key", "y" * 31 + "\n")
    with pytest.raises(PseudonymKeyError, match="at least 32"):
        load_key(PseudonymSettings(key_file=short))
    exact = _key_file(tmp_path / "exact.key", "z" * 32 + "\n")
    assert load_key(PseudonymSettings(key_file=exact)) == b"z" * 32


def test_fingerprint_is_hmac_of_a_fixed_label_and_reveals_no_pseudonym():
    fp = key_fingerprint(KEY_A.encode())
    assert fp == hmac.new(KEY_A.encode(), b"medscreen pseudonym key fingerprint v1", hashlib.sha256).hexdigest()[:32]
    assert fp != key_fingerprint(KEY_B.encode())
    assert KEY_A not in fp and fp != hashlib.sha256(KEY_A.encode()).hexdigest()[:32]


def test_a_key_file_is_never_overwritten(tmp_path):
    path = create_key_file(tmp_path / "k")
    first = path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(first) == 64
    with pytest.raises(PseudonymKeyError, match="never overwritten"):
        create_key_file(path)
    assert path.read_text() == first


def test_keys_init_cli_creates_once_and_prints_the_fingerprint(tmp_path):
    path = tmp_path / "keys" / "pseudonym.key"
    cmd = [sys.executable, "-m", "medscreen", "keys", "init", "--key-file", str(path)]
    env = {k: v for k, v in os.environ.items() if k != "MEDSCREEN_PSEUDONYM_KEY"}
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    printed = json.loads(out.stdout)
    key = path.read_text().strip().encode()
    assert printed["fingerprint"] == hmac.new(key, b"medscreen pseudonym key fingerprint v1",
                                              hashlib.sha256).hexdigest()[:32]
    assert path.read_text().strip() not in out.stdout + out.stderr
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert again.returncode == 2 and "never overwritten" in again.stderr
    assert path.read_text().strip().encode() == key


def test_executors_get_a_path_and_refuse_another_key_there(tmp_path, monkeypatch):
    monkeypatch.delenv("MEDSCREEN_PSEUDONYM_KEY")
    path = _key_file(tmp_path / "pseudonym.key", KEY_A)
    kf = executor_key_file(PseudonymSettings(key_file=path))
    assert kf == KeyFile(str(path.resolve()), key_fingerprint(KEY_A.encode()))
    assert KEY_A not in repr(kf)
    assert kf.load() == KEY_A.encode()
    # The same path on another machine holding another key: refused, never used.
    other = tmp_path / "elsewhere"
    other.mkdir()
    _key_file(other / "pseudonym.key", KEY_B)
    with pytest.raises(PseudonymKeyError, match="mount the same key"):
        KeyFile(str(other / "pseudonym.key"), kf.fingerprint).load()


def test_an_environment_key_reaches_executors_as_a_private_file(monkeypatch):
    monkeypatch.setenv("MEDSCREEN_PSEUDONYM_KEY", KEY_B)
    kf = executor_key_file(PseudonymSettings())
    path = Path(kf.path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert read_key_file(path) == KEY_B.encode() and kf.fingerprint == key_fingerprint(KEY_B.encode())


def test_a_lake_written_with_another_key_is_refused(tmp_path):
    fp_a, fp_b = key_fingerprint(KEY_A.encode()), key_fingerprint(KEY_B.encode())
    assert lake_key_fingerprint(tmp_path) is None
    bind_lake(tmp_path, fp_a)
    bind_lake(tmp_path, fp_a)  # the same key again: fine
    assert lake_key_fingerprint(tmp_path) == fp_a
    with pytest.raises(LakeKeyMismatch, match=f"fingerprint {fp_a}.*configured key has fingerprint {fp_b}"):
        bind_lake(tmp_path, fp_b)
    with pytest.raises(LakeKeyMismatch, match="write to a new lake"):
        check_lake_key(tmp_path, fp_b)
    assert lake_key_fingerprint(tmp_path) == fp_a


def test_keyed_archive_paths_hide_every_component_and_resolve(tmp_path, monkeypatch):
    monkeypatch.delenv("MEDSCREEN_PSEUDONYM_KEY")
    root = tmp_path / "archive"
    leaf = root / "DOE_JANE" / "MRN0042" / "ACC7654321"
    leaf.mkdir(parents=True)
    (leaf / "IM0001.dcm").write_bytes(b"x")
    (root / "SMITH_JOHN").mkdir()
    kf = executor_key_file(PseudonymSettings(key_file=_key_file(tmp_path / "k", KEY_A)))
    keyed = key_relative_path(KEY_A.encode(), "DOE_JANE/MRN0042/ACC7654321/IM0001.dcm")
    assert len(keyed.split("/")) == 4
    for word in ("DOE", "JANE", "MRN0042", "ACC7654321", "IM0001", "dcm"):
        assert word.lower() not in keyed.lower()
    assert Archive(str(root), kf).resolve(keyed) == leaf / "IM0001.dcm"
    # Another key's tokens name nothing here.
    with pytest.raises(ArchivePathError, match="re-run the index"):
        Archive(str(root), kf).resolve(key_relative_path(KEY_B.encode(), "DOE_JANE/MRN0042"))
    with pytest.raises(ValueError):
        key_relative_path(KEY_A.encode(), "/abs/path")


def _script(env_extra: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDSCREEN_", "AIRFLOW"))}
    env.update({"AIRFLOW_HOME": str(tmp_path / "home"), "MEDSCREEN_AIRFLOW_SETUP_ONLY": "1",
                "MEDSCREEN_VENV_BIN": str(Path(sys.executable).parent), **env_extra})
    return subprocess.run(["bash", str(REPO / "dags" / "standalone.sh")], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_standalone_script_never_makes_a_key_nor_takes_one_from_the_environment(tmp_path):
    missing = tmp_path / "no-such.key"
    out = _script({"MEDSCREEN_PSEUDONYM__KEY_FILE": str(missing)}, tmp_path)
    assert out.returncode == 2 and "medscreen keys init" in out.stderr
    assert not missing.exists() and not list((tmp_path / "home").glob("*.key"))
    out = _script({"MEDSCREEN_PSEUDONYM_KEY": KEY_A}, tmp_path)
    assert out.returncode == 2 and "unset it" in out.stderr and KEY_A not in out.stderr
