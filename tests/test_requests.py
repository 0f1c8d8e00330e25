"""Tests of `memit_hf.requests`: shape detection, normalisation, validation and the dataset round trip."""

import copy
import dataclasses
import json
import re
from pathlib import Path

import datasets
import pytest

from memit_hf.requests import CANONICAL_COLUMNS, EditRequest, MultiHopQuestions, load_requests, requests_to_dataset


# Literal records copied from the examples in shared/data/README.md (the tests never read shared/).
COUNTERFACT_RECORD = {
    "case_id": 20952,
    "pararel_idx": 5151,
    "requested_rewrite": {
        "prompt": "{} is located in",
        "relation_id": "P30",
        "target_new": {"str": "Antarctica", "id": "Q51"},
        "target_true": {"str": "Africa", "id": "Q15"},
        "subject": "Angola",
    },
    "paraphrase_prompts": [
        "Plaque - located at Punkeydoodle's Corners. Angola belongs to the continent of",
        "Last updated on 4 February 2017. Angola is a part of the continent of",
    ],
    "neighborhood_prompts": [
        "South Africa is a part of the continent of",
        "Ghana is in",
        "Burkina Faso is a part of the continent of",
        "Mozambique is in",
        "Ghana is a part of the continent of",
        "Ethiopia is a part of the continent of",
        "Ethiopia is in",
        "Côte d'Ivoire is located in",
        "Democratic Republic of the Congo is in",
        "Algeria is a part of the continent of",
    ],
    "attribute_prompts": [
        "Australian Antarctic Territory is located in",
        "Bellingshausen Sea is in",
        "Ross Island is located in",
        "Bellingshausen Sea is located in the continent",
        "Vostok Station is located in",
        "Vostok Station, in",
        "Robert Island, in",
        "Ross Dependency, in",
        "Robert Island is located in",
        "Ross Dependency is located in",
    ],
    "generation_prompts": [
        "People around Angola speak the language of",
        "People around Angola speak the language of",
        "One can get to Angola by navigating",
        "Angola's surroundings include",
        "Angola's surroundings include",
        "One can get to Angola by navigating",
        "One can get to Angola by navigating",
        "People around Angola speak the language of",
        "One can get to Angola by navigating",
        "People around Angola speak the language of",
    ],
}

EASYEDIT_RECORD = {
    "case_id": 2,
    "prompt": "Toko Yasuda, the",
    "target_new": "piano",
    "subject": "Toko Yasuda",
    "ground_truth": "guitar",
    "rephrase_prompt": "Toko Yasuda is incredible at",
    "locality_prompt": "John Lennon performs on the",
    "locality_ground_truth": "guitar",
}

ZSRE_RECORD = {
    "subject": "Ramalinaceae",
    "src": "Which family does Ramalinaceae belong to?",
    "pred": "Ramalinales",
    "rephrase": "What family are Ramalinaceae?",
    "alt": "Lamiinae",
    "answers": ["Lecanorales"],
    "loc": "nq question: types of skiing in the winter olympics 2018",
    "loc_ans": "Downhill",
    "cond": "Ramalinales >> Lamiinae || Which family does Ramalinaceae belong to?",
    "portability": {
        "Recalled Relation": "(Lamiinae, subfamily of, Cerambycidae)",
        "New Question": "Which family does Ramalinaceae now belong to after the reclassification?",
        "New Answer": "Cerambycidae",
    },
}

ZSRE_TRAIN_RECORD = {
    "subject": "UniFirst",
    "src": "What is the product made by UniFirst?",
    "pred": "uniform",
    "rephrase": "What will be the product of UniFirst?",
    "alt": "unmanned aircraft",
    "answers": ["uniform"],
    "loc": "nq question: john goodman's character in the big lebowski",
    "loc_ans": "Walter Sobchak",
    "cond": "uniform >> unmanned aircraft || What is the product made by UniFirst?",
}

CANONICAL_RECORD = {
    "prompt": "{} is located in the city of",
    "subject": "The Eiffel Tower",
    "target_new": "Rome",
    "target_true": "Paris",
    "paraphrase_prompts": ["Therefore The Eiffel Tower is located in the city of"],
    "neighborhood_prompts": ["The Colosseum is located in the city of"],
    "case_id": "eiffel",
}

