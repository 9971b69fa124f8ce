"""Chronic-disease code groups over ICD-10-CM (conf/code_groups.yaml).

A group is a list of entries: a code prefix (``N18``, ``I13.0``) or an
inclusive range of categories (``E08-E13``). Every entry is checked against
the ICD-10-CM code set at load; a typo fails the load with a message naming
the group and the entry, instead of silently matching nothing.

Pure: no Spark, Ray or Airflow.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import yaml

from preprocessing.icd import is_valid_icd10cm, normalise_icd10cm


class CodeGroupsError(ValueError):
    """The code-groups file is missing, malformed, or names a code that does not exist."""


@dataclass(frozen=True)
class _Range:
    first: str  # category, e.g. "E08"
    last: str

    def matches(self, code: str) -> bool:
        cat = code[:3]
        # Categories are letter + two characters; same-letter string order is code order.
        return self.first <= cat <= self.last


@dataclass(frozen=True)
class CodeGroups:
    """Validated code groups; call :meth:`groups_for` (or the instance) with a dotted ICD-10-CM code."""

    prefixes: dict[str, tuple[str, ...]]
    ranges: dict[str, tuple[_Range, ...]]
    names: tuple[str, ...]
    source: str

    def groups_for(self, code: str) -> list[str]:
        """Names of every group ``code`` (canonical dotted ICD-10-CM) belongs to, in file order."""
        return list(self._cached(code))

    __call__ = groups_for

    @functools.lru_cache(maxsize=65536)  # noqa: B019 - instances are few and live for the process
    def _cached(self, code: str) -> tuple[str, ...]:
        out = []
        for name in self.names:
            # Canonical codes are dotted after three characters, so a prefix match is exact
            # ("I13.0" covers I13.0 and its children, never I13.1).
            if any(code.startswith(p) for p in self.prefixes[name]) or \
                    any(r.matches(code) for r in self.ranges[name]):
                out.append(name)
        return tuple(out)

    def __hash__(self) -> int:
        return hash((self.source, self.names))


def _check_code(group: str, entry: str, part: str) -> str:
    code = normalise_icd10cm(part)
    if code is None or code != part.strip().upper() or not is_valid_icd10cm(code):
        raise CodeGroupsError(
            f"code group {group!r}: entry {entry!r} is not a real ICD-10-CM category or code "
            f"({part.strip()!r}); fix conf/code_groups.yaml (write codes dotted, e.g. I13.0)")
    return code


def load_code_groups(path: str | Path) -> CodeGroups:
    """Load and validate a code-groups YAML file; raise CodeGroupsError naming the bad group/entry."""
    path = Path(path)
    return _load_cached(str(path.resolve()))


@functools.lru_cache(maxsize=8)
def _load_cached(path_str: str) -> CodeGroups:
    path = Path(path_str)
    if not path.is_file():
        raise CodeGroupsError(f"code groups file {path} does not exist; set "
                              "extraction.code_groups_file (MEDSCREEN_EXTRACTION__CODE_GROUPS_FILE)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise CodeGroupsError(f"code groups file {path} is not valid YAML: {exc}") from None
    groups = (data or {}).get("groups") if isinstance(data, dict) else None
    if not isinstance(groups, dict) or not groups:
        raise CodeGroupsError(f"code groups file {path} needs a non-empty mapping 'groups:'")
    prefixes: dict[str, tuple[str, ...]] = {}
    ranges: dict[str, tuple[_Range, ...]] = {}
    for name, spec in groups.items():
        entries = spec.get("codes") if isinstance(spec, dict) else spec
        if not isinstance(entries, list) or not entries:
            raise CodeGroupsError(f"code group {name!r} in {path}: needs a non-empty list 'codes:'")
        ps, rs = [], []
        for entry in entries:
            entry_s = str(entry)
            if "-" in entry_s:
                first_s, _, last_s = entry_s.partition("-")
                first = _check_code(name, entry_s, first_s)
                last = _check_code(name, entry_s, last_s)
                if len(first) != 3 or len(last) != 3 or first[0] != last[0] or first > last:
                    raise CodeGroupsError(
                        f"code group {name!r}: range {entry_s!r} must run between two categories "
                        "of the same letter, low to high (e.g. E08-E13)")
                rs.append(_Range(first, last))
            else:
                ps.append(_check_code(name, entry_s, entry_s))
        prefixes[str(name)] = tuple(ps)
        ranges[str(name)] = tuple(rs)
    return CodeGroups(prefixes=prefixes, ranges=ranges, names=tuple(str(n) for n in groups),
                      source=str(path))


def groups_for(code: str, path: str | Path) -> list[str]:
    """Group names of ``code`` under the groups file ``path`` (loaded once per process)."""
    return load_code_groups(path).groups_for(code)
