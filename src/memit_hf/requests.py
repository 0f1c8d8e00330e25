"""Edit requests: the record shapes memit-hf accepts, normalised into one dataclass and validated.

Five record shapes are accepted and detected per record (see [`load_requests`]): the canonical shape, CounterFact as
released with ROME/MEMIT, EasyEdit's flat CounterFact, zsRE as released with MEND/ROME, and MQuAKE (a case with several
single-hop edits and multi-hop questions). All of them become [`EditRequest`]s, and every check runs before any weight
is touched.
"""

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from .questions import neighbor_questions, questions_for


@dataclass
class MultiHopQuestions:
    """The multi-hop questions of an MQuAKE case, whose answer changes when the case's single-hop edits are applied.

    Args:
        questions (`list[str]`):
            Questions whose answer chains through the edited facts, e.g. `"Who is the head of state of the country
            where Ellie Kemper holds a citizenship?"` (MQuAKE gives three paraphrases of one question).
        new_answer (`str`):
            The answer once the edits hold, e.g. `"Kolinda Grabar-Kitarović"`.
        answer (`str`, *optional*):
            The answer before the edits, e.g. `"Donald Trump"`.
        new_answer_aliases (`list[str]`):
            Other names of `new_answer`.
        answer_aliases (`list[str]`):
            Other names of `answer`.
    """

    questions: list[str]
    new_answer: str
    answer: str | None = None
    new_answer_aliases: list[str] = field(default_factory=list)
    answer_aliases: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The questions as the canonical record's `multi_hop` field."""
        return {
            "questions": list(self.questions),
            "new_answer": self.new_answer,
            "answer": self.answer,
            "new_answer_aliases": list(self.new_answer_aliases),
            "answer_aliases": list(self.answer_aliases),
        }