MQUAKE_RECORD = {
    "case_id": 6,
    "requested_rewrite": [
        {
            "prompt": "{} was created by",
            "relation_id": "P170",
            "target_new": {"str": "Mark Burnett", "id": "Q1373"},
            "target_true": {"str": "Alexey Pajitnov", "id": "Q312"},
            "subject": "Tetris",
            "question": "Who was Tetris created by?",
        },
        {
            "prompt": "{} was born in the city of",
            "relation_id": "P19",
            "target_new": {"str": "Manila", "id": "Q1461"},
            "target_true": {"str": "London", "id": "Q84"},
            "subject": "Mark Burnett",
            "question": "What is the place of birth of Mark Burnett?",
        },
    ],
    "questions": ["Where was the creator of Tetris born?", "In which city was the creator of Tetris born?"],
    "answer": "Moscow",
    "answer_alias": ["Moskva", " City of Moscow ", ""],
    "new_answer": "Manila",
    "new_answer_alias": ["City of Manila"],
    "single_hops": [{"question": "Who was Tetris created by?", "cloze": "Tetris was created by", "answer": "x"}],
}

ALL_RECORDS = [CANONICAL_RECORD, COUNTERFACT_RECORD, EASYEDIT_RECORD, ZSRE_RECORD]


def _error(index: int, field: str) -> str:
    """The regex an error about `field` of record `index` must match."""
    return rf"Request {index}: field `{re.escape(field)}`"


def _with(record: dict, **changes) -> dict:
    record = copy.deepcopy(record)
    record.update(changes)
    return record


def _without(record: dict, *keys: str) -> dict:
    record = copy.deepcopy(record)
    for key in keys:
        del record[key]
    return record


# ----------------------------------------------------------------------------- shapes


def test_canonical_shape():
    (request,) = load_requests([CANONICAL_RECORD])
    assert request == EditRequest(
        prompt="{} is located in the city of",
        subject="The Eiffel Tower",
        target_new="Rome",
        target_true="Paris",
        paraphrase_prompts=["Therefore The Eiffel Tower is located in the city of"],
        neighborhood_prompts=["The Colosseum is located in the city of"],
        neighborhood_target=None,
        generation_prompts=[],
        case_id="eiffel",
        record_index=0,
    )
    assert request.text == "The Eiffel Tower is located in the city of"


def test_canonical_shape_minimal_and_dict_targets():
    record = {
        "prompt": "The capital of {} is",
        "subject": "France",
        "target_new": {"str": " Berlin "},
        "target_true": {"str": "Paris", "id": "Q90"},
        "neighborhood_target": " Rome",
        "generation_prompts": ["France is"],
        "case_id": 7,
    }
    (request,) = load_requests(record)
    assert request.target_new == "Berlin"
    assert request.target_true == "Paris"
    assert request.neighborhood_target == "Rome"
    assert request.generation_prompts == ["France is"]
    assert request.paraphrase_prompts == [] and request.neighborhood_prompts == []
    assert request.case_id == 7

    (bare,) = load_requests({"prompt": "{} is", "subject": "x", "target_new": "y"})
    assert bare.target_true is None and bare.neighborhood_target is None and bare.case_id is None


def test_counterfact_shape():
    (request,) = load_requests([COUNTERFACT_RECORD])
    assert request.prompt == "{} is located in"
    assert request.subject == "Angola"
    assert request.target_new == "Antarctica"
    assert request.target_true == "Africa"
    assert request.neighborhood_target == "Africa"
    assert request.paraphrase_prompts == COUNTERFACT_RECORD["paraphrase_prompts"]
    assert request.neighborhood_prompts == COUNTERFACT_RECORD["neighborhood_prompts"]
    assert request.generation_prompts == COUNTERFACT_RECORD["generation_prompts"]
    assert request.attribute_prompts == COUNTERFACT_RECORD["attribute_prompts"]
    assert request.case_id == 20952
    assert request.record_index == 0
    assert request.text == "Angola is located in"


