"""PHI audit: read the identifiers in the raw inputs, look for them in everything a run wrote.

Identifiers come from the inputs themselves, so the audit checks the actual
patients of this lake, not a pattern list:

- FHIR (``*.ndjson``, ``*.ndjson.gz``): Patient ``id``, ``identifier[].value``
  (MRN, SSN …), names (given + family, both orders; a family name alone when
  it is long enough to be specific), address lines, city, postal code with
  city, phone numbers (as written and digits only), exact ``birthDate``.
- OMOP CDM (``person``, ``location`` as CSV or Parquet): ``person_source_value``,
  location address lines, city, zip with city, ``location_source_value``.
- DICOM (any other file with a Part 10 header): ``PatientName``,
  ``PatientID``, ``AccessionNumber``, ``InstitutionName``,
  ``PatientBirthDate``, and every folder and file name below the input root.

Everything under the lake (and any extra folders, e.g. task logs) is
scanned: string columns of Parquet files (lists of strings included),
JSON, HTML, logs and other text. Matching is on whole words, case-insensitive,
with any punctuation between the words of an identifier (``DOE^JANE`` matches
``Doe, Jane`` and ``doe_jane``). Findings name the file, the column or line,
the kind of identifier and a masked form of it, never the identifier itself.
"""
from __future__ import annotations

import csv
import gzip
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

_TOKEN = re.compile(r"[0-9A-Za-z]+")
# Text files the audit reads; anything else that is not Parquet is listed as not scanned.
TEXT_SUFFIXES = {".json", ".html", ".htm", ".log", ".txt", ".csv", ".tsv", ".md", ".yaml", ".yml",
                 ".ndjson", ".jsonl", ".out", ".err"}
# Shorter family names are too often ordinary words to mean a patient on their own.
MIN_SINGLE_NAME_CHARS = 5
MAX_TEXT_BYTES = 256 * 2**20


def tokens(text: str) -> tuple[str, ...]:
    """Lower-cased runs of letters and digits: the unit identifiers are matched in."""
    return tuple(t.lower() for t in _TOKEN.findall(text))


@dataclass(frozen=True)
class Identifier:
    kind: str           # e.g. fhir.name, dicom.PatientID, dicom.path
    words: tuple[str, ...]

    @property
    def masked(self) -> str:
        flat = "".join(self.words)
        return f"{flat[:1]}{'*' * (len(flat) - 1)} ({len(flat)} chars)"


def _specific(words: tuple[str, ...]) -> bool:
    """Long enough to mean one patient, not an ordinary word or a small number."""
    flat = "".join(words)
    has_letter = any(c.isalpha() for c in flat)
    return (has_letter and len(flat) >= 4) or (not has_letter and len(flat) >= 6)


@dataclass
class IdentifierSet:
    """Identifiers by first word, for a linear scan of a token stream."""

    by_first: dict[str, list[Identifier]] = field(default_factory=dict)
    sources: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, value: object) -> None:
        if value is None:
            return
        words = tokens(str(value))
        if not words or not _specific(words):
            return
        ident = Identifier(kind, words)
        bucket = self.by_first.setdefault(words[0], [])
        if ident not in bucket:
            bucket.append(ident)
            self.sources[kind] = self.sources.get(kind, 0) + 1

    def __len__(self) -> int:
        return sum(len(v) for v in self.by_first.values())

    def find(self, words: tuple[str, ...]) -> Iterator[Identifier]:
        """Each identifier whose words occur consecutively in ``words``."""
        for i, w in enumerate(words):
            for ident in self.by_first.get(w, ()):
                n = len(ident.words)
                if words[i:i + n] == ident.words:
                    yield ident


# ---------------------------------------------------------------- identifiers from inputs

def _add_name(ids: IdentifierSet, kind: str, given: list[str], family: list[str]) -> None:
    given = [g for g in given if g]
    family = [f for f in family if f]
    if given and family:
        ids.add(kind, " ".join(given + family))
        ids.add(kind, " ".join(family + given))
        ids.add(kind, " ".join(given[:1] + family))
        ids.add(kind, " ".join(family + given[:1]))
    for f in family:
        if len("".join(tokens(f))) >= MIN_SINGLE_NAME_CHARS:
            ids.add(kind, f)