@dataclass
class EditRequest:
    """One fact edit, normalised from any accepted record shape.

    Args:
        prompt (`str`):
            Template holding exactly one `{}` where the subject goes, e.g. `"{} is located in the city of"`.
        subject (`str`):
            The subject substituted into `prompt`, e.g. `"The Eiffel Tower"`.
        target_new (`str`):
            The new object the model should state, without a leading space (one is added at tokenisation).
        target_true (`str`, *optional*):
            The object the model states before the edit (used by the evaluation).
        paraphrase_prompts (`list[str]`):
            Full prompts (subject filled in) that paraphrase the edited fact.
        neighborhood_prompts (`list[str]`):
            Full prompts about other subjects whose answer must not change.
        neighborhood_target (`str`, *optional*):
            The expected answer of the neighborhood prompts (defaults to `target_true` for CounterFact).
        generation_prompts (`list[str]`):
            Prompts for free generation (fluency tests).
        attribute_prompts (`list[str]`):
            Prompts about other subjects whose answer is `target_new` (CounterFact), used to build the reference
            texts of the reference score (see [`~memit_hf.evaluation.generation.consistency_texts`]).
        multi_hop ([`MultiHopQuestions`], *optional*):
            The multi-hop questions of the case this edit belongs to (MQuAKE): every request of a case carries the
            same questions, which hold only once all of the case's edits are applied.
        case_id (`int` or `str`, *optional*):
            Identifier carried from the source record.
        record_index (`int`):
            Position of the source record in the input (used in error messages); the requests of one MQuAKE record
            share it.
        question (`str`, *optional*):
            The edited fact asked as a question, answered by `target_new` once the edit holds, e.g. `"Which continent
            is Angola located in?"` (see [`~memit_hf.evaluation.evaluate_wild`]).
        paraphrase_questions (`list[str]`):
            Paraphrases of `question`, answered by `target_new` too.
        neighborhood_questions (`list[str]`):
            Questions about other subjects whose answers must not change (their expected answer is
            `neighborhood_target` where it is known).
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrase_prompts: list[str] = field(default_factory=list)
    neighborhood_prompts: list[str] = field(default_factory=list)
    neighborhood_target: str | None = None
    generation_prompts: list[str] = field(default_factory=list)
    attribute_prompts: list[str] = field(default_factory=list)
    multi_hop: MultiHopQuestions | None = None
    case_id: int | str | None = None
    record_index: int = 0
    question: str | None = None
    paraphrase_questions: list[str] = field(default_factory=list)
    neighborhood_questions: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.prompt.replace("{}", self.subject)

    def to_dict(self, keys: Sequence[str] | None = None) -> dict[str, Any]:
        """The request as a canonical-shape record (without `record_index`), accepted back by [`load_requests`].

        Args:
            keys (`Sequence[str]`, *optional*): keep only these fields (e.g. `EDIT_RECORD_KEYS`, what exported edit
                metadata lists).
        """
        record = {
            "prompt": self.prompt,
            "subject": self.subject,
            "target_new": self.target_new,
            "target_true": self.target_true,
            "paraphrase_prompts": list(self.paraphrase_prompts),
            "neighborhood_prompts": list(self.neighborhood_prompts),
            "neighborhood_target": self.neighborhood_target,
            "generation_prompts": list(self.generation_prompts),
            "attribute_prompts": list(self.attribute_prompts),
            "multi_hop": None if self.multi_hop is None else self.multi_hop.to_dict(),
            "case_id": self.case_id,
            "question": self.question,
            "paraphrase_questions": list(self.paraphrase_questions),
            "neighborhood_questions": list(self.neighborhood_questions),
        }
        return record if keys is None else {key: record[key] for key in keys}


EDIT_RECORD_KEYS = ("case_id", "prompt", "subject", "target_new", "target_true")
"""The fields of a request that exported edit metadata and model cards list."""


RequestsInput = datasets.Dataset | Sequence[Mapping[str, Any] | EditRequest] | Mapping[str, Any] | str | os.PathLike
"""Everything [`load_requests`] accepts."""

CANONICAL_COLUMNS = (
    "prompt",
    "subject",
    "target_new",
    "target_true",
    "paraphrase_prompts",
    "neighborhood_prompts",
    "neighborhood_target",
    "generation_prompts",
    "attribute_prompts",
    "multi_hop",
    "case_id",
    "question",
    "paraphrase_questions",
    "neighborhood_questions",
)
"""The columns of the canonical record shape, in the order [`requests_to_dataset`] writes them."""

ACCEPTED_SHAPES = (
    "canonical (`prompt` containing `{}`, `subject`, `target_new`; optional `target_true`, `paraphrase_prompts`, "
    "`neighborhood_prompts`, `neighborhood_target`, `generation_prompts`, `attribute_prompts`, `multi_hop`, "
    "`case_id`, `question`, `paraphrase_questions`, `neighborhood_questions`); "
    "CounterFact (`requested_rewrite` = {`prompt`, `subject`, `target_new`, `target_true`}, `paraphrase_prompts`, "
    "`neighborhood_prompts`, `generation_prompts`, `attribute_prompts`, `case_id`); "
    "EasyEdit flat CounterFact (`prompt` with the subject filled in, `subject`, `target_new`, `ground_truth`, "
    "`rephrase_prompt`, `locality_prompt`, `locality_ground_truth`); "
    "zsRE (`subject`, `src`, `rephrase`, `alt` and/or `answers`, `loc`, `loc_ans`); "
    "MQuAKE (`requested_rewrite` = a list of CounterFact rewrites, `questions`, `new_answer`, `new_answer_alias`, "
    "`answer`, `answer_alias`, `case_id`)"
)
"""Human-readable list of the accepted record shapes, used in error messages."""

_EASYEDIT_KEYS = ("ground_truth", "rephrase_prompt", "locality_prompt", "locality_ground_truth")
_ZSRE_KEYS = ("src", "alt", "answers", "rephrase", "loc", "loc_ans")
_TARGET = 'a non-empty string or a dict `{"str": ...}`'
_MAX_SHOWN = 80


def _show(value: Any) -> str:
    """A short `repr` of `value` for error messages."""
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."


def _described(value: Any) -> str:
    return f"{type(value).__name__} {_show(value)}"


class _Fields:
    """Typed access to the fields of one record; every error names the record index and the field."""

    def __init__(self, record: Mapping[str, Any], index: int, prefix: str = ""):
        self.record = record
        self.index = index
        self.prefix = prefix

    def error(self, key: str, message: str) -> ValueError:
        return ValueError(f"Request {self.index}: field `{self.prefix}{key}` {message}")

    def get(self, key: str) -> Any:
        # `None` counts as absent: `datasets` fills the columns a record lacks with `None`.
        return self.record.get(key)

    def string(self, key: str, what: str, *, required: bool = True) -> str | None:
        value = self.get(key)
        if value is None:
            if required:
                raise self.error(key, f"is missing; it must be {what}.")
            return None
        if not isinstance(value, str):
            raise self.error(key, f"must be {what} (got {_described(value)}).")
        return value

    def subject(self) -> str:
        value = self.string("subject", "a non-empty string")
        if not value.strip():
            raise self.error("subject", f"must be a non-empty string (got {_show(value)}).")
        return value

    def target(self, key: str, *, required: bool, value: Any = None) -> str | None:
        """A target given as a string or a CounterFact dict `{"str": ...}`, stripped of surrounding whitespace."""
        value = self.get(key) if value is None else value
        if value is None:
            if required:
                raise self.error(key, f"is missing; it must be {_TARGET}.")
            return None
        if isinstance(value, Mapping):
            if not isinstance(value.get("str"), str):
                raise self.error(key, f"must be {_TARGET} (got a dict without a string `str`: {_show(value)}).")
            value = value["str"]
        elif not isinstance(value, str):
            raise self.error(key, f"must be {_TARGET} (got {_described(value)}).")
        if not value.strip():
            raise self.error(key, f"must be {_TARGET} (got the empty target {_show(value)}).")
        return value.strip()

    def string_list(self, key: str, *, allow_string: bool = False) -> list[str]:
        """A list of strings, empty when absent; `allow_string` also accepts one string (the flat shapes)."""
        value = self.get(key)
        if value is None:
            return []
        if allow_string and isinstance(value, str):
            return [value]
        what = "a string or a list of strings" if allow_string else "a list of strings"
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise self.error(key, f"must be {what} (got {_described(value)}).")
        for position, item in enumerate(value):
            if not isinstance(item, str):
                raise self.error(key, f"must be {what} (item {position} is {_described(item)}).")
        return list(value)

    def template(self, key: str) -> str:
        """A prompt holding exactly one `{}` placeholder for the subject."""
        value = self.string(key, "a string containing one `{}` placeholder for the subject")
        if value.count("{}") != 1:
            raise self.error(key, f"must contain exactly one `{{}}` placeholder for the subject (got {_show(value)}).")
        return value

    def filled_template(self, key: str, subject: str) -> str:
        """The template of a prompt given with the subject filled in: the subject's first occurrence becomes `{}`.

        A prompt that already holds a `{}` placeholder is taken as the template itself.
        """
        value = self.string(key, "a string containing the subject")
        if "{}" in value:
            return self.template(key)
        if subject not in value:
            raise self.error(
                key, f"must contain the subject {_show(subject)} to be turned into a template (got {_show(value)})."
            )
        return value.replace(subject, "{}", 1)

    def answer_list(self, key: str) -> list[str]:
        """A list of answer strings (aliases), empty when absent; each stripped, empty ones dropped."""
        return [item.strip() for item in self.string_list(key) if item.strip()]

    def multi_hop(
        self,
        questions: str = "questions",
        new_answer: str = "new_answer",
        new_aliases: str = "new_answer_aliases",
        answer: str = "answer",
        aliases: str = "answer_aliases",
    ) -> MultiHopQuestions:
        """The multi-hop questions held by this record's fields of the given names."""
        question_list = self.string_list(questions)
        if not question_list or not all(question.strip() for question in question_list):
            raise self.error(questions, f"must be a non-empty list of non-empty strings (got {_show(question_list)}).")
        return MultiHopQuestions(
            questions=question_list,
            new_answer=self.target(new_answer, required=True),
            answer=self.target(answer, required=False),
            new_answer_aliases=self.answer_list(new_aliases),
            answer_aliases=self.answer_list(aliases),
        )

    def case_id(self) -> int | str | None:
        value = self.get("case_id")
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise self.error("case_id", f"must be an int or a string (got {_described(value)}).")
        return value