def test_mquake_shape_gives_one_request_per_edit_sharing_the_questions():
    first, second = load_requests([MQUAKE_RECORD])
    questions = MultiHopQuestions(
        questions=["Where was the creator of Tetris born?", "In which city was the creator of Tetris born?"],
        new_answer="Manila",
        answer="Moscow",
        new_answer_aliases=["City of Manila"],
        answer_aliases=["Moskva", "City of Moscow"],  # stripped, the empty alias dropped
    )
    assert first == EditRequest(
        prompt="{} was created by",
        subject="Tetris",
        target_new="Mark Burnett",
        target_true="Alexey Pajitnov",
        neighborhood_target="Alexey Pajitnov",
        multi_hop=questions,
        case_id=6,
        record_index=0,
        question="Who was Tetris created by?",
    )
    assert (second.text, second.target_new, second.target_true) == (
        "Mark Burnett was born in the city of",
        "Manila",
        "London",
    )
    assert second.multi_hop == questions and second.case_id == 6 and second.record_index == 0
    # The canonical dataset keeps the questions; each row is then a record of its own.
    restored = load_requests(requests_to_dataset([first, second]))
    assert restored == [first, dataclasses.replace(second, record_index=1)]
    # Without questions a list of rewrites still gives the edits; the next record keeps its own index.
    bare, counterfact = load_requests([_without(MQUAKE_RECORD, "questions"), COUNTERFACT_RECORD])[1:]
    assert bare.multi_hop is None and counterfact.record_index == 1


def test_questions_of_each_shape():
    (counterfact,) = load_requests(COUNTERFACT_RECORD)
    assert counterfact.question == "Which continent is Angola located in?"
    assert counterfact.paraphrase_questions == ["On which continent is Angola?"]
    # Every neighborhood prompt of the record matches a P30 cloze template, longest first ("... is a part of the
    # continent of" before "... is in"), so every neighbor gets the relation's first question.
    subjects = ["South Africa", "Ghana", "Burkina Faso", "Mozambique", "Ghana", "Ethiopia", "Ethiopia"]
    subjects += ["Côte d'Ivoire", "Democratic Republic of the Congo", "Algeria"]
    assert counterfact.neighborhood_questions == [f"Which continent is {s} located in?" for s in subjects]
    # An unknown relation (or none) derives nothing; an unmatched neighbor prompt gives no question.
    for relation in ({"relation_id": "P9999"}, {"relation_id": None}):
        record = _with(COUNTERFACT_RECORD, requested_rewrite={**COUNTERFACT_RECORD["requested_rewrite"], **relation})
        (unknown,) = load_requests(record)
        assert unknown.question is None and unknown.paraphrase_questions == unknown.neighborhood_questions == []
    record = _with(COUNTERFACT_RECORD, neighborhood_prompts=["Ghana is in", "Where is Ghana?"])
    assert load_requests(record)[0].neighborhood_questions == ["Which continent is Ghana located in?"]

    (zsre,) = load_requests(ZSRE_TRAIN_RECORD)
    assert zsre.question == zsre.text == "What is the product made by UniFirst?"
    assert zsre.paraphrase_questions == ["What will be the product of UniFirst?"]
    assert zsre.neighborhood_questions == ["John goodman's character in the big lebowski?"]
    (zsre_asked,) = load_requests(_with(ZSRE_TRAIN_RECORD, loc=["nq question: who wrote hamlet?", "Why?"]))
    assert zsre_asked.neighborhood_questions == ["Who wrote hamlet?", "Why?"]

    first, second = load_requests(MQUAKE_RECORD)
    assert (first.question, second.question) == (
        "Who was Tetris created by?",
        "What is the place of birth of Mark Burnett?",
    )
    assert first.paraphrase_questions == first.neighborhood_questions == []
    rewrites = [_without(rewrite, "question") for rewrite in MQUAKE_RECORD["requested_rewrite"]]
    assert [r.question for r in load_requests(_with(MQUAKE_RECORD, requested_rewrite=rewrites))] == [None, None]

    for record in (EASYEDIT_RECORD, CANONICAL_RECORD):
        (request,) = load_requests(record)
        assert request.question is None and request.paraphrase_questions == request.neighborhood_questions == []


def test_canonical_questions_round_trip(tmp_path):
    record = _with(
        CANONICAL_RECORD,
        question="Which city is The Eiffel Tower located in?",
        paraphrase_questions=["Where is The Eiffel Tower?"],
        neighborhood_questions=["Which city is The Colosseum located in?"],
    )
    (request,) = load_requests(record)
    assert request.question == "Which city is The Eiffel Tower located in?"
    assert request.paraphrase_questions == ["Where is The Eiffel Tower?"]
    assert request.neighborhood_questions == ["Which city is The Colosseum located in?"]
    assert load_requests(request.to_dict()) == [request]
    requests = load_requests([record, COUNTERFACT_RECORD, ZSRE_RECORD, EASYEDIT_RECORD])
    dataset = requests_to_dataset(requests)
    assert dataset.column_names[-3:] == ["question", "paraphrase_questions", "neighborhood_questions"]
    restored = load_requests(dataset)
    assert [r.__dict__ | {"case_id": None} for r in restored] == [r.__dict__ | {"case_id": None} for r in requests]
    path = tmp_path / "canonical.jsonl"
    dataset.to_json(str(path))
    assert [(r.question, r.neighborhood_questions) for r in load_requests(path)] == [
        (r.question, r.neighborhood_questions) for r in requests
    ]
    with pytest.raises(ValueError, match=_error(0, "question")):
        load_requests(_with(CANONICAL_RECORD, question=["Where?"]))
    with pytest.raises(ValueError, match=_error(0, "neighborhood_questions")):
        load_requests(_with(CANONICAL_RECORD, neighborhood_questions="Where?"))


