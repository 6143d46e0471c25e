"""neuraldb.facts: loaders for JSONL facts, CounterFact (ROME and MEND formats) and ZsRE (MEND and KnowEdit)."""

from __future__ import annotations

import gzip
import json
import warnings
from pathlib import Path

import pytest
from _data import data_file
from neuraldb import facts
from neuraldb.facts import Fact, FactFormatError

ROME = {
    "case_id": 4482,
    "pararel_idx": 14235,
    "requested_rewrite": {
        "prompt": "{} originates from",
        "relation_id": "P19",
        "target_new": {"str": "Philadelphia", "id": "Q935334"},
        "target_true": {"str": "London", "id": "Q84"},
        "subject": "Spike Hughes",
    },
    "paraphrase_prompts": ["Spike Hughes is native to", "Spike Hughes was born in"],
    "neighborhood_prompts": ["Max Mosley originates from", "Lita Ford was native to"],
    "attribute_prompts": ["Mike Dennis originates from"],
    "generation_prompts": ["Spike Hughes currently lives in"],
}
CF_MEND = {
    "case_id": 0,
    "prompt": "The mother tongue of Danielle Darrieux is",
    "target_new": "English",
    "subject": "Danielle Darrieux",
    "ground_truth": "French",
    "rephrase_prompt": "Where Danielle Darrieux is from, people speak the language of",
    "locality_prompt": "Michel Rocard is a native speaker of",
    "locality_ground_truth": "French",
}
ZSRE = {
    "subject": "IAAF Combined Events Challenge",
    "src": "When was the inception of IAAF Combined Events Challenge?",
    "pred": "2011",
    "rephrase": "When was the IAAF Combined Events Challenge launched?",
    "alt": "2006",
    "answers": ["1998"],
    "loc": "nq question: what is the name of the last episode of spongebob",
    "loc_ans": "The String",
    "cond": "2011 >> 2006 || When was the inception of IAAF Combined Events Challenge?",
}
KNOWEDIT = {
    "subject": "Epaspidoceras",
    "target_new": "Noctuidae",
    "prompt": "Which family does Epaspidoceras belong to?",
    "ground_truth": ["Aspidoceratidae"],
    "rephrase_prompt": "What family are Epaspidoceras?",
    "locality": {"Relation_Specificity": [{"prompt": "The taxon rank of Epaspidoceras is", "ground_truth": ["genus"]}]},
}
NATIVE = {"subject": "Paris", "prompt": "{} is the capital of", "target_new": "Italy", "target_true": "France"}


def write(path: Path, records, *, jsonl=True, gz=False) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in records) if jsonl else json.dumps(records)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# --- formats on inline samples ----------------------------------------------------------------------------------


def test_counterfact_rome(tmp_path):
    [f] = facts.load(write(tmp_path / "cf.jsonl", [ROME]))
    assert f == Fact("Spike Hughes", "{} originates from", "Philadelphia", "London", ROME["paraphrase_prompts"],
                     ROME["neighborhood_prompts"])  # fmt: skip
    assert f.extras["format"] == "counterfact-rome"
    assert f.extras["case_id"] == 4482 and f.extras["pararel_idx"] == 14235 and f.extras["relation_id"] == "P19"
    assert f.extras["target_new_id"] == "Q935334" and f.extras["target_true_id"] == "Q84"
    assert f.extras["attribute_prompts"] == ("Mike Dennis originates from",)
    assert f.extras["generation_prompts"] == ("Spike Hughes currently lives in",)
    # ROME's neighbourhood prompts are other subjects sharing the true object
    assert f.extras["neighborhood_answers"] == ("London", "London")


def test_counterfact_mend(tmp_path):
    [f] = facts.load(write(tmp_path / "cf.jsonl", [CF_MEND]))
    assert (f.subject, f.prompt, f.target_new, f.target_true) == (
        "Danielle Darrieux", "The mother tongue of {} is", "English", "French")  # fmt: skip
    assert f.text == CF_MEND["prompt"]
    assert f.paraphrases == (CF_MEND["rephrase_prompt"],)
    assert f.neighborhood == (CF_MEND["locality_prompt"],)
    assert f.extras["locality_ground_truth"] == "French"
    assert f.extras["neighborhood_answers"] == ("French",)
    assert f.extras["case_id"] == 0 and f.extras["format"] == "counterfact-mend"