def _canonical_multi_hop(fields: _Fields) -> MultiHopQuestions | None:
    value = fields.get("multi_hop")
    if value is None:
        return None
    if isinstance(value, MultiHopQuestions):
        value = value.to_dict()
    if not isinstance(value, Mapping):
        raise fields.error("multi_hop", f"must be a dict with `questions` and `new_answer` (got {_described(value)}).")
    return _Fields(value, fields.index, prefix="multi_hop.").multi_hop()


def _from_canonical(record: Mapping[str, Any], index: int) -> EditRequest:
    fields = _Fields(record, index)
    prompt, subject = fields.get("prompt"), fields.get("subject")
    if (
        isinstance(prompt, str)
        and isinstance(subject, str)
        and subject.strip()
        and "{}" not in prompt
        and subject in prompt
    ):
        raise fields.error(
            "prompt",
            f"must contain exactly one `{{}}` placeholder for the subject (got {_show(prompt)}); it holds the "
            "subject filled in, so replace the subject with `{}` (or give the EasyEdit fields `ground_truth`, "
            "`rephrase_prompt`, `locality_prompt`, `locality_ground_truth`).",
        )
    return EditRequest(
        prompt=fields.template("prompt"),
        subject=fields.subject(),
        target_new=fields.target("target_new", required=True),
        target_true=fields.target("target_true", required=False),
        paraphrase_prompts=fields.string_list("paraphrase_prompts"),
        neighborhood_prompts=fields.string_list("neighborhood_prompts"),
        neighborhood_target=fields.target("neighborhood_target", required=False),
        generation_prompts=fields.string_list("generation_prompts"),
        attribute_prompts=fields.string_list("attribute_prompts"),
        multi_hop=_canonical_multi_hop(fields),
        case_id=fields.case_id(),
        record_index=index,
        question=fields.string("question", "a string", required=False),
        paraphrase_questions=fields.string_list("paraphrase_questions"),
        neighborhood_questions=fields.string_list("neighborhood_questions"),
    )