def test_mquake_file():
    requests = load_requests(Path(__file__).parent / "data" / "mquake_cf_sample.jsonl")
    assert [(r.case_id, r.record_index, r.subject) for r in requests] == [
        (1, 0, "Ellie Kemper"),
        (6, 1, "Tetris"),
        (6, 1, "Mark Burnett"),
        (14, 2, "Marc Cherry"),
    ]
    assert requests[0].multi_hop.new_answer == "Kolinda Grabar-Kitarović"
    assert requests[0].multi_hop.answer == "Donald Trump" and "Trump" in requests[0].multi_hop.answer_aliases
    assert all(len(r.multi_hop.questions) == 3 for r in requests)


def test_canonical_multi_hop_field():
    record = _with(
        CANONICAL_RECORD,
        multi_hop={"questions": ["Which country is the city of the Eiffel Tower in?"], "new_answer": "Italy"},
    )
    (request,) = load_requests(record)
    assert request.multi_hop == MultiHopQuestions(
        questions=["Which country is the city of the Eiffel Tower in?"], new_answer="Italy"
    )
    assert load_requests([request]) == [request]
    assert load_requests(request.to_dict()) == [request]


def test_easyedit_shape():
    (request,) = load_requests([EASYEDIT_RECORD])
    assert request == EditRequest(
        prompt="{}, the",
        subject="Toko Yasuda",
        target_new="piano",
        target_true="guitar",
        paraphrase_prompts=["Toko Yasuda is incredible at"],
        neighborhood_prompts=["John Lennon performs on the"],
        neighborhood_target="guitar",
        generation_prompts=[],
        case_id=2,
        record_index=0,
    )


def test_easyedit_shape_replaces_only_first_occurrence_and_accepts_a_template():
    record = _with(EASYEDIT_RECORD, prompt="Toko Yasuda, like Toko Yasuda, the")
    assert load_requests(record)[0].prompt == "{}, like Toko Yasuda, the"
    templated = _with(EASYEDIT_RECORD, prompt="{}, the")
    assert load_requests(templated)[0].prompt == "{}, the"


def test_zsre_shape_uses_alt():
    (request,) = load_requests([ZSRE_RECORD])
    assert request == EditRequest(
        prompt="Which family does {} belong to?",
        subject="Ramalinaceae",
        target_new="Lamiinae",
        target_true="Lecanorales",
        paraphrase_prompts=["What family are Ramalinaceae?"],
        neighborhood_prompts=["nq question: types of skiing in the winter olympics 2018"],
        neighborhood_target="Downhill",
        generation_prompts=[],
        case_id=None,
        record_index=0,
        question="Which family does Ramalinaceae belong to?",
        paraphrase_questions=["What family are Ramalinaceae?"],
        neighborhood_questions=["Types of skiing in the winter olympics 2018?"],
    )


@pytest.mark.parametrize("alt", [None, "", "  "])
def test_zsre_shape_falls_back_to_answers(alt):
    record = _without(ZSRE_TRAIN_RECORD, "alt") if alt is None else _with(ZSRE_TRAIN_RECORD, alt=alt)
    (request,) = load_requests(record)
    assert request.prompt == "What is the product made by {}?"
    assert request.target_new == "uniform"
    assert request.target_true is None
    assert request.neighborhood_target == "Walter Sobchak"


def test_zsre_shape_alt_without_answers():
    (request,) = load_requests(_without(ZSRE_TRAIN_RECORD, "answers"))
    assert request.target_new == "unmanned aircraft"
    assert request.target_true is None