def test_zsre_mend(tmp_path):
    [f] = facts.load(write(tmp_path / "z.jsonl", [ZSRE]))
    assert f.prompt == "When was the inception of {}?" and f.subject == ZSRE["subject"]
    assert (f.target_new, f.target_true) == ("2006", "1998")
    assert f.paraphrases == (ZSRE["rephrase"],) and f.neighborhood == (ZSRE["loc"],)
    assert f.extras["loc_ans"] == "The String" and f.extras["neighborhood_answers"] == ("The String",)
    assert f.extras["answers"] == ("1998",) and f.extras["pred"] == "2011" and f.extras["format"] == "zsre-mend"


def test_zsre_knowedit(tmp_path):
    [f] = facts.load(write(tmp_path / "k.jsonl", [KNOWEDIT]))
    assert f.prompt == "Which family does {} belong to?" and f.target_new == "Noctuidae"
    assert f.target_true == "Aspidoceratidae"
    assert f.paraphrases == ("What family are Epaspidoceras?",)
    assert f.neighborhood == ("The taxon rank of Epaspidoceras is",)
    assert f.extras["neighborhood_answers"] == ("genus",) and f.extras["format"] == "zsre-knowedit"


def test_native_format_and_save_roundtrip(tmp_path):
    fs = [
        Fact(
            "Paris",
            "{} is the capital of",
            "Italy",
            "France",
            ["Paris, the capital of"],
            ["Rome is the capital of"],
            extras={"neighborhood_answers": ["Italy"]},
        ),
        Fact("Danielle Darrieux", "The mother tongue of {} is", "English"),
    ]
    for name in ("f.jsonl", "f.jsonl.gz"):
        facts.save(fs, tmp_path / name)
        back = facts.load(tmp_path / name)
        assert back == fs
        assert back[0].extras["neighborhood_answers"] == ["Italy"]
        assert back[1].extras["format"] == "neuraldb"
    assert not list(tmp_path.glob("*.tmp"))


def test_native_prompt_without_placeholder_gets_one(tmp_path):
    [f] = facts.load(
        write(tmp_path / "n.jsonl", [{"subject": "Paris", "prompt": "Paris is in", "target_new": "Italy"}])
    )
    assert f.prompt == "{} is in"


@pytest.mark.parametrize("jsonl", [True, False], ids=["jsonl", "json-array"])
@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_containers(tmp_path, jsonl, gz):
    # gzip is recognised by its magic bytes, not the file name
    path = write(tmp_path / "facts.data", [ROME, ROME, ROME], jsonl=jsonl, gz=gz)
    assert len(facts.load(path)) == 3
    assert len(facts.load(path, limit=2)) == 2
    assert facts.load(path, limit=0) == []


def test_single_pretty_printed_object_and_blank_lines(tmp_path):
    (tmp_path / "one.json").write_text(json.dumps(NATIVE, indent=2))
    assert len(facts.load(tmp_path / "one.json")) == 1
    (tmp_path / "blank.jsonl").write_text("\n" + json.dumps(NATIVE) + "\n\n" + json.dumps(NATIVE) + "\n")
    assert len(facts.load(tmp_path / "blank.jsonl")) == 2
    (tmp_path / "empty.jsonl").write_text("  \n")
    assert facts.load(tmp_path / "empty.jsonl") == []


def test_case_insensitive_subject_takes_the_prompts_spelling(tmp_path):
    rec = dict(ZSRE, subject="iaaf combined events challenge")
    [f] = facts.load(write(tmp_path / "z.jsonl", [rec]))
    assert f.subject == "IAAF Combined Events Challenge" and f.prompt == "When was the inception of {}?"


def test_subject_missing_policy(tmp_path):
    bad = dict(CF_MEND, subject="Nobody At All")
    path = write(tmp_path / "cf.jsonl", [CF_MEND, bad, CF_MEND])
    with pytest.warns(UserWarning, match=r"skipped 1 record.*line 2.*Nobody At All"):
        assert len(facts.load(path)) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(facts.load(path, on_invalid="skip")) == 2
    with pytest.raises(FactFormatError, match=r"line 2: cannot be an edit: subject 'Nobody At All' does not occur"):
        facts.load(path, on_invalid="error")
    with pytest.raises(ValueError, match="on_invalid"):
        facts.load(path, on_invalid="ignore")


def test_empty_target_is_skipped_with_a_warning(tmp_path):
    path = write(tmp_path / "z.jsonl", [ZSRE, dict(ZSRE, alt="")])
    with pytest.warns(UserWarning, match="target_new must be a non-empty string"):
        assert len(facts.load(path)) == 1