def fhir_patient_identifiers(ids: IdentifierSet, res: dict) -> None:
    """Identifiers of one FHIR Patient resource."""
    ids.add("fhir.id", res.get("id"))
    for ident in res.get("identifier") or []:
        ids.add("fhir.identifier", ident.get("value"))
    for name in res.get("name") or []:
        _add_name(ids, "fhir.name", list(name.get("given") or []),
                  [name["family"]] if isinstance(name.get("family"), str) else [])
        ids.add("fhir.name", name.get("text"))
    for addr in res.get("address") or []:
        for line in addr.get("line") or []:
            ids.add("fhir.address", line)
        ids.add("fhir.address", addr.get("text"))
        if addr.get("city"):
            ids.add("fhir.address", addr["city"])
            if addr.get("postalCode"):
                ids.add("fhir.address", f"{addr['city']} {addr.get('state', '')} {addr['postalCode']}"
                        if addr.get("state") else f"{addr['city']} {addr['postalCode']}")
    for tel in res.get("telecom") or []:
        if tel.get("system") in ("phone", "fax", "sms", None) and tel.get("value"):
            ids.add("fhir.phone", tel["value"])
            ids.add("fhir.phone", "".join(ch for ch in tel["value"] if ch.isdigit()))
        elif tel.get("system") == "email":
            ids.add("fhir.email", tel.get("value"))
    ids.add("fhir.birthDate", res.get("birthDate"))


def _fhir_lines(path: Path) -> Iterator[str]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        yield from f


def _read_fhir(ids: IdentifierSet, path: Path) -> None:
    for line in _fhir_lines(path):
        if '"Patient"' not in line:
            continue
        try:
            res = json.loads(line)
        except ValueError:
            continue  # a malformed line holds nothing the lake could have taken from it
        if isinstance(res, dict) and res.get("resourceType") == "Patient":
            fhir_patient_identifiers(ids, res)


def _omop_rows(path: Path) -> Iterator[dict[str, str]]:
    if path.name.lower().endswith(".parquet"):
        for row in pq.read_table(path).to_pylist():
            yield {str(k).lower(): v for k, v in row.items()}
        return
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace", newline="") as f:
        first = f.readline()
        delimiter = "\t" if "\t" in first and "," not in first else ","
        header = [h.strip().lower() for h in next(csv.reader([first], delimiter=delimiter))]
        for row in csv.reader(f, delimiter=delimiter):
            yield dict(zip(header, row))


def _read_omop(ids: IdentifierSet, path: Path, table: str) -> None:
    for row in _omop_rows(path):
        if table == "person":
            ids.add("omop.person_source_value", row.get("person_source_value"))
        else:
            for col in ("address_1", "address_2", "location_source_value"):
                ids.add("omop.location", row.get(col))
            if row.get("city"):
                ids.add("omop.location", row["city"])
                if row.get("zip"):
                    ids.add("omop.location", f"{row['city']} {row.get('state') or ''} {row['zip']}")


def _is_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _read_dicom(ids: IdentifierSet, path: Path) -> None:
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:  # damaged headers are the index's business; their path components still count
        return
    name = ds.get("PatientName")
    if name is not None:
        pn = str(name)
        ids.add("dicom.PatientName", pn)
        parts = pn.split("^")
        _add_name(ids, "dicom.PatientName", parts[1:2], parts[:1])
    for tag in ("PatientID", "AccessionNumber", "InstitutionName", "PatientBirthDate", "OtherPatientIDs"):
        value = ds.get(tag)
        if value is not None:
            ids.add(f"dicom.{tag}", str(value))


OMOP_TABLES = {"person", "location"}


def _omop_table(path: Path) -> str | None:
    name = path.name.lower()
    for suffix in (".csv.gz", ".csv", ".tsv", ".parquet"):
        if name.endswith(suffix):
            stem = name[: -len(suffix)]
            return stem if stem in OMOP_TABLES else None
    return None


def read_identifiers(inputs: Iterable[Path]) -> IdentifierSet:
    """Every identifier of the inputs' patients (see the module docstring for which)."""
    ids = IdentifierSet()
    for root in inputs:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"audit input {root} is not a directory; pass the EMR export or "
                                    "DICOM archive folder the runs read")
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for fname in sorted(filenames):
                path = Path(dirpath) / fname
                lower = fname.lower()
                if lower.endswith((".ndjson", ".ndjson.gz")):
                    _read_fhir(ids, path)
                    continue
                table = _omop_table(path)
                if table is not None:
                    _read_omop(ids, path, table)
                    continue
                if lower.endswith((".csv", ".csv.gz", ".tsv", ".parquet", ".json")) and \
                        not _is_dicom(path):
                    continue  # other EMR tables and export manifests: named by type, not by patient
                if _is_dicom(path):
                    _read_dicom(ids, path)
                # Archives are laid out by patient name, MRN, accession: every name below the root.
                for part in path.relative_to(root).parts:
                    ids.add("dicom.path", part)
    return ids


# ---------------------------------------------------------------- scanning outputs

