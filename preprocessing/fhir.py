"""FHIR R4 Bulk Data (NDJSON) record parser: one line → one :class:`ParsedRecord`.

Supported resources and what they become:

- ``Patient`` → a patients row (patient_key, birth_date, sex F|M|U, death_date,
  mrn_key). ``death_date``: the UTC date of ``deceasedDateTime``; for
  ``deceasedBoolean: true`` (death known, date not) the date of
  ``meta.lastUpdated`` (the record said so by then), else the export's date.
  ``mrn_key``: lake.keys.mrn_key of the first ``identifier`` whose type is v2-0203
  ``MR`` (use ``old`` skipped);
- ``Encounter`` → one ``encounter`` event (type, else class, coding);
- ``Condition`` → one ``dx`` event per coding, system normalised, each with
  the groups of all the Condition's codings (``groups_for``); an ICD-10-CM
  coding that is malformed or not in the code set quarantines the record
  (``malformed_code`` / ``invalid_icd10cm``); the assertion follows
  verificationStatus and clinicalStatus (:func:`condition_assertion`); the
  known time is ``recordedDate`` (else the clinical time), read as the end of
  its period;
- ``Observation`` → ``obs`` events with a numeric value (valueQuantity, and
  each component of a panel such as blood pressure, split), known at ``issued``;
- ``DocumentReference`` → the inline base64 text attachment is decoded, ICD-10-CM
  codes are extracted with their assertion → ``dx_text`` events. The note
  text itself is dropped here and never stored or logged;
- any other resource type → ignored by rule ``unsupported_resource`` (counted).

``entered-in-error`` records are ignored by rule. Times are UTC microseconds
(offsets converted, dates-only → midnight UTC). Patient ids and record ids
are hashed with the pseudonym key before they leave this module.

Pure: no Spark, Ray or Airflow.
"""
from __future__ import annotations

import base64
import binascii
import functools
import json
from typing import Any

from lake.keys import mrn_source_id
from lake.schemas import (KIND_DX, KIND_DX_TEXT, KIND_ENCOUNTER, KIND_OBS, SYSTEM_ICD9CM,
                          SYSTEM_ICD10CM, SYSTEM_LOINC)
from preprocessing.emr_record import (I_BLANK_LINE, I_ENTERED_IN_ERROR, I_NON_NUMERIC_VALUE,
                                      I_UNSUPPORTED_ATTACHMENT, I_UNSUPPORTED_RESOURCE, OK,
                                      R_FUTURE_DATE, R_INVALID_DATE,
                                      R_INVALID_SUBJECT, R_INVALID_VALUE, R_MALFORMED_CODE,
                                      R_MALFORMED_JSON, R_MISSING_ATTACHMENT, R_MISSING_CODE,
                                      R_MISSING_DATE, R_MISSING_ID, R_MISSING_RESOURCE_TYPE,
                                      R_MISSING_SUBJECT, R_MISSING_VALUE,
                                      R_UNDECODABLE_ATTACHMENT, Event, ParseContext,
                                      ParsedRecord, dx_event, ignored, parse_date,
                                      parse_datetime_us, parse_known_time_us, quarantine)
from preprocessing.icd import normalise_icd9cm, normalise_system, parse_icd10cm

SOURCE = "fhir"

_SEX = {"female": "F", "male": "M"}
# HL7 v2 table 0203 (identifier type), as FHIR R4 names it and as older exports wrote it.
_V2_0203 = ("http://terminology.hl7.org/CodeSystem/v2-0203", "http://hl7.org/fhir/v2/0203")


@functools.lru_cache(maxsize=1024)
def resource_type_from_file(file_name: str) -> str:
    """The resource type a Bulk export file name implies (``Condition.000.ndjson`` → ``Condition``)."""
    base = file_name.rsplit("/", 1)[-1]
    out = []
    for ch in base:
        if not ch.isalpha():
            break
        out.append(ch)
    return "".join(out) or "unknown"


def parse_fhir_line(line: str | None, ctx: ParseContext, file_name: str = "") -> ParsedRecord:
    """Parse one NDJSON line. Never raises for bad data: bad lines come back quarantined."""
    hinted = resource_type_from_file(file_name) if file_name else "unknown"
    if line is None or not line.strip():
        return ignored(hinted, I_BLANK_LINE, "blank line")
    try:
        res = json.loads(line)
    except (ValueError, RecursionError) as exc:
        # The line itself is the only handle on it: a keyed hash lets an operator find it
        # (hash each line of the file with the same key) without storing its content.
        msg = exc.msg if isinstance(exc, json.JSONDecodeError) else "not valid JSON"
        return quarantine(hinted, R_MALFORMED_JSON, f"{_base(file_name)}: line is not valid JSON "
                          f"({msg})", "line:" + ctx.hash(line))
    if not isinstance(res, dict):
        return quarantine(hinted, R_MALFORMED_JSON, f"{_base(file_name)}: line is JSON but not an object",
                          "line:" + ctx.hash(line))
    return parse_fhir_resource(res, ctx, hinted)