def test_limit_counts_kept_facts(tmp_path):
    bad = dict(CF_MEND, subject="Nobody")
    path = write(tmp_path / "cf.jsonl", [bad, CF_MEND, CF_MEND, CF_MEND])
    assert len(facts.load(path, limit=2, on_invalid="skip")) == 2
    with pytest.raises(ValueError, match="limit"):
        facts.load(path, limit=-1)


# --- errors -------------------------------------------------------------------------------------------------------


def test_unknown_schema_is_a_clear_error(tmp_path):
    path = write(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(FactFormatError, match=r"line 1: unrecognised fact record with keys \['answer', 'question'\]"):
        facts.load(path)
    with pytest.raises(FactFormatError, match="Supported formats"):
        facts.load(path)


def test_mquake_and_known_1000_are_named(tmp_path):
    mq = {"case_id": 1, "requested_rewrite": [ROME["requested_rewrite"]], "questions": []}
    with pytest.raises(FactFormatError, match="MQuAKE"):
        facts.load(write(tmp_path / "mq.jsonl", [mq]))
    known = {"known_id": 0, "subject": "Vinson Massif", "attribute": "Antarctica", "template": "{} is in",
             "prediction": "x", "prompt": "Vinson Massif is in", "relation_id": "P30"}  # fmt: skip
    with pytest.raises(FactFormatError, match="known_1000"):
        facts.load(write(tmp_path / "k.jsonl", [known]))


def test_broken_files(tmp_path):
    (tmp_path / "bad.json").write_text("[{]")
    with pytest.raises(FactFormatError, match="not valid JSON"):
        facts.load(tmp_path / "bad.json")
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{oops\n')
    with pytest.raises(FactFormatError, match="line 2: invalid JSON"):
        facts.load(tmp_path / "bad.jsonl")
    (tmp_path / "list.jsonl").write_text("[1, 2]")
    with pytest.raises(FactFormatError, match="must be a JSON object"):
        facts.load(tmp_path / "list.jsonl")
    with pytest.raises(FileNotFoundError, match="facts file not found"):
        facts.load(tmp_path / "absent.jsonl")


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_non_utf8_file_names_the_line(tmp_path, gz):
    raw = (json.dumps(NATIVE) + "\n").encode() + '{"subject": "Caf\xe9"}\n'.encode("latin-1")
    path = tmp_path / ("latin1.jsonl.gz" if gz else "latin1.jsonl")
    path.write_bytes(gzip.compress(raw) if gz else raw)
    with pytest.raises(FactFormatError, match=r"latin1\.jsonl(\.gz)?: line 2: not UTF-8 text \(byte 0xe9"):
        facts.load(path)


def test_corrupt_gzip_is_a_format_error(tmp_path):
    whole = gzip.compress((json.dumps(NATIVE) + "\n").encode() * 100)
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(FactFormatError, match=r"cut\.jsonl\.gz: not a readable gzip file"):
        facts.load(tmp_path / "cut.jsonl.gz")
    (tmp_path / "junk.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00" + b"junk" * 10)
    with pytest.raises(FactFormatError, match=r"junk\.jsonl\.gz: not a readable gzip file"):
        facts.load(tmp_path / "junk.jsonl.gz")


def test_deeply_nested_json_is_a_format_error(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "deep.json").write_text(deep)
    with pytest.raises(FactFormatError, match=r"deep\.json: JSON nested too deeply"):
        facts.load(tmp_path / "deep.json")
    (tmp_path / "deep.jsonl").write_text(json.dumps(NATIVE) + "\n" + '{"a": ' + deep + "}\n")
    with pytest.raises(FactFormatError, match=r"deep\.jsonl: line 2: JSON nested too deeply"):
        facts.load(tmp_path / "deep.jsonl")
    (tmp_path / "big.jsonl").write_text('{"a": ' + "1" * 5000 + "}\n")  # past int()'s digit limit: a ValueError
    with pytest.raises(FactFormatError, match=r"big\.jsonl: line 1: Exceeds the limit"):
        facts.load(tmp_path / "big.jsonl")


def test_a_directory_is_not_a_facts_file(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a directory, not a facts file"):
        facts.load(tmp_path)


def test_knowedit_locality_of_the_wrong_type_is_a_format_error():
    with pytest.raises(FactFormatError, match="record 0: not a valid zsre-knowedit record"):
        facts.parse([dict(KNOWEDIT, locality=["not", "a", "dict"])], format="zsre-knowedit")


def test_json_lines_split_at_newlines_only_and_a_bom_is_dropped(tmp_path):
    odd = dict(NATIVE, prompt="{} is the\u2028capital of")  # U+2028 may stand unescaped in a JSON string
    text = json.dumps(odd, ensure_ascii=False) + "\r\n\n" + json.dumps(NATIVE) + "\n"
    (tmp_path / "x.jsonl").write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    assert [f.prompt for f in facts.load(tmp_path / "x.jsonl")] == [odd["prompt"], NATIVE["prompt"]]


def test_missing_field_names_record_and_field(tmp_path):
    rec = {k: v for k, v in ROME.items()}
    rec["requested_rewrite"] = {k: v for k, v in ROME["requested_rewrite"].items() if k != "target_new"}
    with pytest.raises(
        FactFormatError, match=r"line 2: not a valid counterfact-rome record: missing field 'target_new'"
    ):
        facts.load(write(tmp_path / "r.jsonl", [ROME, rec]))


def test_forced_format(tmp_path):
    path = write(tmp_path / "z.jsonl", [ZSRE])
    assert facts.load(path, format="zsre-mend")[0].target_new == "2006"
    with pytest.raises(ValueError, match="unknown format"):
        facts.load(path, format="csv")
    with pytest.raises(FactFormatError, match="not a valid counterfact-mend record"):
        facts.load(path, format="counterfact-mend")


def test_parse_records_in_memory():
    fs = facts.parse([CF_MEND, CF_MEND], limit=1)
    assert len(fs) == 1 and fs[0].target_new == "English"
    with pytest.raises(FactFormatError, match="record 1: not a valid counterfact-mend record"):
        facts.parse([CF_MEND, ZSRE])
    assert facts.detect_format(ZSRE) == "zsre-mend"
    assert facts.detect_format(NATIVE) == "neuraldb"
    assert facts.detect_format(KNOWEDIT) == "zsre-knowedit"


def test_demo_facts_ship_with_the_package():
    from neuraldb.cli_demo import demo_facts

    fs = demo_facts()
    assert len(fs) == 5
    for f in fs:
        assert f.target_true and f.paraphrases and f.neighborhood
        assert len(f.extras["neighborhood_answers"]) == len(f.neighborhood)


# --- the real files in ../shared/data ----------------------------------------------------------------------------


def real(name: str) -> Path:
    return data_file(f"knowledge_editing/{name}")


def test_real_counterfact_rome():
    fs = facts.load(real("counterfact_rome_format_1031.json.gz"))
    assert len(fs) == 1031
    f = fs[0]
    assert (f.subject, f.prompt, f.target_new, f.target_true) == (
        "Spike Hughes", "{} originates from", "Philadelphia", "London")  # fmt: skip
    assert len(f.paraphrases) == 2 and len(f.neighborhood) == 10
    assert len(f.extras["attribute_prompts"]) == 10 and len(f.extras["generation_prompts"]) == 10
    assert "portability" in f.extras
    replace = facts.load(real("counterfact_rome_format_subject_replace_213.json.gz"))
    assert len(replace) == 213 and "alternative_subject" in replace[0].extras


def test_real_counterfact_mend():
    fs = facts.load(real("counterfact_mend_edit.json.gz"))
    assert len(fs) == 10000
    f = next(f for f in fs if f.extras["case_id"] == 0)
    assert (f.subject, f.prompt, f.target_new, f.target_true) == (
        "Danielle Darrieux", "The mother tongue of {} is", "English", "French")  # fmt: skip
    assert f.extras["neighborhood_answers"] == ("French",)
    assert len(facts.load(real("counterfact_mend_val.json.gz"), limit=100)) == 100


def test_real_zsre():
    fs = facts.load(real("zsre_mend_eval_portability_1037.json.gz"))
    assert len(fs) == 1037 and fs[0].target_new == "2006" and fs[0].extras["neighborhood_answers"] == ("The String",)
    # two records of zsRE's train split have an empty new target: skipped with one warning
    with pytest.warns(UserWarning, match="skipped 2 record"):
        assert len(facts.load(real("zsre_mend_train_1k.json.gz"))) == 998
    kn = facts.load(real("zsre_knowedit_test_all_1301.json.gz"))
    assert len(kn) == 1301 and all(len(f.extras["neighborhood_answers"]) == len(f.neighborhood) for f in kn)


def test_real_unsupported_files_fail_clearly():
    with pytest.raises(FactFormatError, match="MQuAKE"):
        facts.load(real("mquake_hard_429.json.gz"))
    with pytest.raises(FactFormatError, match="known_1000"):
        facts.load(real("rome_known_1000.json.gz"))