@dataclass(frozen=True)
class Finding:
    file: str
    where: str          # column name or line number
    kind: str
    masked: str
    count: int


def _string_values(column: pa.ChunkedArray) -> pa.Array | None:
    t = column.type
    while pa.types.is_list(t) or pa.types.is_large_list(t):
        column = pc.list_flatten(column)
        t = column.type
    if pa.types.is_dictionary(t):
        column = column.cast(t.value_type)
        t = column.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return pc.unique(column)
    return None  # numbers, dates, binary: no text to hold a name


def _parquet_columns(path: Path) -> Iterator[tuple[str, pa.ChunkedArray]]:
    table = pq.read_table(path, partitioning=None)
    stack = [(f.name, table.column(f.name)) for f in table.schema]
    while stack:
        name, col = stack.pop()
        if pa.types.is_struct(col.type):
            for i, f in enumerate(col.type):  # nested records: every field is scanned
                stack.append((f"{name}.{f.name}",
                              pa.chunked_array([pc.struct_field(c, [i]) for c in col.chunks], type=f.type)))
        elif pa.types.is_list(col.type) and pa.types.is_struct(col.type.value_type):
            stack.append((name + "[]", pc.list_flatten(col)))
        else:
            yield name, col


def _looks_like_text(path: Path) -> bool:
    """Locks, markers, files without a suffix: text when their first 8 KiB decode and hold no NUL."""
    try:
        with open(path, "rb") as f:
            head = f.read(8192)
        head.decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return b"\0" not in head and path.stat().st_size <= MAX_TEXT_BYTES


def scan_file(path: Path, ids: IdentifierSet, label: str) -> tuple[list[Finding], bool]:
    """Findings in one file, and whether it could be scanned at all."""
    counts: dict[tuple[str, Identifier], int] = {}
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        for name, col in _parquet_columns(path):
            values = _string_values(col)
            if values is None:
                continue
            for v in values.to_pylist():
                if v:
                    for ident in ids.find(tokens(v)):
                        counts[(name, ident)] = counts.get((name, ident), 0) + 1
    elif suffix in TEXT_SUFFIXES or _looks_like_text(path):
        if path.stat().st_size > MAX_TEXT_BYTES:
            return [], False
        with open(path, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, start=1):
                for ident in ids.find(tokens(line)):
                    key = (f"line {n}", ident)
                    counts[key] = counts.get(key, 0) + 1
    else:
        return [], False
    return [Finding(label, where, ident.kind, ident.masked, c) for (where, ident), c in sorted(
        counts.items(), key=lambda kv: (kv[0][0], kv[0][1].kind))], True


@dataclass
class AuditResult:
    identifiers: int
    identifier_kinds: dict[str, int]
    files_scanned: int
    not_scanned: list[str]
    findings: list[Finding]

    @property
    def clean(self) -> bool:
        return not self.findings


def audit(lake: Path, inputs: Iterable[Path], extra: Iterable[Path] = ()) -> AuditResult:
    """Scan every file under ``lake`` (and ``extra`` folders or files) for the inputs' identifiers."""
    inputs = [Path(p).resolve() for p in inputs]
    ids = read_identifiers(inputs)
    findings: list[Finding] = []
    scanned, skipped = 0, []
    for root in [Path(lake), *map(Path, extra)]:
        if not root.exists():
            raise FileNotFoundError(f"nothing to audit at {root}; pass the lake the runs wrote (--lake)")
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            if any(path.resolve().is_relative_to(i) for i in inputs):
                continue  # the inputs hold the identifiers by definition
            label = str(path.relative_to(root)) if root.is_dir() else path.name
            label = f"{root.name}/{label}"
            found, ok = scan_file(path, ids, label)
            scanned += ok
            if not ok:
                skipped.append(label)
            findings.extend(found)
    return AuditResult(len(ids), dict(sorted(ids.sources.items())), scanned, skipped, findings)


def format_table(result: AuditResult) -> str:
    """The findings as a fixed-width table (or one line saying there are none)."""
    head = (f"PHI audit: {result.identifiers} identifiers from the inputs "
            f"({', '.join(f'{k} {v}' for k, v in result.identifier_kinds.items()) or 'none'}); "
            f"{result.files_scanned} files scanned, {len(result.not_scanned)} not scannable")
    if result.clean:
        return head + "\nno identifier found"
    rows = [("file", "column / line", "identifier kind", "identifier (masked)", "count")]
    rows += [(f.file, f.where, f.kind, f.masked, str(f.count)) for f in result.findings]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return head + f"\n{len(result.findings)} findings:\n" + "\n".join(lines)