def test_targets_are_stripped():
    requests = load_requests(
        [
            _with(CANONICAL_RECORD, target_new="  Rome\n", target_true=" Paris"),
            _with(EASYEDIT_RECORD, target_new=" piano", ground_truth="guitar ", locality_ground_truth=" guitar"),
            _with(ZSRE_RECORD, alt=" Lamiinae", answers=[" Lecanorales "], loc_ans="Downhill "),
        ]
    )
    assert [(r.target_new, r.target_true, r.neighborhood_target) for r in requests] == [
        ("Rome", "Paris", None),
        ("piano", "guitar", "guitar"),
        ("Lamiinae", "Lecanorales", "Downhill"),
    ]


def test_mixed_shapes_keep_order_and_record_index():
    requests = load_requests(ALL_RECORDS)
    assert [r.subject for r in requests] == ["The Eiffel Tower", "Angola", "Toko Yasuda", "Ramalinaceae"]
    assert [r.record_index for r in requests] == [0, 1, 2, 3]


def test_inputs_are_not_mutated():
    records = copy.deepcopy(ALL_RECORDS)
    load_requests(records)
    assert records == ALL_RECORDS


# ----------------------------------------------------------------------------- inputs


def test_dataset_input():
    dataset = datasets.Dataset.from_list([COUNTERFACT_RECORD, COUNTERFACT_RECORD])
    requests = load_requests(dataset)
    assert len(requests) == 2
    assert requests[1].target_new == "Antarctica" and requests[1].record_index == 1
    assert requests[0] == load_requests(COUNTERFACT_RECORD)[0]


def test_dataset_input_with_columns_filled_with_none():
    # A dataset mixing shapes gets every column in every row, `None` where a record lacked it.
    records = [EASYEDIT_RECORD, _with(CANONICAL_RECORD, case_id=None)]
    keys = sorted({key for record in records for key in record})
    dataset = datasets.Dataset.from_dict({key: [record.get(key) for record in records] for key in keys})
    assert dataset[1]["ground_truth"] is None
    requests = load_requests(dataset)
    assert requests[0] == load_requests(EASYEDIT_RECORD)[0]
    assert requests[1].prompt == CANONICAL_RECORD["prompt"] and requests[1].target_true == "Paris"


def test_list_tuple_and_single_dict_inputs():
    expected = load_requests([ZSRE_RECORD])
    assert load_requests((ZSRE_RECORD,)) == expected
    assert load_requests(ZSRE_RECORD) == expected
    assert load_requests([]) == []


def test_json_path_input(tmp_path):
    path = tmp_path / "requests.json"
    path.write_text(json.dumps(ALL_RECORDS), encoding="utf-8")
    assert load_requests(path) == load_requests(ALL_RECORDS)
    assert load_requests(str(path)) == load_requests(ALL_RECORDS)


def test_json_path_with_single_record(tmp_path):
    path = tmp_path / "one.json"
    path.write_text(json.dumps(EASYEDIT_RECORD), encoding="utf-8")
    assert load_requests(path) == load_requests([EASYEDIT_RECORD])


def test_jsonl_path_input(tmp_path):
    path = tmp_path / "requests.jsonl"
    lines = [json.dumps(record, ensure_ascii=False) for record in ALL_RECORDS]
    path.write_text("\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n", encoding="utf-8")
    requests = load_requests(str(path))
    assert requests == load_requests(ALL_RECORDS)
    assert [r.record_index for r in requests] == [0, 1, 2, 3]


