"""Diagnoses in free-text notes, with their assertion: a configured clinical NLP pipeline.

A blank spaCy pipeline (no statistical model: nothing to download) of small
components, each configured by a rules file a reviewer can read:

1. tokenizer — spaCy's English rules, plus a split at hyphens and slashes
   between letters/digits so "type-2", "a-fib" and "h/o" match word by word;
2. ``note_sentences`` — sentence starts at ``.``/``!``/``?``/``;`` before a
   space, at blank lines, list bullets, header lines and after a line ending
   in ``:``; a hard-wrapped line does not end a sentence;
3. ``entity_ruler`` — the targets of ``conf/note_targets.yaml`` (terms and
   abbreviations per code group; look-alike phrases to exclude, longest
   match wins) and literal ICD-10-CM code shapes;
4. ``note_target_filter`` — drops exclusions and code shapes that are not
   codes (see :func:`literal_code`);
5. one negspacy NegEx pass per assertion kind (``conf/note_context.yaml``:
   preceding/following cues, pseudo-cues, terminations), then sections
   (Family History → family, Past Medical History → history) and the kinds'
   priority decide one assertion per mention.

Each mention becomes a :class:`Mention`: a code group recognised in words is
``code_system`` ``text`` with the group name as the code (plus one mention
per group it implies: type 2 diabetes is also diabetes); a literal code is
``icd10cm``. Evidence is kept as character offsets only (the mention and its
sentence), never as text; note text is never logged or returned.

Pure: no Spark, Ray or Airflow; build one :class:`NoteExtractor` per process.
"""
from __future__ import annotations

import bisect
import functools
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from preprocessing.icd import icd10cm_codes, is_valid_icd10cm

AFFIRMED = "affirmed"
HISTORY = "history"
NEGATED = "negated"
POSSIBLE = "possible"
FAMILY = "family"
HYPOTHETICAL = "hypothetical"
ASSERTIONS = (AFFIRMED, HISTORY, NEGATED, POSSIBLE, FAMILY, HYPOTHETICAL)
# Assertions that say the patient has (or had) the condition: the only ones that count.
COUNTED_ASSERTIONS = (AFFIRMED, HISTORY)
CUE_KINDS = (NEGATED, POSSIBLE, HISTORY, FAMILY, HYPOTHETICAL)

SYSTEM_TEXT = "text"
SYSTEM_ICD10CM = "icd10cm"

_EXCLUDE = "_exclude"
_CODE = "_code"
# A code shape: letter, digit, alphanumeric, then optionally a dot and 1-4 alphanumerics.
_CODE_SHAPE = r"^[A-Za-z][0-9][0-9A-Za-z](?:\.[0-9A-Za-z]{1,4}|[0-9A-Z]{1,4})?$"
# A header line: "# Name", "Name:" (text may follow the colon) or a bare "NAME" line.
_HEADER_RE = re.compile(r"^[ \t]*(?P<hash>#+)?[ \t]*(?P<name>[A-Za-z][A-Za-z/&' ]{0,40})"
                        r"(?:(?P<colon>:)[ \t]*(?P<rest>[^\n]*))?$", re.MULTILINE)
_CODE_RE = re.compile(_CODE_SHAPE)
_SENT_END_RE = re.compile(r"[.!?;](?=\s|$)")
_LINE_START_RE = re.compile(r"\n[ \t]*(?=\S)")
_BULLET_RE = re.compile(r"[-*\u2022]\s|\d{1,2}[.)]\s")


class NoteRulesError(ValueError):
    """A notes rules file is missing, malformed, or names a group that does not exist."""


@dataclass(frozen=True)
class Mention:
    """One diagnosis mention: what, how asserted, and where (character offsets, never text)."""

    system: str            # "text" (a code group recognised in words) | "icd10cm" (a literal code)
    code: str              # the group name, or the canonical dotted ICD-10-CM code
    assertion: str         # one of ASSERTIONS
    start: int             # the mention's characters in the note: [start, end)
    end: int
    sentence_start: int    # its sentence's characters: [sentence_start, sentence_end)
    sentence_end: int
    section: str | None    # the section the mention is in (conf/note_context.yaml), if any


