"""Disease definitions as concept sets (conf/code_groups.yaml) and their one evaluator.

Each group is a concept set over four vocabularies (see the YAML's header):
ICD-10-CM prefixes and category ranges, ICD-9-CM (extra prefixes plus every
code whose CMS GEM targets fall in the group), SNOMED CT concept ids and OMOP
standard concept ids (plus their descendants when an OMOP CDM brings its
``concept_ancestor`` table: :meth:`CodeGroups.with_omop_descendants`).

:meth:`CodeGroups.groups_for` (``groups_for(system, code)``) is the only
place membership is decided: the FHIR and OMOP parsers put its answer on
every event (``code_groups``), and the timelines' flags and labels, the Spark
job and the cohorts read that column, so a group means the same thing
everywhere by construction.

Validation at load: every ICD-10-CM entry is a real category or code, every
ICD-9-CM entry a prefix of a real diagnosis code, every SNOMED CT id well
formed (digits, concept partition, Verhoeff check digit) with a description,
every OMOP id a positive integer with a name, every group cites at least one
declared source, and the file has a version. A typo fails the load naming the
group and the entry instead of silently matching nothing.

Pure: no Spark, Ray or Airflow.
"""
from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lake.schemas import SYSTEM_ICD9CM, SYSTEM_ICD10CM, SYSTEM_OMOP, SYSTEM_SNOMED, SYSTEM_TEXT
from preprocessing.icd import (gem_icd10cm_targets, icd9cm_codes, is_valid_icd10cm, normalise_icd9cm,
                               normalise_icd10cm)

# The shipped definitions (a path, not an import of conf: preprocessing sits below conf's users).
DEFAULT_FILE = Path(__file__).resolve().parents[1] / "conf" / "code_groups.yaml"


class CodeGroupsError(ValueError):
    """The code-groups file is missing, malformed, or names a code that does not exist."""


# Verhoeff dihedral-group tables (SNOMED CT identifiers end in a Verhoeff check digit).
_VD = ((0, 1, 2, 3, 4, 5, 6, 7, 8, 9), (1, 2, 3, 4, 0, 6, 7, 8, 9, 5), (2, 3, 4, 0, 1, 7, 8, 9, 5, 6),
       (3, 4, 0, 1, 2, 8, 9, 5, 6, 7), (4, 0, 1, 2, 3, 9, 5, 6, 7, 8), (5, 9, 8, 7, 6, 0, 4, 3, 2, 1),
       (6, 5, 9, 8, 7, 1, 0, 4, 3, 2), (7, 6, 5, 9, 8, 2, 1, 0, 4, 3), (8, 7, 6, 5, 9, 3, 2, 1, 0, 4),
       (9, 8, 7, 6, 5, 4, 3, 2, 1, 0))
_VP = ((0, 1, 2, 3, 4, 5, 6, 7, 8, 9), (1, 5, 7, 6, 2, 8, 3, 0, 9, 4), (5, 8, 0, 3, 7, 9, 6, 1, 4, 2),
       (8, 9, 1, 6, 0, 4, 3, 5, 2, 7), (9, 4, 5, 3, 1, 2, 6, 8, 7, 0), (4, 2, 8, 6, 5, 7, 3, 9, 0, 1),
       (2, 7, 9, 3, 8, 0, 6, 4, 1, 5), (7, 0, 4, 6, 9, 1, 3, 2, 5, 8))
# Partition identifiers of concepts: 00 (International Edition), 10 (extension).
_CONCEPT_PARTITIONS = ("00", "10")


def is_snomed_concept_id(sctid: str) -> bool:
    """True when ``sctid`` is a well-formed SNOMED CT concept identifier.

    6 to 18 digits, no leading zero, a concept partition identifier
    (``00`` or ``10`` before the check digit) and a valid Verhoeff check digit.
    Says nothing about whether the concept exists in a release.
    """
    s = str(sctid)
    if not (6 <= len(s) <= 18 and s.isdigit() and s[0] != "0" and s[-3:-1] in _CONCEPT_PARTITIONS):
        return False
    c = 0
    for i, ch in enumerate(reversed(s)):
        c = _VD[c][_VP[i % 8][int(ch)]]
    return c == 0


@dataclass(frozen=True)
class _Range:
    first: str  # category, e.g. "E08"
    last: str

    def matches(self, code: str) -> bool:
        # Categories are letter + two characters; same-letter string order is code order.
        return self.first <= code[:3] <= self.last


@dataclass(frozen=True)
class ConceptSet:
    """One group's definition over the four vocabularies."""

    name: str
    description: str
    sources: tuple[str, ...]
    icd10cm_prefixes: tuple[str, ...]
    icd10cm_ranges: tuple[_Range, ...]
    icd9cm_prefixes: tuple[str, ...]
    snomed: dict[str, str]           # concept id → fully specified name
    omop: dict[str, str]             # concept id (decimal) → concept name

    def has_icd10cm(self, code: str) -> bool:
        # Canonical codes are dotted after three characters, so a prefix match is exact
        # ("I13.0" covers I13.0 and its children, never I13.1).
        return code.startswith(self.icd10cm_prefixes) or any(r.matches(code) for r in self.icd10cm_ranges)