def _from_counterfact(record: Mapping[str, Any], index: int) -> EditRequest:
    top = _Fields(record, index)
    rewrite = record["requested_rewrite"]
    if not isinstance(rewrite, Mapping):
        raise top.error(
            "requested_rewrite",
            "must be a dict with `prompt`, `subject`, `target_new` and `target_true`, or a list of such dicts (MQuAKE) "
            f"(got {_described(rewrite)}).",
        )
    inner = _Fields(rewrite, index, prefix="requested_rewrite.")
    target_true = inner.target("target_true", required=False)
    subject = inner.subject()
    neighborhood_prompts = top.string_list("neighborhood_prompts")
    relation_id = inner.string("relation_id", "a string", required=False) or ""
    questions = questions_for(relation_id, subject)
    return EditRequest(
        prompt=inner.template("prompt"),
        subject=subject,
        target_new=inner.target("target_new", required=True),
        target_true=target_true,
        paraphrase_prompts=top.string_list("paraphrase_prompts"),
        neighborhood_prompts=neighborhood_prompts,
        neighborhood_target=target_true,
        generation_prompts=top.string_list("generation_prompts"),
        attribute_prompts=top.string_list("attribute_prompts"),
        case_id=top.case_id(),
        record_index=index,
        question=questions[0] if questions else None,
        paraphrase_questions=questions[1:],
        neighborhood_questions=neighbor_questions(relation_id, neighborhood_prompts),
    )


def _from_mquake(record: Mapping[str, Any], index: int) -> list[EditRequest]:
    """One request per single-hop edit of an MQuAKE case, all carrying the case's multi-hop questions."""
    top = _Fields(record, index)
    rewrites = record["requested_rewrite"]
    if not rewrites:
        raise top.error("requested_rewrite", "must hold at least one edit (got an empty list).")
    multi_hop = None
    if top.get("questions") is not None:
        multi_hop = top.multi_hop(new_aliases="new_answer_alias", aliases="answer_alias")
    requests = []
    for position, rewrite in enumerate(rewrites):
        if not isinstance(rewrite, Mapping):
            raise top.error(
                f"requested_rewrite[{position}]",
                f"must be a dict with `prompt`, `subject`, `target_new` and `target_true` (got {_described(rewrite)}).",
            )
        inner = _Fields(rewrite, index, prefix=f"requested_rewrite[{position}].")
        target_true = inner.target("target_true", required=False)
        requests.append(
            EditRequest(
                prompt=inner.template("prompt"),
                subject=inner.subject(),
                target_new=inner.target("target_new", required=True),
                target_true=target_true,
                neighborhood_target=target_true,
                multi_hop=multi_hop,
                case_id=top.case_id(),
                record_index=index,
                question=inner.string("question", "a string", required=False),
            )
        )
    return requests


def _from_easyedit(record: Mapping[str, Any], index: int) -> EditRequest:
    fields = _Fields(record, index)
    subject = fields.subject()
    return EditRequest(
        prompt=fields.filled_template("prompt", subject),
        subject=subject,
        target_new=fields.target("target_new", required=True),
        target_true=fields.target("ground_truth", required=False),
        paraphrase_prompts=fields.string_list("rephrase_prompt", allow_string=True),
        neighborhood_prompts=fields.string_list("locality_prompt", allow_string=True),
        neighborhood_target=fields.target("locality_ground_truth", required=False),
        case_id=fields.case_id(),
        record_index=index,
    )


