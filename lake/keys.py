"""The pseudonymisation key: where it comes from, how it reaches executors, which lake it belongs to.

``patient_key``, ``series_key`` … are the first 32 hex characters of
HMAC-SHA256(key, source identifier); raw identifiers never leave ingest.

Rules this module enforces:

- The key is read from a file readable by its owner only (mode 0600: a file
  the operator created with ``medscreen keys init``, or a secret the
  deployment mounts), or, for a single-process run, from the environment
  variable ``pseudonym.key_env``. Either way it is at least
  :data:`MIN_KEY_BYTES` bytes. Nothing here creates a key implicitly.
- Spark executors never receive the key itself: they get a :class:`KeyFile`
  (a path and the key's fingerprint) and read the file where they run; a
  file whose key has another fingerprint is refused there.
- A lake is bound to the key that first wrote pseudonyms into it
  (``LAKE/_pseudonym_key.json`` holds the fingerprint); writing to it with
  another key is refused, because pseudonyms from two keys never join.
- The fingerprint is HMAC-SHA256(key, a fixed label): it identifies the key
  without revealing it or any pseudonym.
"""
from __future__ import annotations

import atexit
import datetime as dt
import hashlib
import hmac
import json
import os
import secrets
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from conf.settings import PseudonymSettings

# HMAC-SHA256 keys shorter than its 32-byte output weaken every pseudonym.
MIN_KEY_BYTES = 32
FINGERPRINT_LABEL = b"medscreen pseudonym key fingerprint v1"
# Domain separation: a folder named like an MRN must not get the MRN's pseudonym.
PATH_COMPONENT_LABEL = "medscreen archive path component v1\0"
PATH_TOKEN_HEX = 16
LAKE_KEY_RECORD = "_pseudonym_key.json"
KEY_FILE_ENV = "MEDSCREEN_PSEUDONYM__KEY_FILE"


class PseudonymKeyError(RuntimeError):
    """No usable pseudonymisation key."""


class LakeKeyMismatch(PseudonymKeyError):
    """The lake was written with another pseudonymisation key."""


def pseudonymise(key: bytes, source_id: str) -> str:
    """First 32 hex characters of HMAC-SHA256(key, source_id)."""
    return hmac.new(key, str(source_id).encode("utf-8"), hashlib.sha256).hexdigest()[:32]


def key_fingerprint(key: bytes) -> str:
    """HMAC-SHA256(key, a fixed label), 32 hex characters: names the key, reveals neither it nor a pseudonym."""
    return hmac.new(key, FINGERPRINT_LABEL, hashlib.sha256).hexdigest()[:32]


def _checked(raw: str, source: str) -> bytes:
    key = raw.strip().encode("utf-8")
    if len(key) < MIN_KEY_BYTES:
        raise PseudonymKeyError(f"pseudonym key from {source} is {len(key)} bytes; at least {MIN_KEY_BYTES} "
                                "are required (create one with `medscreen keys init --key-file PATH`)")
    return key


# MRNs are hashed in a namespace of their own: an MRN that happens to equal a FHIR
# Patient.id or an OMOP person_id must not produce that patient's patient_key.
MRN_NAMESPACE = "mrn:"


def mrn_source_id(mrn: str) -> str:
    """The string whose keyed hash is an MRN's key (namespaced, surrounding blanks removed)."""
    return MRN_NAMESPACE + str(mrn).strip()


def mrn_key(key: bytes, mrn: str) -> str:
    """Keyed hash of a medical record number: EMR identifiers and DICOM PatientID alike.

    The one helper both sides use, so ``emr/patients.mrn_key`` and
    ``imaging/series.mrn_key`` join. Values are compared exactly (after
    trimming blanks): leading zeros and case are significant, as in the source.
    """
    return pseudonymise(key, mrn_source_id(mrn))