@dataclass(frozen=True)
class CodeGroups:
    """Validated concept sets; :meth:`groups_for` is the one membership evaluator."""

    sets: tuple[ConceptSet, ...]
    version: str
    sources: dict[str, dict[str, str]]
    source: str                      # the file the sets came from
    sha256: str                      # of the file's bytes (plus any OMOP descendants added)
    # OMOP concept id → groups it joins as a descendant of a listed concept (concept_ancestor).
    omop_descendants: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_memo", {})

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.sets)

    def groups_for(self, system: str | None, code: str | None) -> list[str]:
        """Names of every group the ``(system, code)`` pair belongs to, in file order.

        ``system`` is a lake code system: ``icd10cm`` (dotted, as the parsers
        write it), ``icd9cm`` (dotted), ``snomed`` (concept id), ``omop``
        (concept id in decimal) or ``text`` (a note mention whose code is a
        group name). Any other system, or a code in none of the sets, gives [].
        """
        key = (system, code)
        memo: dict[tuple[Any, Any], tuple[str, ...]] = self._memo  # type: ignore[attr-defined]
        got = memo.get(key)
        if got is None:
            got = self._evaluate(system, code)
            if len(memo) > 200_000:
                memo.clear()
            memo[key] = got
        return list(got)

    __call__ = groups_for

    def _evaluate(self, system: str | None, code: str | None) -> tuple[str, ...]:
        if code is None or system is None:
            return ()
        code = str(code).strip()
        if system == SYSTEM_ICD10CM:
            c = normalise_icd10cm(code)
            return tuple(s.name for s in self.sets if c and s.has_icd10cm(c))
        if system == SYSTEM_ICD9CM:
            c9 = normalise_icd9cm(code)
            if c9 is None:
                return ()
            targets = gem_icd10cm_targets(c9)
            return tuple(s.name for s in self.sets
                         if (s.icd9cm_prefixes and c9.startswith(s.icd9cm_prefixes))
                         or any(s.has_icd10cm(t) for t in targets))
        if system == SYSTEM_SNOMED:
            return tuple(s.name for s in self.sets if code in s.snomed)
        if system == SYSTEM_OMOP:
            extra = self.omop_descendants.get(code, ())
            return tuple(s.name for s in self.sets if code in s.omop or s.name in extra)
        if system == SYSTEM_TEXT:
            return (code,) if code in self.names else ()
        return ()

    def omop_concept_ids(self) -> dict[str, tuple[str, ...]]:
        """Listed OMOP concept id → groups listing it (the ancestors to expand)."""
        out: dict[str, list[str]] = {}
        for s in self.sets:
            for cid in s.omop:
                out.setdefault(cid, []).append(s.name)
        return {k: tuple(v) for k, v in out.items()}

    def with_omop_descendants(self, pairs: Iterable[tuple[str | int, str | int]]) -> "CodeGroups":
        """A copy whose OMOP sets include descendants: ``pairs`` are (ancestor, descendant) ids
        from a CDM's ``concept_ancestor`` table (rows of other ancestors are ignored)."""
        listed = self.omop_concept_ids()
        extra: dict[str, set[str]] = {k: set(v) for k, v in self.omop_descendants.items()}
        for anc, desc in pairs:
            groups = listed.get(str(anc))
            if groups:
                extra.setdefault(str(desc), set()).update(groups)
        digest = hashlib.sha256(self.sha256.encode())
        for k in sorted(extra):
            digest.update(f"{k}:{','.join(sorted(extra[k]))};".encode())
        return CodeGroups(self.sets, self.version, self.sources, self.source, digest.hexdigest(),
                          {k: tuple(sorted(v)) for k, v in extra.items()})

    def __hash__(self) -> int:
        return hash((self.source, self.sha256))


def _check_icd10(group: str, entry: str, part: str) -> str:
    code = normalise_icd10cm(part)
    if code is None or code != part.strip().upper() or not is_valid_icd10cm(code):
        raise CodeGroupsError(
            f"code group {group!r}: entry {entry!r} is not a real ICD-10-CM category or code "
            f"({part.strip()!r}); fix conf/code_groups.yaml (write codes dotted, e.g. I13.0)")
    return code


def _icd10_entries(name: str, entries: Any, path: Path) -> tuple[tuple[str, ...], tuple[_Range, ...]]:
    if not isinstance(entries, list) or not entries:
        raise CodeGroupsError(f"code group {name!r} in {path}: needs a non-empty list 'icd10cm:'")
    ps, rs = [], []
    for entry in entries:
        entry_s = str(entry)
        if "-" in entry_s:
            first_s, _, last_s = entry_s.partition("-")
            first = _check_icd10(name, entry_s, first_s)
            last = _check_icd10(name, entry_s, last_s)
            if len(first) != 3 or len(last) != 3 or first[0] != last[0] or first > last:
                raise CodeGroupsError(
                    f"code group {name!r}: range {entry_s!r} must run between two categories "
                    "of the same letter, low to high (e.g. E08-E13)")
            rs.append(_Range(first, last))
        else:
            ps.append(_check_icd10(name, entry_s, entry_s))
    return tuple(ps), tuple(rs)