def _from_zsre(record: Mapping[str, Any], index: int) -> EditRequest:
    fields = _Fields(record, index)
    subject = fields.subject()
    prompt = fields.filled_template("src", subject)
    answers = fields.string_list("answers")
    alt = fields.string("alt", "a string", required=False)
    first_answer = fields.target("answers", required=True, value=answers[0]) if answers else None
    if alt is not None and alt.strip():
        target_new, target_true = alt.strip(), first_answer
    elif first_answer is not None:
        target_new, target_true = first_answer, None
    else:
        raise fields.error(
            "alt",
            "is missing or empty and so is `answers`: a zsRE record needs a non-empty `alt` or a non-empty list "
            f"`answers` for the new target (got alt={_show(alt)}, answers={_show(fields.get('answers'))}).",
        )
    paraphrase_prompts = fields.string_list("rephrase", allow_string=True)
    neighborhood_prompts = fields.string_list("loc", allow_string=True)
    return EditRequest(
        prompt=prompt,
        subject=subject,
        target_new=target_new,
        target_true=target_true,
        paraphrase_prompts=paraphrase_prompts,
        neighborhood_prompts=neighborhood_prompts,
        neighborhood_target=fields.target("loc_ans", required=False),
        case_id=fields.case_id(),
        record_index=index,
        question=prompt.replace("{}", subject),
        paraphrase_questions=list(paraphrase_prompts),
        neighborhood_questions=[zsre_question(text) for text in neighborhood_prompts],
    )


NQ_PREFIX = "nq question: "
"""The prefix of zsRE's locality prompts (Natural Questions), removed by [`zsre_question`]."""


def zsre_question(text: str) -> str:
    """A zsRE locality prompt as a question: the leading `"nq question: "` removed, the first letter capitalised and a
    `"?"` added when it has none.

    Args:
        text (`str`): e.g. `"nq question: types of skiing in the winter olympics 2018"`.

    Returns:
        `str`: e.g. `"Types of skiing in the winter olympics 2018?"`.
    """
    question = text.strip()
    if question.startswith(NQ_PREFIX):
        question = question[len(NQ_PREFIX) :].strip()
    if question:
        question = question[0].upper() + question[1:]
    return question if question.endswith("?") else question + "?"


def _normalise(record: Any, index: int) -> list[EditRequest]:
    """The validated [`EditRequest`]s of one record of any accepted shape (one, or one per edit of an MQuAKE case),
    with `record_index` set to `index`."""
    if isinstance(record, EditRequest):
        return [_from_canonical(record.to_dict(), index)]
    if not isinstance(record, Mapping):
        raise TypeError(
            f"Request {index}: expected a dict (one record) or an `EditRequest`, got {_described(record)}."
        )
    present = {key for key, value in record.items() if value is not None}
    if "requested_rewrite" in present:
        if isinstance(record["requested_rewrite"], (list, tuple)):
            return _from_mquake(record, index)
        return [_from_counterfact(record, index)]
    if present & set(_ZSRE_KEYS):
        return [_from_zsre(record, index)]
    if present & set(_EASYEDIT_KEYS):
        return [_from_easyedit(record, index)]
    if present & {"prompt", "target_new"}:
        return [_from_canonical(record, index)]
    raise ValueError(
        f"Request {index}: unrecognised record shape with keys {sorted(map(str, record))}. "
        f"Accepted shapes: {ACCEPTED_SHAPES}."
    )