def create_key_file(path: Path) -> Path:
    """Write a new random key (64 hex characters) to ``path`` with mode 0600; refuse if it exists.

    The one place a key is made, called by ``medscreen keys init`` (and the
    demo, for its own throwaway lake). An existing file is never replaced:
    a new key would silently re-key every pseudonym.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise PseudonymKeyError(f"{path} already exists; a key is never overwritten (it would re-key "
                                "every pseudonym). Use it, or choose another path") from None
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path


def read_key_file(path: Path | str) -> bytes:
    """The key in ``path``: it must exist, be readable by its owner only and hold ≥ MIN_KEY_BYTES bytes."""
    path = Path(path)
    if not path.is_file():
        raise PseudonymKeyError(f"pseudonym key file {path} does not exist; create it once with "
                                f"`medscreen keys init --key-file {path}` (or mount the deployment's secret there)")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise PseudonymKeyError(f"pseudonym key file {path} has mode {oct(mode)}; "
                                f"it must be readable by its owner only: chmod 600 {path}")
    return _checked(path.read_text(), f"key file {path}")


def load_key(settings: PseudonymSettings) -> bytes:
    """The key from the environment variable (single-process runs), else the 0600 key file; else a clear error."""
    value = os.environ.get(settings.key_env)
    if value:
        return _checked(value, f"environment variable {settings.key_env}")
    if settings.key_file is not None:
        return read_key_file(settings.key_file)
    raise PseudonymKeyError(f"no pseudonym key: set {KEY_FILE_ENV} to a 0600 key file "
                            "(`medscreen keys init --key-file PATH` creates one)")


# ------------------------------------------------------------------ executors

_LOADED: dict[tuple[str, str], bytes] = {}


@dataclass(frozen=True)
class KeyFile:
    """What travels to Spark executors and Ray workers instead of the key: a path and a fingerprint.

    The file is read where the task runs (the same path on every machine: a
    mounted secret, e.g. ``spark.kubernetes.executor.secrets.*``); a key there
    with another fingerprint is refused, so a worker can never pseudonymise
    with a different key than the driver checked against the lake.
    """

    path: str
    fingerprint: str

    def load(self) -> bytes:
        """The key (read once per process), checked against the driver's fingerprint."""
        cached = _LOADED.get((self.path, self.fingerprint))
        if cached is not None:
            return cached
        key = read_key_file(self.path)
        if key_fingerprint(key) != self.fingerprint:
            raise PseudonymKeyError(f"the key file {self.path} on this machine has fingerprint "
                                    f"{key_fingerprint(key)}, the driver's key {self.fingerprint}; mount the "
                                    "same key on every machine")
        _LOADED[(self.path, self.fingerprint)] = key
        return key


_PRIVATE_COPIES: dict[str, str] = {}


def _remove_private_copies() -> None:
    for directory in _PRIVATE_COPIES.values():
        shutil.rmtree(directory, ignore_errors=True)
    _PRIVATE_COPIES.clear()


atexit.register(_remove_private_copies)


def executor_key_file(settings: PseudonymSettings) -> KeyFile:
    """The :class:`KeyFile` executors read: the configured key file, or a private copy of an environment key.

    A key taken from the environment (local runs, tests) is written to a 0600
    file in a 0700 temporary directory of this machine, removed at exit;
    executors on other machines cannot read it and fail with a message that
    says to configure a key file instead. The environment variable itself is
    never forwarded.
    """
    key = load_key(settings)
    fp = key_fingerprint(key)
    if not os.environ.get(settings.key_env) and settings.key_file is not None:
        return KeyFile(str(Path(settings.key_file).resolve()), fp)
    if fp not in _PRIVATE_COPIES:
        directory = tempfile.mkdtemp(prefix="medscreen-key-")  # mode 0700
        path = os.path.join(directory, "pseudonym.key")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key.decode("utf-8"))
        _PRIVATE_COPIES[fp] = directory
    return KeyFile(os.path.join(_PRIVATE_COPIES[fp], "pseudonym.key"), fp)


