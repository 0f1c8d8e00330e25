"""Edit requests: the record shapes memit-hf accepts, normalised into one dataclass and validated."""

from dataclasses import dataclass, field


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
        case_id (`int` or `str`, *optional*):
            Identifier carried from the source record.
        record_index (`int`):
            Position of the source record in the input (used in error messages).
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrase_prompts: list[str] = field(default_factory=list)
    neighborhood_prompts: list[str] = field(default_factory=list)
    neighborhood_target: str | None = None
    generation_prompts: list[str] = field(default_factory=list)
    case_id: int | str | None = None
    record_index: int = 0

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.prompt.replace("{}", self.subject)