def _read_path(path: Path) -> list[Any]:
    """The records of a `.json` file (a list of records, or one record) or a `.jsonl` file (one record a line)."""
    if not path.is_file():
        raise FileNotFoundError(f"Requests file {str(path)!r} does not exist.")
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            content = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(
                f"Requests file {str(path)!r} is not valid JSON ({error}); "
                "use the `.jsonl` suffix for one record a line."
            ) from error
        if isinstance(content, Mapping):
            return [content]
        if not isinstance(content, list):
            raise ValueError(
                f"Requests file {str(path)!r} must hold a JSON list of records, got {type(content).__name__}."
            )
        return content
    if suffix == ".jsonl":
        records = []
        with path.open(encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(
                        f"Requests file {str(path)!r}, line {line_number}: invalid JSON ({error})."
                    ) from error
        return records
    raise ValueError(f"Requests file {str(path)!r} must end in `.json` or `.jsonl` (got {suffix or 'no suffix'!r}).")


def load_requests(data: RequestsInput) -> list[EditRequest]:
    """Normalise and validate edit requests given in any accepted record shape.

    Each record's shape is detected on its own, so one input may mix shapes. Keys whose value is `None` count as
    absent (`datasets` fills the columns a record lacks with `None`); keys that no shape uses are ignored. The shapes:

    - **canonical**: `prompt` (with one `{}` where the subject goes), `subject`, `target_new` (a string or
      `{"str": ...}`); optional `target_true` (same), `paraphrase_prompts`, `neighborhood_prompts`,
      `neighborhood_target`, `generation_prompts`, `attribute_prompts`, `case_id`, `multi_hop` =
      `{questions, new_answer, answer, new_answer_aliases, answer_aliases}` (see [`MultiHopQuestions`]), and
      `question`, `paraphrase_questions`, `neighborhood_questions` (nothing is derived when they are absent).
    - **CounterFact** (ROME/MEMIT): `requested_rewrite` = `{prompt, subject, target_new{str}, target_true{str}}`,
      `paraphrase_prompts`, `neighborhood_prompts`, `generation_prompts`, `attribute_prompts`, `case_id`. The
      neighborhood target is `target_true`. When `requested_rewrite.relation_id` is one of CounterFact's relations
      ([`~memit_hf.questions.RELATION_QUESTIONS`]), `question` and `paraphrase_questions` are its question
      templates filled with the subject, and `neighborhood_questions` hold its first question about each
      neighborhood subject that [`~memit_hf.questions.cloze_subject`] recovers.
    - **EasyEdit flat CounterFact** (detected by `ground_truth`, `rephrase_prompt`, `locality_prompt` or
      `locality_ground_truth`): `prompt` with the subject filled in (its first occurrence of the subject becomes
      `{}`), `subject`, `target_new`, `ground_truth` (-> `target_true`), `rephrase_prompt` (-> paraphrase),
      `locality_prompt` (-> neighborhood), `locality_ground_truth` (-> `neighborhood_target`). No question is
      derived.
    - **zsRE** (MEND/ROME, detected by `src`, `alt`, `answers`, `rephrase`, `loc` or `loc_ans`): `subject`, `src`
      (the question; its first occurrence of the subject becomes `{}`), `alt` and/or `answers`, `rephrase`
      (-> paraphrase), `loc` (-> neighborhood), `loc_ans` (-> `neighborhood_target`). The new target is `alt` when
      it is non-empty, as in MEND/EasyEdit (then `target_true` is `answers[0]`), else `answers[0]`, as in ROME (then
      `target_true` is `None`). The questions are `src` itself (-> `question`), `rephrase`
      (-> `paraphrase_questions`) and `loc` made a question by [`zsre_question`] (-> `neighborhood_questions`).
    - **MQuAKE** (detected by a *list* `requested_rewrite`): each entry is a CounterFact rewrite `{prompt, subject,
      target_new{str}, target_true{str}}` and becomes its own request (neighborhood target `target_true`); when the
      record has `questions`, every request of the case carries them as `multi_hop` ([`MultiHopQuestions`]) with
      `new_answer`, `new_answer_alias`, `answer` and `answer_alias`; an entry's `question` becomes its request's
      `question`. Other MQuAKE keys (`single_hops`, `orig`, AKEW's
      extras) are ignored.

    The detection order is: a list `requested_rewrite` -> MQuAKE; `requested_rewrite` -> CounterFact; a zsRE key -> zsRE; an EasyEdit key -> EasyEdit;
    `prompt` or `target_new` -> canonical; anything else is an unrecognised shape.

    Targets are stripped of surrounding whitespace (the leading space is added at tokenisation).

    Args:
        data (`datasets.Dataset`, `list[dict]`, `list[EditRequest]`, `dict`, `str` or `os.PathLike`):
            The requests: a dataset or a list/tuple of records (dicts, or `EditRequest`s, which are validated again
            and copied with their new position), a single record, or the path of a `.json` file (a list of
            records) or a `.jsonl` file (one record a line).

    Returns:
        `list[EditRequest]`: one request per record (one per edit for an MQuAKE record), in input order, with
        `record_index` set to the record's position in the input. An empty input gives an empty list.

    Raises:
        ValueError: on the first invalid record, with a message naming the record index and the field, e.g.
            ``Request 3: field `prompt` must contain exactly one `{}` placeholder for the subject (got '...').``;
            also for an unrecognised record shape (the message lists the accepted shapes and the keys found) and
            for a file that is not valid JSON / JSON Lines or has another suffix.
        TypeError: when a record is not a dict or an `EditRequest` (the message names its index), or `data` is
            none of the accepted types (a `datasets.DatasetDict` needs a split chosen first).
        FileNotFoundError: when `data` is a path that does not exist.
    """
    if isinstance(data, (str, os.PathLike)):
        records: Sequence[Any] = _read_path(Path(data))
    elif isinstance(data, datasets.Dataset):
        records = data.to_list()
    elif isinstance(data, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        raise TypeError(
            f"`load_requests` got a `{type(data).__name__}` with splits {list(data)}; pass one split, "
            "e.g. `dataset['train']`."
        )
    elif isinstance(data, (Mapping, EditRequest)):
        records = [data]
    elif isinstance(data, (list, tuple)):
        records = data
    else:
        raise TypeError(
            "`load_requests` expects a `datasets.Dataset`, a list of records, a single record (dict) or the path of "
            f"a `.json`/`.jsonl` file, got {type(data).__name__}."
        )
    return [request for index, record in enumerate(records) for request in _normalise(record, index)]


def changes_nothing(request: EditRequest) -> bool:
    """Whether editing `request` would change nothing: its `target_new` equals its `target_true` (compared without
    surrounding whitespace and case; a record such as zsRE's 90th, whose alternative answer is its answer).

    Args:
        request ([`EditRequest`]): the request.

    Returns:
        `bool`: `True` when the edit would change nothing (never when `target_true` is unknown).
    """
    return (
        request.target_true is not None and request.target_new.strip().lower() == request.target_true.strip().lower()
    )


def check_edit_targets(requests: Sequence[EditRequest]) -> None:
    """Refuse edits that would change nothing: a `target_new` equal to the request's `target_true` (compared without
    surrounding whitespace and case).

    Raises:
        ValueError: naming the request (its record index) and both fields.
    """
    for request in requests:
        if changes_nothing(request):
            raise ValueError(
                f"Request {request.record_index}: field `target_new` ({request.target_new!r}) equals `target_true` "
                f"({request.target_true!r}): the edit would change nothing."
            )


def requests_to_dataset(requests: Sequence[EditRequest]) -> datasets.Dataset:
    """A `datasets.Dataset` of requests in the canonical record shape, which [`load_requests`] reads back.

    Args:
        requests (`list[EditRequest]`):
            The requests, e.g. from [`load_requests`].

    Returns:
        `datasets.Dataset`: one row per request with the columns of `CANONICAL_COLUMNS` (`record_index` is not
        stored: it is the row position). `case_id` is an `int64` column, or a `string` column when some ids are
        strings (ints are then written as their decimal string).

    Raises:
        TypeError: when an item is not an `EditRequest`.
    """
    for index, request in enumerate(requests):
        if not isinstance(request, EditRequest):
            raise TypeError(f"Request {index}: expected an `EditRequest`, got {_described(request)}.")
    case_ids = [request.case_id for request in requests]
    string_ids = any(isinstance(case_id, str) for case_id in case_ids)
    if string_ids:
        case_ids = [None if case_id is None else str(case_id) for case_id in case_ids]
    string, strings = datasets.Value("string"), datasets.Sequence(datasets.Value("string"))
    features = datasets.Features(
        {
            "prompt": string,
            "subject": string,
            "target_new": string,
            "target_true": string,
            "paraphrase_prompts": strings,
            "neighborhood_prompts": strings,
            "neighborhood_target": string,
            "generation_prompts": strings,
            "attribute_prompts": strings,
            "multi_hop": {
                "questions": strings,
                "new_answer": string,
                "answer": string,
                "new_answer_aliases": strings,
                "answer_aliases": strings,
            },
            "case_id": string if string_ids else datasets.Value("int64"),
            "question": string,
            "paraphrase_questions": strings,
            "neighborhood_questions": strings,
        }
    )
    columns: dict[str, list[Any]] = {
        name: [request.to_dict()[name] for request in requests] for name in CANONICAL_COLUMNS
    }
    columns["case_id"] = case_ids
    return datasets.Dataset.from_dict(columns, features=features)
