"""Pseudonymised keys: HMAC-SHA256 of a source identifier, first 32 hex characters.

Raw patient identifiers and DICOM UIDs never leave ingest; everything after it
carries these keys only.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path

from conf.settings import PseudonymSettings


class PseudonymKeyError(RuntimeError):
    """No usable pseudonymisation key."""


def pseudonymise(key: bytes, source_id: str) -> str:
    """First 32 hex characters of HMAC-SHA256(key, source_id)."""
    return hmac.new(key, str(source_id).encode("utf-8"), hashlib.sha256).hexdigest()[:32]


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
    """Write a new random key (hex) to ``path`` with mode 0600, unless it already exists."""
    path = Path(path)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path


def load_key(settings: PseudonymSettings) -> bytes:
    """The key from the environment variable, else from the 0600 key file; else a clear error."""
    value = os.environ.get(settings.key_env)
    if value:
        return value.strip().encode("utf-8")
    if settings.key_file is not None:
        path = Path(settings.key_file)
        if not path.is_file():
            raise PseudonymKeyError(f"pseudonym key file {path} does not exist; create it "
                                    "(medscreen demo does) or set " + settings.key_env)
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise PseudonymKeyError(f"pseudonym key file {path} has mode {oct(mode)}; "
                                    f"it must be readable by its owner only: chmod 600 {path}")
        key = path.read_text().strip()
        if len(key) < 16:
            raise PseudonymKeyError(f"pseudonym key in {path} is shorter than 16 characters")
        return key.encode("utf-8")
    raise PseudonymKeyError(f"no pseudonym key: set {settings.key_env} or "
                            "MEDSCREEN_PSEUDONYM__KEY_FILE to a 0600 key file")
