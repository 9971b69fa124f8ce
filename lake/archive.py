"""Where the imaging tables' files are: keyed relative paths resolved against the archive root.

The DICOM index stores each file as its path relative to the archive root
with every component keyed (lake.keys.key_relative_path), never as written:
folder and file names often carry patient names, MRNs or accession numbers.
A reader that holds the key finds the file by listing each folder on the
way down and keying the names it sees (each listing once per process).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conf.settings import Settings
from lake.commit import read_manifest
from lake.keys import KeyFile, executor_key_file, key_path_component
from lake.paths import LakePaths

# Written in the imaging tables' manifests by the index; readers check it.
PATH_SCHEME = "keyed-relative-v1"

_LISTINGS: dict[tuple[str, str], dict[str, str]] = {}


class ArchivePathError(FileNotFoundError):
    """A keyed path names no file under the archive root (the archive changed, or another root or key)."""


@dataclass(frozen=True)
class Archive:
    """The archive root and the key that keyed its paths (picklable: travels to Ray and Spark tasks)."""

    root: str
    key_file: KeyFile

    def resolve(self, keyed: str) -> Path:
        """The file a keyed relative path names, under the archive root."""
        key = self.key_file.load()
        current = Path(self.root)
        for token in keyed.split("/"):
            cache_key = (self.key_file.fingerprint, str(current))
            names = _LISTINGS.get(cache_key)
            if names is None:
                try:
                    entries = os.listdir(current)
                except OSError:
                    entries = []
                names = {key_path_component(key, n): n for n in entries}
                _LISTINGS[cache_key] = names
            name = names.get(token)
            if name is None:
                raise ArchivePathError(f"no entry under {current} matches the indexed path; the archive "
                                       f"changed since `dicom index` ran, or {self.root} is not the "
                                       "archive root it indexed: re-run the index")
            current = current / name
        return current

    def resolve_all(self, keyed: list[str]) -> list[Path]:
        """:meth:`resolve` of each path, in order."""
        return [self.resolve(k) for k in keyed]


def archive_for(manifest: dict[str, Any], key_file: KeyFile, root_override: Path | None = None) -> Archive | None:
    """The :class:`Archive` an imaging table's manifest describes, or None when its paths are stored as written.

    ``root_override`` (the configured DICOM input, ``inputs.dicom_dir``) wins
    over the root recorded at indexing, for archives mounted elsewhere on
    the scoring machines.
    """
    if manifest.get("path_scheme") != PATH_SCHEME:
        return None
    if manifest.get("key_fingerprint") != key_file.fingerprint:
        raise ArchivePathError(f"the imaging index was keyed with fingerprint {manifest.get('key_fingerprint')}, "
                               f"the configured key is {key_file.fingerprint}; use the lake's key")
    root = root_override or manifest.get("archive_root")
    if not root:
        raise ArchivePathError("the imaging index records no archive root; set MEDSCREEN_INPUTS__DICOM_DIR")
    return Archive(str(Path(root).resolve()), key_file)


def imaging_archive(settings: Settings) -> Archive | None:
    """The archive behind the lake's DICOM series index (None when its paths are stored as written).

    Loads the key only when the index keyed its paths; the key must be the lake's.
    """
    manifest = read_manifest(LakePaths(settings.lake.root).dicom_series)
    if manifest.get("path_scheme") != PATH_SCHEME:
        return None
    return archive_for(manifest, executor_key_file(settings.pseudonym), settings.inputs.dicom_dir)