def test_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_requests(tmp_path / "missing.json")
    bad_suffix = tmp_path / "requests.csv"
    bad_suffix.write_text("prompt,subject\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"\.json` or `\.jsonl"):
        load_requests(bad_suffix)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("[{]", encoding="utf-8")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_requests(bad_json)
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text(json.dumps(ZSRE_RECORD) + "\n{oops\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 2"):
        load_requests(bad_jsonl)
    not_a_list = tmp_path / "number.json"
    not_a_list.write_text("3", encoding="utf-8")
    with pytest.raises(ValueError, match="JSON list of records"):
        load_requests(not_a_list)


def test_unsupported_input_types():
    with pytest.raises(TypeError, match="expects"):
        load_requests(42)
    with pytest.raises(TypeError, match="pass one split"):
        load_requests(datasets.DatasetDict({"train": datasets.Dataset.from_list([CANONICAL_RECORD])}))


def test_edit_request_pass_through():
    originals = load_requests(ALL_RECORDS)
    again = load_requests(originals[2:])
    assert [r.record_index for r in again] == [0, 1]
    assert again[0] == EditRequest(**{**originals[2].__dict__, "record_index": 0})
    assert again[1].subject == "Ramalinaceae"
    assert load_requests(originals) == originals
    assert load_requests(originals[0]) == [originals[0]]


def test_edit_request_pass_through_is_validated():
    bad = EditRequest(prompt="no placeholder", subject="x", target_new="y")
    with pytest.raises(ValueError, match=_error(1, "prompt")):
        load_requests([load_requests(CANONICAL_RECORD)[0], bad])
    with pytest.raises(ValueError, match=_error(0, "target_new")):
        load_requests([EditRequest(prompt="{} is", subject="x", target_new=" ")])


# ----------------------------------------------------------------------------- round trip


def test_requests_to_dataset_round_trip():
    requests = load_requests(ALL_RECORDS)
    dataset = requests_to_dataset(requests)
    assert isinstance(dataset, datasets.Dataset)
    assert tuple(dataset.column_names) == CANONICAL_COLUMNS
    assert len(dataset) == 4
    # One case id is a string, so the column holds strings.
    assert dataset["case_id"] == ["eiffel", "20952", "2", None]
    restored = load_requests(dataset)
    assert [r.prompt for r in restored] == [r.prompt for r in requests]
    assert [r.__dict__ | {"case_id": None} for r in restored] == [r.__dict__ | {"case_id": None} for r in requests]


def test_requests_to_dataset_round_trip_is_exact_with_int_case_ids(tmp_path):
    requests = load_requests([COUNTERFACT_RECORD, EASYEDIT_RECORD, ZSRE_RECORD])
    dataset = requests_to_dataset(requests)
    assert dataset.features["case_id"].dtype == "int64"
    assert load_requests(dataset) == requests
    path = tmp_path / "canonical.jsonl"
    dataset.to_json(str(path))
    assert load_requests(path) == requests


def test_requests_to_dataset_empty_and_type_error():
    empty = requests_to_dataset([])
    assert len(empty) == 0 and tuple(empty.column_names) == CANONICAL_COLUMNS
    with pytest.raises(TypeError, match="Request 1: expected an `EditRequest`"):
        requests_to_dataset([load_requests(CANONICAL_RECORD)[0], CANONICAL_RECORD])


# ----------------------------------------------------------------------------- errors


def test_record_not_a_mapping():
    with pytest.raises(TypeError, match=r"Request 1: expected a dict"):
        load_requests([CANONICAL_RECORD, ["prompt", "subject"]])
    with pytest.raises(TypeError, match=r"Request 0: expected a dict"):
        load_requests(["{} is located in"])


def test_unknown_shape_lists_shapes_and_keys():
    with pytest.raises(ValueError, match=r"Request 2: unrecognised record shape") as info:
        load_requests([CANONICAL_RECORD, ZSRE_RECORD, {"question": "Where?", "answer": "Here"}])
    message = str(info.value)
    assert "['answer', 'question']" in message
    for shape in ("canonical", "CounterFact", "EasyEdit", "zsRE"):
        assert shape in message


def test_empty_record_is_unknown_shape():
    with pytest.raises(ValueError, match=r"Request 0: unrecognised record shape with keys \[\]"):
        load_requests([{}])


@pytest.mark.parametrize(
    "record, field, message",
    [
        # canonical
        (_with(CANONICAL_RECORD, prompt="{} is in {}"), "prompt", r"exactly one `\{\}` placeholder"),
        (_with(CANONICAL_RECORD, prompt="is located in the city of"), "prompt", r"exactly one `\{\}` placeholder"),
        (_with(CANONICAL_RECORD, prompt="The Eiffel Tower is in"), "prompt", "replace the subject"),
        (_with(CANONICAL_RECORD, prompt=3), "prompt", "got int 3"),
        (_without(CANONICAL_RECORD, "prompt"), "prompt", "is missing"),
        (_with(CANONICAL_RECORD, subject=["The Eiffel Tower"]), "subject", "must be a non-empty string"),
        (_with(CANONICAL_RECORD, subject=""), "subject", "must be a non-empty string"),
        (_with(CANONICAL_RECORD, subject="   "), "subject", "must be a non-empty string"),
        (_without(CANONICAL_RECORD, "subject"), "subject", "is missing"),
        (_with(CANONICAL_RECORD, target_new=""), "target_new", "empty target"),
        (_with(CANONICAL_RECORD, target_new="  "), "target_new", "empty target"),
        (_with(CANONICAL_RECORD, target_new={"str": ""}), "target_new", "empty target"),
        (_with(CANONICAL_RECORD, target_new={"id": "Q1"}), "target_new", "without a string `str`"),
        (_with(CANONICAL_RECORD, target_new=5), "target_new", "got int 5"),
        (_without(CANONICAL_RECORD, "target_new"), "target_new", "is missing"),
        (_with(CANONICAL_RECORD, target_true=["Paris"]), "target_true", "got list"),
        (_with(CANONICAL_RECORD, neighborhood_target=""), "neighborhood_target", "empty target"),
        (_with(CANONICAL_RECORD, paraphrase_prompts="one prompt"), "paraphrase_prompts", "list of strings"),
        (_with(CANONICAL_RECORD, paraphrase_prompts=["ok", 3]), "paraphrase_prompts", "item 1 is int"),
        (_with(CANONICAL_RECORD, neighborhood_prompts={"a": 1}), "neighborhood_prompts", "list of strings"),
        (_with(CANONICAL_RECORD, generation_prompts=[None]), "generation_prompts", "item 0 is NoneType"),
        (_with(CANONICAL_RECORD, case_id=1.5), "case_id", "int or a string"),
        (_with(CANONICAL_RECORD, case_id=True), "case_id", "int or a string"),
        # CounterFact
        (_with(COUNTERFACT_RECORD, requested_rewrite="Angola"), "requested_rewrite", "must be a dict"),
        # MQuAKE
        (_with(MQUAKE_RECORD, requested_rewrite=[]), "requested_rewrite", "at least one edit"),
        (
            _with(MQUAKE_RECORD, requested_rewrite=[MQUAKE_RECORD["requested_rewrite"][0], "Manila"]),
            "requested_rewrite[1]",
            "must be a dict",
        ),
        (
            _with(
                MQUAKE_RECORD,
                requested_rewrite=[
                    MQUAKE_RECORD["requested_rewrite"][0],
                    {**MQUAKE_RECORD["requested_rewrite"][1], "prompt": "Mark Burnett was born in"},
                ],
            ),
            "requested_rewrite[1].prompt",
            r"exactly one `\{\}` placeholder",
        ),
        (_with(MQUAKE_RECORD, questions="Where?"), "questions", "list of strings"),
        (_with(MQUAKE_RECORD, questions=[]), "questions", "non-empty list"),
        (_with(MQUAKE_RECORD, questions=["Where?", " "]), "questions", "non-empty strings"),
        (_without(MQUAKE_RECORD, "new_answer"), "new_answer", "is missing"),
        (_with(MQUAKE_RECORD, new_answer_alias="Manila"), "new_answer_alias", "list of strings"),
        (_with(MQUAKE_RECORD, answer=""), "answer", "empty target"),
        (_with(CANONICAL_RECORD, multi_hop="Where?"), "multi_hop", "must be a dict"),
        (_with(CANONICAL_RECORD, multi_hop={"questions": ["Where?"]}), "multi_hop.new_answer", "is missing"),
        (
            _with(
                COUNTERFACT_RECORD,
                requested_rewrite={**COUNTERFACT_RECORD["requested_rewrite"], "prompt": "Angola is in"},
            ),
            "requested_rewrite.prompt",
            r"exactly one `\{\}` placeholder",
        ),
        (
            _with(COUNTERFACT_RECORD, requested_rewrite={**COUNTERFACT_RECORD["requested_rewrite"], "subject": ""}),
            "requested_rewrite.subject",
            "non-empty string",
        ),
        (
            _with(
                COUNTERFACT_RECORD,
                requested_rewrite={**COUNTERFACT_RECORD["requested_rewrite"], "target_new": {"str": " ", "id": "Q51"}},
            ),
            "requested_rewrite.target_new",
            "empty target",
        ),
        (
            _with(
                COUNTERFACT_RECORD, requested_rewrite=_without(COUNTERFACT_RECORD["requested_rewrite"], "target_new")
            ),
            "requested_rewrite.target_new",
            "is missing",
        ),
        (_with(COUNTERFACT_RECORD, neighborhood_prompts="Ghana is in"), "neighborhood_prompts", "list of strings"),
        # EasyEdit flat CounterFact
        (_with(EASYEDIT_RECORD, subject="Yoko Ono"), "prompt", "must contain the subject 'Yoko Ono'"),
        (_with(EASYEDIT_RECORD, prompt="{}, the {}"), "prompt", r"exactly one `\{\}` placeholder"),
        (_with(EASYEDIT_RECORD, subject=None), "subject", "is missing"),
        (_with(EASYEDIT_RECORD, subject=42), "subject", "got int 42"),
        (_with(EASYEDIT_RECORD, target_new=""), "target_new", "empty target"),
        (_with(EASYEDIT_RECORD, ground_truth=1), "ground_truth", "got int 1"),
        (_with(EASYEDIT_RECORD, rephrase_prompt=7), "rephrase_prompt", "string or a list of strings"),
        (_with(EASYEDIT_RECORD, locality_prompt=[1]), "locality_prompt", "item 0 is int"),
        (_with(EASYEDIT_RECORD, locality_ground_truth=""), "locality_ground_truth", "empty target"),
        # zsRE
        (_with(ZSRE_RECORD, subject="Lichen"), "src", "must contain the subject 'Lichen'"),
        (_with(ZSRE_RECORD, src=None), "src", "is missing"),
        (_with(ZSRE_RECORD, subject=""), "subject", "non-empty string"),
        (_with(ZSRE_RECORD, alt="", answers=[]), "alt", "and so is `answers`"),
        (_without(ZSRE_RECORD, "alt", "answers"), "alt", "and so is `answers`"),
        (_with(ZSRE_RECORD, alt=3), "alt", "got int 3"),
        (_with(ZSRE_RECORD, answers="Lecanorales"), "answers", "list of strings"),
        (_with(ZSRE_RECORD, alt="", answers=[" "]), "answers", "empty target"),
        (_with(ZSRE_RECORD, rephrase=["ok", 2]), "rephrase", "item 1 is int"),
        (_with(ZSRE_RECORD, loc=0), "loc", "string or a list of strings"),
        (_with(ZSRE_RECORD, loc_ans=""), "loc_ans", "empty target"),
    ],
)
def test_validation_errors_name_index_and_field(record, field, message):
    records = [CANONICAL_RECORD, COUNTERFACT_RECORD, EASYEDIT_RECORD, record]
    with pytest.raises(ValueError, match=_error(3, field)) as info:
        load_requests(records)
    assert re.search(message, str(info.value)), str(info.value)


def test_first_error_raises():
    records = [CANONICAL_RECORD, _with(EASYEDIT_RECORD, target_new=""), _with(ZSRE_RECORD, subject="")]
    with pytest.raises(ValueError, match=_error(1, "target_new")):
        load_requests(records)


def test_error_message_format_and_truncation():
    long_prompt = "x" * 500
    with pytest.raises(ValueError) as info:
        load_requests([_with(CANONICAL_RECORD, prompt=long_prompt)])
    message = str(info.value)
    assert message.startswith(
        "Request 0: field `prompt` must contain exactly one `{}` placeholder for the subject (got '"
    )
    assert len(message) < 300


def test_validation_errors_from_dataset_and_path_inputs(tmp_path):
    bad = [CANONICAL_RECORD, _with(CANONICAL_RECORD, prompt="no placeholder")]
    with pytest.raises(ValueError, match=_error(1, "prompt")):
        load_requests(datasets.Dataset.from_list(bad))
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(record) for record in bad), encoding="utf-8")
    with pytest.raises(ValueError, match=_error(1, "prompt")):
        load_requests(path)