def _icd9_entries(name: str, entries: Any, path: Path) -> tuple[str, ...]:
    if entries is None:
        return ()
    if not isinstance(entries, list):
        raise CodeGroupsError(f"code group {name!r} in {path}: 'icd9cm:' must be a list of codes")
    known = icd9cm_codes()
    out = []
    for entry in entries:
        code = normalise_icd9cm(str(entry))
        if code is None or not any(k == code or k.startswith(code) for k in known):
            raise CodeGroupsError(
                f"code group {name!r}: entry {str(entry)!r} is not a prefix of any ICD-9-CM "
                "diagnosis code (CMS v32); fix conf/code_groups.yaml (write codes dotted, e.g. 250.00)")
        out.append(code)
    return tuple(out)


def _described(name: str, system: str, entries: Any, path: Path) -> dict[str, str]:
    if entries is None:
        return {}
    if not isinstance(entries, dict):
        raise CodeGroupsError(f"code group {name!r} in {path}: '{system}:' must map each concept id "
                              "to its description (id: name)")
    out = {}
    for cid, desc in entries.items():
        cid_s = str(cid).strip()
        if not isinstance(desc, str) or not desc.strip():
            raise CodeGroupsError(f"code group {name!r}: {system} entry {cid_s!r} has no description; "
                                  "give the concept's name")
        if system == SYSTEM_SNOMED and not is_snomed_concept_id(cid_s):
            raise CodeGroupsError(f"code group {name!r}: SNOMED CT entry {cid_s!r} is not a well-formed "
                                  "concept id (digits, concept partition, Verhoeff check digit)")
        if system == SYSTEM_OMOP and not (cid_s.isdigit() and int(cid_s) > 0):
            raise CodeGroupsError(f"code group {name!r}: OMOP entry {cid_s!r} is not a positive "
                                  "integer concept id")
        out[str(int(cid_s))] = desc.strip()
    return out


def load_code_groups(path: str | Path = DEFAULT_FILE) -> CodeGroups:
    """Load and validate a code-groups YAML file; raise CodeGroupsError naming the bad group/entry."""
    return _load_cached(str(Path(path).resolve()))


@functools.lru_cache(maxsize=8)
def _load_cached(path_str: str) -> CodeGroups:
    path = Path(path_str)
    if not path.is_file():
        raise CodeGroupsError(f"code groups file {path} does not exist; set "
                              "extraction.code_groups_file (MEDSCREEN_EXTRACTION__CODE_GROUPS_FILE)")
    raw = path.read_bytes()
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise CodeGroupsError(f"code groups file {path} is not valid YAML: {exc}") from None
    groups = data.get("groups") if isinstance(data, dict) else None
    if not isinstance(groups, dict) or not groups:
        raise CodeGroupsError(f"code groups file {path} needs a non-empty mapping 'groups:'")
    version = data.get("version")
    if version is None or not str(version).strip():
        raise CodeGroupsError(f"code groups file {path} needs a 'version:' (bump it when a set changes)")
    sources = data.get("sources") or {}
    if not isinstance(sources, dict):
        raise CodeGroupsError(f"code groups file {path}: 'sources:' must map a key to a citation")
    for key, src in sources.items():
        if not isinstance(src, dict) or not all(str(src.get(k) or "").strip() for k in ("title", "version")):
            raise CodeGroupsError(f"source {key!r} in {path}: needs a title and a version")
    sets = []
    for name, spec in groups.items():
        name = str(name)
        if not isinstance(spec, dict):
            raise CodeGroupsError(f"code group {name!r} in {path}: needs a mapping with 'icd10cm:'")
        cited = spec.get("sources")
        if not isinstance(cited, list) or not cited:
            raise CodeGroupsError(f"code group {name!r} in {path}: needs 'sources:' naming at least "
                                  "one of the file's sources")
        unknown = [str(c) for c in cited if str(c) not in sources]
        if unknown:
            raise CodeGroupsError(f"code group {name!r}: sources {unknown} are not declared under "
                                  f"'sources:' in {path}")
        prefixes, ranges = _icd10_entries(name, spec.get("icd10cm"), path)
        sets.append(ConceptSet(
            name=name, description=str(spec.get("description") or name),
            sources=tuple(str(c) for c in cited), icd10cm_prefixes=prefixes, icd10cm_ranges=ranges,
            icd9cm_prefixes=_icd9_entries(name, spec.get("icd9cm"), path),
            snomed=_described(name, SYSTEM_SNOMED, spec.get("snomed"), path),
            omop=_described(name, SYSTEM_OMOP, spec.get("omop"), path)))
    return CodeGroups(tuple(sets), str(version), {str(k): {kk: str(vv) for kk, vv in v.items()}
                                                  for k, v in sources.items()},
                      str(path), hashlib.sha256(raw).hexdigest())


def groups_for(system: str | None, code: str | None, path: str | Path = DEFAULT_FILE) -> list[str]:
    """Group names of ``(system, code)`` under the groups file ``path`` (loaded once per process)."""
    return load_code_groups(path).groups_for(system, code)