@dataclass(frozen=True)
class NoteRules:
    """The validated rules: targets per group, exclusions, cue lexicons, sections."""

    terms: dict[str, tuple[str, ...]]
    abbreviations: dict[str, tuple[str, ...]]
    abbreviations_exact: dict[str, tuple[str, ...]]
    implies: dict[str, tuple[str, ...]]
    combinations: tuple[tuple[str, tuple[str, ...]], ...]   # (phrase, groups it names)
    exclude: tuple[str, ...]
    exclude_code_followers: tuple[str, ...]
    priority: tuple[str, ...]
    termsets: dict[str, dict[str, list[str]]]
    section_headers: dict[str, str]          # normalised header → section name
    section_assertions: dict[str, str]       # section name → assertion given to its mentions
    sources: tuple[str, str]


def _read_yaml(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise NoteRulesError(f"{what} file {path} does not exist; set extraction.note_targets_file / "
                             "extraction.note_context_file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise NoteRulesError(f"{what} file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise NoteRulesError(f"{what} file {path} must be a mapping")
    return data


def _str_list(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise NoteRulesError(f"{where} must be a list of strings (quote words YAML reads as "
                             "booleans or numbers: \"no\", \"yes\", \"on\", \"2\")")
    return tuple(str(v).strip() for v in value if str(v).strip())


def _norm_header(name: str) -> str:
    return " ".join(name.lower().replace("&", " & ").split())


def load_note_rules(targets_file: str | Path, context_file: str | Path,
                    group_names: Iterable[str] | None = None) -> NoteRules:
    """Load and validate the two rules files; with ``group_names``, every target group must be one.

    Raise NoteRulesError naming the file and the entry at fault.
    """
    return _load_rules(str(Path(targets_file).resolve()), str(Path(context_file).resolve()),
                       None if group_names is None else tuple(group_names))


@functools.lru_cache(maxsize=8)
def _load_rules(targets_s: str, context_s: str, group_names: tuple[str, ...] | None) -> NoteRules:
    tpath, cpath = Path(targets_s), Path(context_s)
    t = _read_yaml(tpath, "note targets")
    groups = t.get("groups")
    if not isinstance(groups, dict) or not groups:
        raise NoteRulesError(f"note targets file {tpath} needs a non-empty mapping 'groups:'")
    terms, abbr, exact, implies = {}, {}, {}, {}
    for name, spec in groups.items():
        name = str(name)
        if not isinstance(spec, dict):
            raise NoteRulesError(f"note targets {tpath}: group {name!r} must be a mapping with 'terms:'")
        if group_names is not None and name not in group_names:
            raise NoteRulesError(f"note targets {tpath}: group {name!r} is not a code group of the code "
                                 f"groups file (known: {', '.join(group_names)}); rename it or add the group")
        terms[name] = _str_list(spec.get("terms"), f"{tpath}: groups.{name}.terms")
        abbr[name] = _str_list(spec.get("abbreviations"), f"{tpath}: groups.{name}.abbreviations")
        exact[name] = _str_list(spec.get("abbreviations_exact"), f"{tpath}: groups.{name}.abbreviations_exact")
        implies[name] = _str_list(spec.get("implies"), f"{tpath}: groups.{name}.implies")
        if not (terms[name] or abbr[name] or exact[name]):
            raise NoteRulesError(f"note targets {tpath}: group {name!r} has no terms or abbreviations")
        for other in implies[name]:
            if other not in groups:
                raise NoteRulesError(f"note targets {tpath}: group {name!r} implies {other!r}, "
                                     "which is not a group of the same file")
    combinations = []
    for i, combo in enumerate(t.get("combinations") or []):
        if not isinstance(combo, dict) or not isinstance(combo.get("phrase"), str):
            raise NoteRulesError(f"note targets {tpath}: combinations[{i}] needs 'phrase:' and 'groups:'")
        cgroups = _str_list(combo.get("groups"), f"{tpath}: combinations[{i}].groups")
        if not cgroups or any(g not in groups for g in cgroups):
            raise NoteRulesError(f"note targets {tpath}: combinations[{i}] groups {list(cgroups)} must be "
                                 "groups of the same file")
        combinations.append((combo["phrase"].strip(), cgroups))
    c = _read_yaml(cpath, "note context")
    kinds = c.get("kinds")
    if not isinstance(kinds, dict) or set(kinds) != set(CUE_KINDS):
        raise NoteRulesError(f"note context file {cpath}: 'kinds:' must define exactly {', '.join(CUE_KINDS)}")
    priority = _str_list(c.get("priority"), f"{cpath}: priority")
    if sorted(priority) != sorted(CUE_KINDS):
        raise NoteRulesError(f"note context file {cpath}: 'priority:' must order exactly {', '.join(CUE_KINDS)}")
    common_term = _str_list((c.get("common") or {}).get("termination"), f"{cpath}: common.termination")
    termsets = {}
    for kind in CUE_KINDS:
        spec = kinds[kind] or {}
        termsets[kind] = {
            "pseudo_negations": list(_str_list(spec.get("pseudo"), f"{cpath}: kinds.{kind}.pseudo")),
            "preceding_negations": list(_str_list(spec.get("preceding"), f"{cpath}: kinds.{kind}.preceding")),
            "following_negations": list(_str_list(spec.get("following"), f"{cpath}: kinds.{kind}.following")),
            "termination": list(common_term) + list(_str_list(spec.get("termination"),
                                                               f"{cpath}: kinds.{kind}.termination")),
        }
    headers: dict[str, str] = {}
    section_assertions: dict[str, str] = {}
    for sname, sspec in (c.get("sections") or {}).items():
        sspec = sspec or {}
        for h in _str_list(sspec.get("headers"), f"{cpath}: sections.{sname}.headers"):
            headers[_norm_header(h)] = str(sname)
        a = sspec.get("assertion")
        if a is not None:
            if a not in ASSERTIONS:
                raise NoteRulesError(f"note context file {cpath}: section {sname!r} assertion {a!r} "
                                     f"is not one of {', '.join(ASSERTIONS)}")
            section_assertions[str(sname)] = str(a)
    return NoteRules(terms=terms, abbreviations=abbr, abbreviations_exact=exact, implies=implies,
                     combinations=tuple(combinations),
                     exclude=_str_list(t.get("exclude"), f"{tpath}: exclude"),
                     exclude_code_followers=_str_list(t.get("exclude_code_followers"),
                                                      f"{tpath}: exclude_code_followers"),
                     priority=priority, termsets=termsets, section_headers=headers,
                     section_assertions=section_assertions, sources=(targets_s, context_s))


@functools.lru_cache(maxsize=1)
def _parent_codes() -> frozenset[str]:
    """Every ICD-10-CM code that has a child code (so is not billable on its own)."""
    parents = set()
    for code in icd10cm_codes():
        for k in range(3, len(code)):
            p = code[:k].rstrip(".")
            if p != code:
                parents.add(p)
    return frozenset(parents)


def literal_code(token_text: str) -> str | None:
    """The canonical ICD-10-CM code a code-shaped word stands for, or None.

    Dotted shapes (``E11.9``, ``e11.65``) are codes in any case if they are
    real codes. Undotted shapes are ordinary words too often (``N95`` mask,
    ``B12``, ``A1C``), so only upper-case ones that are a real *billable* code
    count (``I10``, ``E119``): a category such as N95 is not coded on its own.
    """
    if "." in token_text:
        code = token_text.upper()
        return code if is_valid_icd10cm(code) else None
    if token_text != token_text.upper():
        return None
    code = token_text if len(token_text) == 3 else f"{token_text[:3]}.{token_text[3:]}"
    return code if is_valid_icd10cm(code) and code not in _parent_codes() else None


class NoteExtractor:
    """Diagnosis mentions in note text; build once per process (building costs seconds), call per note."""

    def __init__(self, rules: NoteRules) -> None:
        self.rules = rules
        self.nlp = _build_pipeline(rules)
        self._header_re = _HEADER_RE

    @classmethod
    def from_files(cls, targets_file: str | Path, context_file: str | Path,
                   group_names: Iterable[str] | None = None) -> "NoteExtractor":
        """Build from the two rules files (see :func:`load_note_rules`)."""
        return cls(load_note_rules(targets_file, context_file, group_names))

    @classmethod
    def from_settings(cls, extraction: Any) -> "NoteExtractor":
        """Build from an ``ExtractionSettings`` (note_targets_file, note_context_file, code_groups_file)."""
        from preprocessing.code_groups import load_code_groups

        names = load_code_groups(extraction.code_groups_file).names
        return cls.from_files(extraction.note_targets_file, extraction.note_context_file, names)

    def mentions(self, text: str | None) -> list[Mention]:
        """Every diagnosis mention in ``text``, in text order; [] for empty text."""
        if not text or not text.strip():
            return []
        sections = self._sections(text)
        doc = self.nlp(text)
        out: list[Mention] = []
        sec_starts = [s for s, _ in sections]
        for ent in doc.ents:
            i = bisect.bisect_right(sec_starts, ent.start_char) - 1
            section = sections[i][1] if i >= 0 else None
            assertion = self._assertion(ent, section)
            sent = ent.sent
            where = (ent.start_char, ent.end_char, sent.start_char, sent.end_char, section)
            if ent.label_ == _CODE:
                code = literal_code(ent.text)
                if code is not None:
                    out.append(Mention(SYSTEM_ICD10CM, code, assertion, *where))
                continue
            named = (ent.label_, *(ent.ent_id_.split("+") if ent.ent_id_ else ()))
            for group in dict.fromkeys(g for n in named for g in (n, *self.rules.implies.get(n, ()))):
                out.append(Mention(SYSTEM_TEXT, group, assertion, *where))
        return out

    def __call__(self, text: str | None) -> list[tuple[str, str, str]]:
        """Distinct (code_system, code, assertion) triples in order of first mention."""
        seen: dict[tuple[str, str, str], None] = {}
        for m in self.mentions(text):
            seen.setdefault((m.system, m.code, m.assertion), None)
        return list(seen)

    def _assertion(self, ent: Any, section: str | None) -> str:
        sec = self.rules.section_assertions.get(section) if section else None
        for kind in self.rules.priority:
            if ent._.get(f"ctx_{kind}") or sec == kind:
                return kind
        return AFFIRMED

    def _sections(self, text: str) -> list[tuple[int, str | None]]:
        """(start offset, section name) for every header line; unknown '#' headers end a section."""
        out: list[tuple[int, str | None]] = []
        for m in self._header_re.finditer(text):
            name = _norm_header(m.group("name"))
            known = self.rules.section_headers.get(name)
            if m.group("hash"):
                out.append((m.start("name"), known))
            elif known is not None and (m.group("colon") or m.group("name").strip().isupper()):
                out.append((m.start("name"), known))
        return out


def _sentence_starts(text: str, header_re: re.Pattern[str], headers: dict[str, str]) -> list[int]:
    """Character offsets where a sentence starts (see the module docstring)."""
    starts = {0}
    for m in _SENT_END_RE.finditer(text):
        starts.add(m.end())
    for m in _LINE_START_RE.finditer(text):
        pos = m.end()
        # A bounded look-back: slicing the whole prefix per line is quadratic on long notes.
        before = text[max(0, m.start() - 256):m.start()].rstrip(" \t")
        line_end = text.find("\n", pos)
        line = text[pos:] if line_end < 0 else text[pos:line_end]
        blank_line = before.endswith("\n")
        if blank_line or before.endswith(":") or _BULLET_RE.match(line) or line.startswith("#"):
            starts.add(pos)
            continue
        h = header_re.match(line)
        if h and _norm_header(h.group("name")) in headers:
            starts.add(pos)
            continue
        prev_start = text.rfind("\n", 0, m.start()) + 1
        prev = text[prev_start:m.start()].strip()
        if prev.startswith("#"):
            starts.add(pos)
            continue
        hp = header_re.match(prev) if prev else None
        if hp and _norm_header(hp.group("name")) in headers and not (hp.group("rest") or "").strip():
            starts.add(pos)
    return sorted(starts)


def _phrase_variants(phrase: str) -> list[str]:
    """``phrase`` with the punctuation clinicians put between its words: none, one hyphen or
    comma at any one gap, hyphens at every gap ("type-2 diabetes", "diabetes mellitus, type 2")."""
    words = [w for w in re.split(r"[\s\-,]+", phrase) if w]
    out = {" ".join(words), "-".join(words)}
    for i in range(1, len(words)):
        for sep in ("-", ", "):
            out.add(" ".join(words[:i]) + sep + " ".join(words[i:]))
    return sorted(out)


def _phrase_docs(nlp: Any, phrase: str, exact: bool) -> list[str]:
    """The phrase strings to match: its variants, in lower, upper and title case unless exact.

    spaCy splits some words differently by case ("T2DM" is one token, "t2dm" two), so each
    case form is tokenized on its own when the patterns are built.
    """
    out: list[str] = []
    for v in _phrase_variants(phrase):
        for form in ((v,) if exact else (v.lower(), v.upper(), v.title())):
            if form not in out:
                out.append(form)
    return out


_REGISTERED: list[bool] = []


def _register_components() -> None:
    """Register this module's spaCy components once per process (spaCy is imported lazily)."""
    if _REGISTERED:
        return
    from spacy.language import Language
    from spacy.tokens import Span
    from spacy.util import filter_spans

    import negspacy.negation  # noqa: F401  (registers the "negex" factory)

    class NoteSentences:
        def __init__(self, headers: dict[str, str]) -> None:
            self.headers = headers

        def __call__(self, doc: Any) -> Any:
            starts = _sentence_starts(doc.text, _HEADER_RE, self.headers)
            prev_end = -1
            for i, tok in enumerate(doc):
                lo = bisect.bisect_right(starts, prev_end) if i else 0
                tok.is_sent_start = i == 0 or (lo < len(starts) and starts[lo] <= tok.idx)
                if not tok.is_space:
                    prev_end = tok.idx + len(tok.text) - 1
            return doc

    @Language.factory("note_sentences", default_config={"headers": {}})
    def _note_sentences(nlp: Any, name: str, headers: dict[str, str]) -> NoteSentences:
        return NoteSentences(headers)

    class NoteTargetFilter:
        """Drops exclusions; adds literal codes (not code-shaped words followed by e.g. "mask")."""

        def __init__(self, code_followers: list[str]) -> None:
            self.followers = {w.lower() for w in code_followers}

        def __call__(self, doc: Any) -> Any:
            # Codes are found here rather than by the ruler: a code shape and a term can be the
            # same word ("T2DM"), and a term must win over a shape that is not a code.
            ents = [e for e in doc.ents if e.label_ != _EXCLUDE]
            taken = {i for e in doc.ents for i in range(e.start, e.end)}
            n = len(doc)
            for tok in doc:
                t = tok.text
                if (len(t) >= 3 and t[1].isdigit() and tok.i not in taken and _CODE_RE.match(t)
                        and not (tok.i + 1 < n and doc[tok.i + 1].lower_ in self.followers)
                        and literal_code(t) is not None):
                    ents.append(Span(doc, tok.i, tok.i + 1, label=_CODE))
            doc.ents = filter_spans(ents)
            return doc

    @Language.factory("note_target_filter", default_config={"code_followers": []})
    def _note_target_filter(nlp: Any, name: str, code_followers: list[str]) -> NoteTargetFilter:
        return NoteTargetFilter(code_followers)

    _REGISTERED.append(True)


def _build_pipeline(rules: NoteRules) -> Any:
    import spacy
    from spacy.util import compile_infix_regex

    _register_components()
    nlp = spacy.blank("en")
    infixes = list(nlp.Defaults.infixes) + [r"(?<=[0-9A-Za-z])[-/](?=[0-9A-Za-z])"]
    nlp.tokenizer.infix_finditer = compile_infix_regex(infixes).finditer
    nlp.add_pipe("note_sentences", config={"headers": dict(rules.section_headers)})
    # Phrases go to the ruler's PhraseMatchers (one on LOWER, one on ORTH for exact-case
    # abbreviations): with every punctuation variant listed they match as the token Matcher
    # with optional punctuation would, at a fraction of its cost.
    ruler = nlp.add_pipe("entity_ruler", config={"overwrite_ents": True, "phrase_matcher_attr": "LOWER"})
    exact_ruler = nlp.add_pipe("entity_ruler", name="entity_ruler_exact",
                               config={"overwrite_ents": False, "phrase_matcher_attr": "ORTH"})
    patterns: list[dict[str, Any]] = []
    exact_patterns: list[dict[str, Any]] = []

    def add(label: str, phrase: str, exact: bool = False, ent_id: str = "") -> None:
        for form in _phrase_docs(nlp, phrase, exact):
            (exact_patterns if exact else patterns).append(
                {"label": label, "pattern": form, **({"id": ent_id} if ent_id else {})})

    for group in rules.terms:
        for phrase in (*rules.terms[group], *rules.abbreviations[group]):
            add(group, phrase)
        for phrase in rules.abbreviations_exact[group]:
            add(group, phrase, exact=True)
    for phrase, cgroups in rules.combinations:
        add(cgroups[0], phrase, ent_id="+".join(cgroups[1:]))
    for phrase in rules.exclude:
        add(_EXCLUDE, phrase)
    with warnings.catch_warnings():
        # Adding patterns runs the phrases through the pipeline, where the other, still
        # empty ruler warns that it has no patterns (W036): it gets them on the next line.
        warnings.filterwarnings("ignore", message=r".*\[W036\]")
        ruler.add_patterns(patterns)
        exact_ruler.add_patterns(exact_patterns)
    nlp.add_pipe("note_target_filter", config={"code_followers": list(rules.exclude_code_followers)})
    for kind in CUE_KINDS:
        nlp.add_pipe("negex", name=f"ctx_{kind}",
                     config={"neg_termset": rules.termsets[kind], "extension_name": f"ctx_{kind}"})
    return nlp
