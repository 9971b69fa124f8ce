"""The vocabulary is deterministic, data-independent, hash-pinned, and encodes events as documented."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from preprocessing import vocabulary as V
from preprocessing.vocabulary import DROPPED, OOV_ID, Vocabulary, default_vocabulary

# Changing a token or a binning rule changes this hash. That is allowed only together with a
# RULES_VERSION bump (models trained on the old vocabulary no longer match): update both.
PINNED_SHA256 = "165d93a5574889706b92a0b54e559da61e5e825b08182d056e59e047f1913f75"
PINNED_VERSION = "emr-vocab-2+icd10cm-1.5.0"


@pytest.fixture(scope="module")
def vocab() -> Vocabulary:
    return default_vocabulary()


def test_vocabulary_is_pinned_and_laid_out_as_documented(vocab: Vocabulary) -> None:
    assert vocab.sha256 == PINNED_SHA256, "vocabulary changed: bump RULES_VERSION and the pinned hash together"
    assert vocab.version == PINNED_VERSION
    assert vocab.tokens[:5] == ("[PAD]", "[OOV]", "[CLS]", "encounter", "icd9:bucket")
    cats = [t for t in vocab.tokens if t.startswith("icd10:")]
    assert cats == sorted(cats) and len(cats) > 1900 and all(len(t) == len("icd10:E11") for t in cats)
    assert "icd10:E11" in cats and "icd10:N18" in cats and "icd10:I50" in cats
    assert vocab.size == len(vocab.tokens) == len(set(vocab.tokens))
    # Version 2 appended the group tokens last, so every version-1 token keeps its id.
    assert vocab.tokens[-11:] == tuple(f"dx:{g}" for g in ("t2d", "diabetes", "ckd", "heart_failure", "hypertension",
                                                             "cad", "atrial_fibrillation", "stroke", "copd",
                                                             "hyperlipidaemia", "obesity"))
    assert vocab.id_of("icd10:E11") == 5 + cats.index("icd10:E11")


def test_hash_is_stable_across_processes(vocab: Vocabulary) -> None:
    code = "from preprocessing.vocabulary import default_vocabulary as d; v = d(); print(v.sha256, v.size)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    assert out == [vocab.sha256, str(vocab.size)]


def test_rebuilding_gives_the_same_vocabulary(vocab: Vocabulary) -> None:
    V.default_vocabulary.cache_clear()
    again = default_vocabulary()
    assert again is not vocab and again == vocab and again.sha256 == vocab.sha256


def test_hash_covers_binning_rules(vocab: Vocabulary) -> None:
    rules = [dict(r) for r in vocab.loinc_rules]
    rules[0] = {**rules[0], "cuts": [5.6, 6.5]}  # same tokens, different meaning
    assert Vocabulary(vocab.tokens, vocab.version, tuple(rules)).sha256 != vocab.sha256


def test_save_load_round_trip_and_tamper_detection(vocab: Vocabulary, tmp_path) -> None:
    path = vocab.save(tmp_path / "v.json")
    loaded = Vocabulary.load(path)
    assert loaded == vocab and loaded.sha256 == vocab.sha256
    data = json.loads(path.read_text())
    data["tokens"][10], data["tokens"][11] = data["tokens"][11], data["tokens"][10]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="corrupt or edited"):
        Vocabulary.load(path)


def tok(vocab: Vocabulary, *args, **kwargs) -> str | None:
    i = vocab.encode(*args, **kwargs)
    return None if i == DROPPED else vocab.tokens[i]


def test_diagnoses_share_the_category_token(vocab: Vocabulary) -> None:
    e11 = vocab.id_of("icd10:E11")
    assert vocab.encode("dx", "icd10cm", "E11.9", None, "affirmed") == e11
    assert vocab.encode("dx", "icd10cm", "e11.65 ", None, None) == e11  # coded data: no assertion
    assert vocab.encode("dx_text", "icd10cm", "E1165", None, "affirmed") == e11
    assert vocab.encode("dx_text", "icd10cm", "E11.9", None, "history") == e11
    assert vocab.encode("dx_text", "icd10cm", "E11.9", None, "negated") == DROPPED
    assert vocab.encode("dx_text", "icd10cm", "E11.9", None, "family") == DROPPED
    assert vocab.encode("dx", "icd10cm", "E11.9", None, "uncertain") == DROPPED
    assert vocab.encode("dx", "icd10cm", "ZZZ.1", None, "affirmed") == OOV_ID
    assert vocab.encode("dx", "icd10cm", None, None, "affirmed") == OOV_ID
    assert tok(vocab, "dx", "icd9cm", "V70.0", None, "affirmed") == "icd9:bucket"  # in no group
    assert vocab.encode("dx", "snomed", "195662009", None, "affirmed", groups=[]) == OOV_ID  # in no group
    assert tok(vocab, "encounter", "encounter-class", "AMB", None, "affirmed") == "encounter"
    assert vocab.encode("procedure", "cpt", "99213", None, "affirmed") == OOV_ID
    assert vocab.encode(None, None, None, None, None) == OOV_ID


def test_grouped_diagnoses_in_other_vocabularies_get_their_group_token(vocab: Vocabulary) -> None:
    """A Synthea (SNOMED CT), OMOP or ICD-9-CM diagnosis is not invisible to the model: it gets the
    token of its code group (the groups ingest put on the event), the most specific one first."""
    from preprocessing.code_groups import groups_for

    for system, code, expected in [("snomed", "44054006", "dx:t2d"), ("omop", "201826", "dx:t2d"),
                                   ("icd9cm", "250.00", "dx:t2d"), ("snomed", "431857002", "dx:ckd"),
                                   ("snomed", "88805009", "dx:heart_failure"), ("icd9cm", "250.01", "dx:diabetes"),
                                   ("text", "ckd", "dx:ckd")]:
        g = groups_for(system, code)
        assert tok(vocab, "dx", system, code, None, "affirmed", groups=g) == expected, (system, code)
        assert vocab.encode("dx", system, code, None, "possible", groups=g) == DROPPED
    # ICD-10-CM keeps its category token even though it is grouped too.
    assert tok(vocab, "dx", "icd10cm", "E11.9", None, "affirmed", groups=["diabetes", "t2d"]) == "icd10:E11"


@pytest.mark.parametrize("value,unit,expected", [
    (5.69, "%", "normal"), (5.7, "%", "prediabetes"), (6.49, None, "prediabetes"), (6.5, " % ", "diabetes"),
    (None, "%", "unknown"), (float("nan"), "%", "unknown"), (-1.0, "%", "unknown"), (48.0, "mmol/mol", "unknown"),
])
def test_hba1c_bins_follow_ada_thresholds(vocab: Vocabulary, value, unit, expected) -> None:
    assert tok(vocab, "obs", "loinc", "4548-4", value, "affirmed", unit) == f"loinc:4548-4:{expected}"


def test_units_are_converted_before_binning(vocab: Vocabulary) -> None:
    # 7.0 mmol/L glucose = 126 mg/dL: "high" (≥ 126), whatever unit it was reported in.
    assert tok(vocab, "obs", "loinc", "2345-7", 7.0, None, "mmol/L") == "loinc:2345-7:high"
    assert tok(vocab, "obs", "loinc", "2345-7", 126.0, None, " MG/DL") == "loinc:2345-7:high"
    assert tok(vocab, "obs", "loinc", "2345-7", 99.0, None, "g/L") == "loinc:2345-7:unknown"
    assert tok(vocab, "obs", "loinc", "39156-5", 30.0, None, "kg/m2") == "loinc:39156-5:obese"
    assert tok(vocab, "obs", "loinc", "62238-1", 59.9, None, None) == "loinc:62238-1:g3a"
    assert vocab.encode("obs", "loinc", "1234-5", 1.0, None) == OOV_ID
    assert vocab.encode("obs", "local", "4548-4", 6.0, None, "%") == OOV_ID