# ----------------------------------------------------------------- the lake's key

def lake_key_fingerprint(lake_root: Path) -> str | None:
    """The fingerprint of the key the lake was written with (None for a lake nothing keyed was written to)."""
    record = Path(lake_root) / LAKE_KEY_RECORD
    if not record.is_file():
        return None
    return str(json.loads(record.read_text())["key_fingerprint"])


def check_lake_key(lake_root: Path, fingerprint: str) -> None:
    """Raise LakeKeyMismatch when the lake was written with a key other than ``fingerprint``'s."""
    recorded = lake_key_fingerprint(lake_root)
    if recorded is not None and recorded != fingerprint:
        raise LakeKeyMismatch(
            f"lake {lake_root} was written with the pseudonym key of fingerprint {recorded}; the configured "
            f"key has fingerprint {fingerprint}. Pseudonyms from two keys never join: configure the lake's "
            f"key ({KEY_FILE_ENV}), or write to a new lake (re-keying means rebuilding it whole)")


def bind_lake(lake_root: Path, fingerprint: str) -> None:
    """Record ``fingerprint`` as the lake's key on its first keyed write; refuse any other key after that."""
    record = Path(lake_root) / LAKE_KEY_RECORD
    record.parent.mkdir(parents=True, exist_ok=True)
    body = json.dumps({"key_fingerprint": fingerprint,
                       "bound_at_utc": dt.datetime.now(dt.timezone.utc).isoformat()}, indent=2)
    try:
        # O_EXCL: of two first writers, one binds and the other is checked against it.
        fd = os.open(record, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        check_lake_key(lake_root, fingerprint)
        return
    with os.fdopen(fd, "w") as f:
        f.write(body)


# ------------------------------------------------------------------ archive paths

def key_path_component(key: bytes, name: str) -> str:
    """Keyed token of one file or folder name (16 hex characters)."""
    return hmac.new(key, (PATH_COMPONENT_LABEL + name).encode("utf-8"), hashlib.sha256).hexdigest()[:PATH_TOKEN_HEX]


def key_relative_path(key: bytes, relative: str) -> str:
    """A path relative to the archive root with every component replaced by its keyed token.

    Archives are laid out by patient name, MRN or accession number; no
    component reaches the lake as written. :func:`lake.archive.resolve`
    finds the file again by keying the names it lists.
    """
    parts = PurePosixPath(relative).parts
    if not parts or PurePosixPath(relative).is_absolute() or ".." in parts:
        raise ValueError("expected a path inside the archive root, relative to it")
    return "/".join(key_path_component(key, p) for p in parts)


# ------------------------------------------------------------------ stages reading keyed partitions

KEY_FIELD = "key_fingerprint"


def stage_key_fingerprint(settings: PseudonymSettings, lake_root: Path,
                          inputs: dict[str, dict] | None = None) -> str:
    """The configured key's fingerprint, for a stage about to read ``inputs`` (``{partition: manifest}``).

    Every stage records it in the manifests it writes (:data:`KEY_FIELD`) and
    calls this first: an input whose manifest names another key, or a lake
    bound to another key, is refused with :class:`LakeKeyMismatch` naming it,
    before anything is read or written — pseudonyms of two keys never join. A
    manifest without the field (written before fingerprints were recorded) is
    judged by the lake's record alone.
    """
    fingerprint = key_fingerprint(load_key(settings))
    for partition, manifest in (inputs or {}).items():
        recorded = (manifest or {}).get(KEY_FIELD)
        if recorded is not None and recorded != fingerprint:
            raise LakeKeyMismatch(
                f"{partition} was written with the pseudonym key of fingerprint {recorded}; the configured key "
                f"has fingerprint {fingerprint}. Pseudonyms from two keys never join: configure the key that "
                f"wrote it ({KEY_FILE_ENV}), or rebuild the lake with this one")
    check_lake_key(lake_root, fingerprint)
    return fingerprint