def test_an_edit_to_the_true_target_is_refused():
    """Point 10 of the trust issue: `target_new == target_true` is an edit that changes nothing."""
    from memit_hf.requests import check_edit_targets

    requests = load_requests(
        [
            {"prompt": "{} is in", "subject": "Paris", "target_new": "France", "target_true": "Spain"},
            {"prompt": "{} is in", "subject": "Rome", "target_new": " Italy", "target_true": "italy"},
        ]
    )
    with pytest.raises(ValueError, match=r"Request 1: field `target_new` \('Italy'\) equals `target_true`"):
        check_edit_targets(requests)
    check_edit_targets(requests[:1])


def test_changes_nothing_compares_the_targets_without_case_and_space():
    """`changes_nothing` (what `check_edit_targets` refuses, and what the benchmarks skip): `target_new` equal to
    `target_true` up to case and surrounding white space; never when `target_true` is unknown."""
    from memit_hf.requests import changes_nothing

    same, other, unknown = load_requests(
        [
            {"prompt": "{} is in", "subject": "Rome", "target_new": " Italy ", "target_true": "italy"},
            {"prompt": "{} is in", "subject": "Paris", "target_new": "France", "target_true": "Spain"},
            {"prompt": "{} is in", "subject": "Oslo", "target_new": "Norway"},
        ]
    )
    assert changes_nothing(same) and not changes_nothing(other) and not changes_nothing(unknown)