def parse_fhir_resource(res: dict[str, Any], ctx: ParseContext, hinted: str = "unknown") -> ParsedRecord:
    """Parse one decoded FHIR resource (a dict)."""
    rtype = res.get("resourceType")
    if not isinstance(rtype, str) or not rtype:
        return quarantine(hinted, R_MISSING_RESOURCE_TYPE, "resource has no resourceType")
    rid = res.get("id")
    ref = ctx.hash(f"{rtype}/{rid}") if isinstance(rid, str) and rid else None
    if rtype not in _PARSERS:
        return ignored(rtype, I_UNSUPPORTED_RESOURCE, f"{rtype} is not ingested", ref)
    if ref is None:
        return quarantine(rtype, R_MISSING_ID, f"{rtype} has no id")
    try:
        rec = _PARSERS[rtype](res, ctx, rtype, ref)
    except _Bad as bad:
        return quarantine(rtype, bad.reason, bad.detail, ref)
    rec.source_ref = ref
    return rec


class _Bad(Exception):
    """Internal: the record is quarantined with this reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def _base(file_name: str) -> str:
    return file_name.rsplit("/", 1)[-1] or "input"


def _patient(res: dict[str, Any], ctx: ParseContext, rtype: str, ref: str) -> ParsedRecord:
    birth = None
    raw_birth = res.get("birthDate")
    if raw_birth is not None:
        try:
            birth = parse_date(raw_birth)
        except (ValueError, TypeError, OverflowError):
            raise _Bad(R_INVALID_DATE, "Patient.birthDate is not a FHIR date") from None
        if birth > ctx.today:
            raise _Bad(R_FUTURE_DATE, "Patient.birthDate is in the future")
    sex = _SEX.get(res.get("gender"), "U") if isinstance(res.get("gender"), str) else "U"
    death = _death_date(res, ctx, birth)
    mrn = _mrn(res)
    return ParsedRecord(OK, rtype, patient_key=ctx.hash(res["id"]), is_patient=True,
                        birth_date=birth, sex=sex, death_date=death,
                        mrn_key=ctx.hash(mrn_source_id(mrn)) if mrn is not None else None)


def _death_date(res: dict[str, Any], ctx: ParseContext, birth: Any) -> Any:
    """Patient.deceased[x] as a UTC date (see the module docstring); None when alive or unsaid."""
    when = res.get("deceasedDateTime")
    if when is not None:
        try:
            death = parse_date(when)
        except (ValueError, TypeError, OverflowError):
            raise _Bad(R_INVALID_DATE, "Patient.deceasedDateTime is not a FHIR dateTime") from None
        if death > ctx.today:
            raise _Bad(R_FUTURE_DATE, "Patient.deceasedDateTime is in the future")
        if birth is not None and death < birth:
            raise _Bad(R_INVALID_DATE, "Patient.deceasedDateTime is before Patient.birthDate")
        return death
    if res.get("deceasedBoolean") is not True:
        return None
    # Dead, date unknown: the record said so by its last update at the latest; a timeline
    # dated after that day must not exist. Without meta.lastUpdated, the export's own date.
    meta = res.get("meta")
    updated = meta.get("lastUpdated") if isinstance(meta, dict) else None
    if updated is not None:
        try:
            return min(parse_date(updated), ctx.today)
        except (ValueError, TypeError, OverflowError):
            raise _Bad(R_INVALID_DATE, "Patient.meta.lastUpdated is not a FHIR instant") from None
    return ctx.today


def _mrn(res: dict[str, Any]) -> str | None:
    """The value of the first current identifier typed v2-0203 MR, or None."""
    identifiers = res.get("identifier")
    for ident in identifiers if isinstance(identifiers, list) else []:
        if not isinstance(ident, dict) or ident.get("use") == "old":
            continue
        is_mr = any(c.get("system") in _V2_0203 and c.get("code") == "MR" for c in _codings(ident.get("type")))
        value = ident.get("value")
        if is_mr and isinstance(value, str) and value.strip():
            return value.strip()
    return None


def _subject_key(res: dict[str, Any], ctx: ParseContext, rtype: str) -> str:
    subj = res.get("subject") or res.get("patient")
    if not isinstance(subj, dict):
        raise _Bad(R_MISSING_SUBJECT, f"{rtype}.subject is missing")
    ref = subj.get("reference")
    if not isinstance(ref, str) or not ref.strip():
        raise _Bad(R_MISSING_SUBJECT, f"{rtype}.subject has no reference")
    ref = ref.strip()
    if ref.startswith("urn:uuid:"):
        pid = ref[9:]
    elif "Patient/" in ref:
        pid = ref.rsplit("Patient/", 1)[1].split("/_history/", 1)[0]
    else:
        raise _Bad(R_INVALID_SUBJECT, f"{rtype}.subject does not reference a Patient")
    if not pid:
        raise _Bad(R_INVALID_SUBJECT, f"{rtype}.subject reference has an empty id")
    return ctx.hash(pid)


def _time(res: dict[str, Any], ctx: ParseContext, rtype: str, *paths: str) -> int:
    for path in paths:
        value: Any = res
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is None:
            continue
        try:
            t = parse_datetime_us(value)
        except (ValueError, TypeError, OverflowError):
            raise _Bad(R_INVALID_DATE, f"{rtype}.{path} is not a FHIR dateTime") from None
        if t > ctx.now_us:
            raise _Bad(R_FUTURE_DATE, f"{rtype}.{path} is in the future")
        return t
    raise _Bad(R_MISSING_DATE, f"{rtype} has none of " + ", ".join(paths))


def _codings(concept: Any) -> list[dict[str, Any]]:
    if not isinstance(concept, dict):
        return []
    codings = concept.get("coding")
    return [c for c in codings if isinstance(c, dict)] if isinstance(codings, list) else []


def _code_of(coding: dict[str, Any], rtype: str, where: str) -> tuple[str, str] | None:
    """(system, canonical code) of a coding; None when it carries no code; _Bad when unusable."""
    raw = coding.get("code")
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None
    system = normalise_system(coding.get("system"))
    if not isinstance(raw, (str, int)) or isinstance(raw, bool):
        raise _Bad(R_MALFORMED_CODE, f"{rtype}.{where}.code is not a string")
    raw = str(raw)
    if system == SYSTEM_ICD10CM:
        code, reason = parse_icd10cm(raw)
        if code is None:
            detail = ("is not an ICD-10-CM code shape" if reason == R_MALFORMED_CODE
                      else "is not in the ICD-10-CM code set")
            raise _Bad(reason or R_MALFORMED_CODE, f"{rtype}.{where}.code {detail}")
        return system, code
    if system == SYSTEM_ICD9CM:
        code9 = normalise_icd9cm(raw)
        if code9 is None:
            raise _Bad(R_MALFORMED_CODE, f"{rtype}.{where}.code is not an ICD-9-CM code shape")
        return system, code9
    return system, raw.strip()


def _entered_in_error(res: dict[str, Any]) -> bool:
    if res.get("status") == "entered-in-error" or res.get("docStatus") == "entered-in-error":
        return True
    return any(c.get("code") == "entered-in-error" for c in _codings(res.get("verificationStatus")))


def _encounter(res: dict[str, Any], ctx: ParseContext, rtype: str, ref: str) -> ParsedRecord:
    if _entered_in_error(res):
        return ignored(rtype, I_ENTERED_IN_ERROR, "status entered-in-error")
    pkey = _subject_key(res, ctx, rtype)
    t = _time(res, ctx, rtype, "period.start", "actualPeriod.start", "period.end")
    system = code = None
    types = res.get("type")
    for i, concept in enumerate(types if isinstance(types, list) else []):
        for j, coding in enumerate(_codings(concept)):
            got = _code_of(coding, rtype, f"type[{i}].coding[{j}]")
            if got:
                system, code = got
                break
        if code:
            break
    cls = res.get("class")
    if code is None and isinstance(cls, dict):
        got = _code_of(cls, rtype, "class")
        if got:
            system, code = got
    ev = Event(t, KIND_ENCOUNTER, system, code, None, None, "affirmed", [])
    return ParsedRecord(OK, rtype, patient_key=pkey, events=[ev])


# FHIR Condition.verificationStatus → assertion (entered-in-error is not an event: ignored).
VERIFICATION_ASSERTION = {"confirmed": "affirmed", "refuted": "negated", "unconfirmed": "possible",
                          "provisional": "possible", "differential": "possible"}
# Condition.clinicalStatus of a confirmed diagnosis: the disease was diagnosed at its onset
# whatever became of it, so a resolved chronic disease is still history (a CKD stage is
# resolved when the next stage is recorded; the patient still has CKD).
CLINICAL_ASSERTION = {"active": "affirmed", "recurrence": "affirmed", "relapse": "affirmed",
                      "inactive": "history", "remission": "history", "resolved": "history"}
_CONDITION_TIME = ("onsetDateTime", "onsetPeriod.start", "recordedDate", "abatementDateTime")


def _status_code(res: dict[str, Any], field: str) -> str | None:
    for c in _codings(res.get(field)):
        code = c.get("code")
        if isinstance(code, str) and code.strip():
            return code.strip().lower()
    return None


def condition_assertion(verification: str | None, clinical: str | None) -> str:
    """The assertion of a Condition from its verificationStatus and clinicalStatus codes.

    refuted → negated; unconfirmed / provisional / differential → possible
    (never prevalence, a label or a token); confirmed or absent → by clinical
    status: active / recurrence / relapse / absent → affirmed, inactive /
    remission / resolved → history. An unknown code is read as absent.
    """
    v = VERIFICATION_ASSERTION.get(verification or "", "affirmed")
    if v != "affirmed":
        return v
    return CLINICAL_ASSERTION.get(clinical or "", "affirmed")


def _value_at(res: dict[str, Any], path: str) -> Any:
    value: Any = res
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _known_time(res: dict[str, Any], ctx: ParseContext, rtype: str, recorded: tuple[str, ...],
                clinical: tuple[str, ...]) -> int:
    """When the record became known: the first ``recorded`` field, else the first ``clinical``
    one, each read as the END of its period (a partial date is known when its period ends);
    never later than the export itself."""
    for path in (*recorded, *clinical):
        value = _value_at(res, path)
        if value is None:
            continue
        try:
            start = parse_datetime_us(value)
            known = parse_known_time_us(value)
        except (ValueError, TypeError, OverflowError):
            raise _Bad(R_INVALID_DATE, f"{rtype}.{path} is not a FHIR dateTime") from None
        if start > ctx.now_us:
            raise _Bad(R_FUTURE_DATE, f"{rtype}.{path} is in the future")
        return min(known, ctx.now_us)
    raise _Bad(R_MISSING_DATE, f"{rtype} has none of " + ", ".join((*recorded, *clinical)))


def _condition(res: dict[str, Any], ctx: ParseContext, rtype: str, ref: str) -> ParsedRecord:
    if _entered_in_error(res):
        return ignored(rtype, I_ENTERED_IN_ERROR, "verificationStatus entered-in-error")
    pkey = _subject_key(res, ctx, rtype)
    codes = []
    for j, coding in enumerate(_codings(res.get("code"))):
        got = _code_of(coding, rtype, f"code.coding[{j}]")
        if got and got not in codes:
            codes.append(got)
    if not codes:
        raise _Bad(R_MISSING_CODE, "Condition.code has no coding with a code")
    t = _time(res, ctx, rtype, *_CONDITION_TIME)
    known = _known_time(res, ctx, rtype, ("recordedDate",), _CONDITION_TIME)
    assertion = condition_assertion(_status_code(res, "verificationStatus"),
                                    _status_code(res, "clinicalStatus"))
    # One Condition is one diagnosis: every coding of it carries the union of their groups
    # (an ICD-10-CM coding beside a SNOMED one must not leave the SNOMED event groupless).
    groups: list[str] = []
    for system, code in codes:
        groups += [g for g in ctx.groups.groups_for(system, code) if g not in groups]
    groups = [g for g in ctx.groups.names if g in groups]
    events = [dx_event(ctx, t, KIND_DX, system, code, assertion, known, groups=groups)
              for system, code in codes]
    return ParsedRecord(OK, rtype, patient_key=pkey, events=events)


def _number(value: Any, rtype: str, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _Bad(R_INVALID_VALUE, f"{rtype}.{where} is not a number")
    try:
        v = float(value)
    except ValueError:
        raise _Bad(R_INVALID_VALUE, f"{rtype}.{where} is not a number") from None
    if v != v or v in (float("inf"), float("-inf")):
        raise _Bad(R_INVALID_VALUE, f"{rtype}.{where} is not a finite number")
    return v


def _obs_code(concept: Any, rtype: str, where: str) -> tuple[str, str] | None:
    found = None
    for j, coding in enumerate(_codings(concept)):
        got = _code_of(coding, rtype, f"{where}.coding[{j}]")
        if got and got[0] == SYSTEM_LOINC:
            return got
        found = found or got
    return found


def _quantity(holder: dict[str, Any], rtype: str, where: str) -> tuple[float, str | None] | None:
    q = holder.get("valueQuantity")
    if not isinstance(q, dict):
        return None
    v = _number(q.get("value"), rtype, f"{where}valueQuantity.value")
    if v is None:
        return None
    unit = q.get("unit") if isinstance(q.get("unit"), str) else q.get("code")
    return v, unit if isinstance(unit, str) else None


def _observation(res: dict[str, Any], ctx: ParseContext, rtype: str, ref: str) -> ParsedRecord:
    if _entered_in_error(res):
        return ignored(rtype, I_ENTERED_IN_ERROR, "status entered-in-error")
    pkey = _subject_key(res, ctx, rtype)
    main = _obs_code(res.get("code"), rtype, "code")
    if main is None:
        raise _Bad(R_MISSING_CODE, "Observation.code has no coding with a code")
    t = _time(res, ctx, rtype, "effectiveDateTime", "effectivePeriod.start", "effectiveInstant",
              "issued")
    known = _known_time(res, ctx, rtype, ("issued",), ("effectiveDateTime", "effectivePeriod.start",
                                                      "effectiveInstant"))
    events = []
    q = _quantity(res, rtype, "")
    if q is not None:
        events.append(Event(t, KIND_OBS, main[0], main[1], q[0], q[1], "affirmed", [], known))
    comps = res.get("component")
    other_values = any(k.startswith("value") and k != "valueQuantity" for k in res)
    for i, comp in enumerate(comps if isinstance(comps, list) else []):
        if not isinstance(comp, dict):
            continue
        cq = _quantity(comp, rtype, f"component[{i}].")
        if cq is None:
            other_values = other_values or any(k.startswith("value") for k in comp)
            continue
        ccode = _obs_code(comp.get("code"), rtype, f"component[{i}].code")
        if ccode is None:
            raise _Bad(R_MISSING_CODE, f"Observation.component[{i}].code has no coding with a code")
        events.append(Event(t, KIND_OBS, ccode[0], ccode[1], cq[0], cq[1], "affirmed", [], known))
    if not events:
        if other_values:
            # Coded/text answers (smoking status, survey items) have no place in a numeric
            # event; counted, not quarantined: they are valid FHIR.
            return ignored(rtype, I_NON_NUMERIC_VALUE, "Observation value is not a quantity", ref)
        raise _Bad(R_MISSING_VALUE, "Observation has no value[x] and no component value")
    return ParsedRecord(OK, rtype, patient_key=pkey, events=events)


def _document(res: dict[str, Any], ctx: ParseContext, rtype: str, ref: str) -> ParsedRecord:
    if _entered_in_error(res):
        return ignored(rtype, I_ENTERED_IN_ERROR, "status entered-in-error")
    pkey = _subject_key(res, ctx, rtype)
    t = _time(res, ctx, rtype, "date", "context.period.start", "created")
    content = res.get("content")
    attachments = [c.get("attachment") for c in content if isinstance(c, dict)] \
        if isinstance(content, list) else []
    attachments = [a for a in attachments if isinstance(a, dict)]
    texts = [a for a in attachments if str(a.get("contentType", "text/plain")).startswith("text/")]
    if not attachments:
        raise _Bad(R_MISSING_ATTACHMENT, "DocumentReference.content has no attachment")
    if not texts:
        return ignored(rtype, I_UNSUPPORTED_ATTACHMENT, "no text/* attachment", ref)
    inline = [a for a in texts if isinstance(a.get("data"), str)]
    if not inline:
        raise _Bad(R_MISSING_ATTACHMENT, "DocumentReference text attachment has no inline data")
    found: list[tuple[str, str, str]] = []
    for a in inline:
        try:
            text = base64.b64decode(a["data"], validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            raise _Bad(R_UNDECODABLE_ATTACHMENT,
                       "DocumentReference attachment.data is not base64 UTF-8 text") from None
        for mention in ctx.extractor(text):
            if mention not in found:
                found.append(mention)
        del text  # the note text goes no further than this function
    events = [dx_event(ctx, t, KIND_DX_TEXT, system, code, assertion) for system, code, assertion in found]
    return ParsedRecord(OK, rtype, patient_key=pkey, events=events)


_PARSERS = {
    "Patient": _patient,
    "Encounter": _encounter,
    "Condition": _condition,
    "Observation": _observation,
    "DocumentReference": _document,
}
