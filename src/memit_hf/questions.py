"""Questions for CounterFact relations: the edited fact asked as a question, and the neighborhood's cloze prompts
turned into questions about their own subjects.

CounterFact ([ROME](https://huggingface.co/papers/2202.05262)) gives each fact as a cloze prompt (`"{} is located
in"`) and its neighborhood as cloze prompts about other subjects of the same relation, written with varied templates
(`"South Africa is a part of the continent of"`, `"Ghana is in"`). The question-answering evaluation
([`~memit_hf.evaluation.evaluate_wild`]) needs questions instead:

- `RELATION_QUESTIONS` maps each of CounterFact's 34 relation ids to two question templates with `{}` for the
  subject (the first asks the edited fact, the second paraphrases it);
- `RELATION_CLOZE_TEMPLATES` maps each relation id to the cloze templates of that relation (every `requested_rewrite`
  prompt of ROME's CounterFact records, and the neighborhood templates recovered from them), longest fixed text
  first; [`cloze_subject`] recovers the subject of a prompt by matching them in that order.

This module is a leaf: it imports nothing from memit-hf and no third-party package.
"""

from collections.abc import Iterable, Mapping
from types import MappingProxyType


__all__ = [
    "RELATION_CLOZE_TEMPLATES",
    "RELATION_QUESTIONS",
    "cloze_subject",
    "neighbor_questions",
    "questions_for",
]

RELATION_QUESTIONS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "P17": ("Which country is {} located in?", "In which country is {}?"),
        "P19": ("Where was {} born?", "What is the place of birth of {}?"),
        "P20": ("Where did {} die?", "In which city did {} die?"),
        "P27": ("Which country is {} a citizen of?", "What is the country of citizenship of {}?"),
        "P30": ("Which continent is {} located in?", "On which continent is {}?"),
        "P36": ("What is the capital of {}?", "What is the capital city of {}?"),
        "P37": ("What is the official language of {}?", "Which language is official in {}?"),
        "P39": ("What position does {} hold?", "Which title does {} hold?"),
        "P101": ("What field does {} work in?", "What is the area of expertise of {}?"),
        "P103": ("What is the native language of {}?", "What is the mother tongue of {}?"),
        "P106": ("What is the profession of {}?", "What does {} work as?"),
        "P108": ("Who is the employer of {}?", "Which organization is {} employed by?"),
        "P127": ("Who owns {}?", "Who is the owner of {}?"),
        "P131": ("Where is {} located?", "In which region is {}?"),
        "P136": ("What genre of music does {} play?", "What kind of music does {} perform?"),
        "P138": ("What is {} named after?", "Who or what was {} named for?"),
        "P140": ("What is the religion of {}?", "Which religion is {} affiliated with?"),
        "P159": ("Where is {} headquartered?", "Where are the headquarters of {}?"),
        "P176": ("Which company produces {}?", "Who is the manufacturer of {}?"),
        "P178": ("Which company developed {}?", "Who is the developer of {}?"),
        "P190": ("What is the twin city of {}?", "Which city is twinned with {}?"),
        "P264": ("What is the record label of {}?", "Which music label represents {}?"),
        "P276": ("Where is {} located?", "What is the location of {}?"),
        "P364": ("What is the original language of {}?", "In which language was {} originally made?"),
        "P407": ("What language is {} written in?", "In which language was {} written?"),
        "P413": ("What position does {} play?", "In which position does {} play?"),
        "P449": ("On which network did {} premiere?", "Which channel originally aired {}?"),
        "P463": ("Which organization is {} a member of?", "What organization is {} affiliated with?"),
        "P495": ("Which country is {} from?", "In which country was {} created?"),
        "P641": ("What sport does {} play?", "Which sport does {} play professionally?"),
        "P740": ("Where was {} founded?", "In which city was {} formed?"),
        "P937": ("Where did {} work?", "In which city did {} work?"),
        "P1303": ("What instrument does {} play?", "Which musical instrument does {} play?"),
        "P1412": ("What language does {} speak?", "In which language does {} write?"),
    }
)
"""CounterFact relation id -> two question templates with `{}` for the subject (read-only): the question that asks
the fact (`RELATION_QUESTIONS["P30"][0].format("Angola")` is `"Which continent is Angola located in?"`), and a
paraphrase of it."""

RELATION_CLOZE_TEMPLATES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "P17": (
            "{} is located in the country of",
            "{}, which is located in",
            "{} is located in",
            "{}, located in",
            "{}, in",
        ),
        "P19": (
            "{} was originally from",
            "{} is originally from",
            "{} originated from",
            "{} originates from",
            "{} was native to",
            "{} is native to",
            "{} was born in",
        ),
        "P20": (
            "{} died in the city of",
            "{} lost their life at",
            "{}'s life ended in",
            "{} passed away at",
            "{} passed away in",
            "{} succumbed at",
            "{} expired at",
            "{} died at",
            "{} died in",
        ),
        "P27": (
            "{}, who holds a citizenship from",
            "{}, who has a citizenship from",
            "{} holds a citizenship from",
            "{} has a citizenship from",
            "{}, who is a citizen of",
            "{} is a citizen of",
            "{}, a citizen of",
        ),
        "P30": (
            "{} is a part of the continent of",
            "{} belongs to the continent of",
            "{} is located in the continent",
            "{} is located in",
            "{} is in",
            "{}, in",
        ),
        "P36": (
            "{}, which has the capital city",
            "The capital city of {} is",
            "{}, which has the capital",
            "The capital of {} is",
            "{}'s capital city is",
            "{}'s capital city,",
            "{}'s capital is",
            "{}'s capital,",
        ),
        "P37": (
            "The law in {} declares the language",
            "In {}, an official language is",
            "The official language of {} is",
            "In {}, the language spoken is",
            "In {}, they understand",
        ),
        "P39": (
            "{}, who holds the position of",
            "{}, whose position is that of",
            "{}, who has the position of",
            "{} holds the position of",
            "{} has the position of",
            "{} holds the title of",
            "{}'s position is",
            "{} is a",
        ),
        "P101": (
            "The domain of activity of {} is",
            "The domain of work of {} is",
            "{}'s domain of activity is",
            "{} works in the field of",
            "{} works in the area of",
            "The expertise of {} is",
            "{}'s domain of work is",
            "{}'s area of work is",
            "{} specializes in",
            "{}'s expertise is",
        ),
        "P103": (
            "The native language of {} is",
            "The mother tongue of {} is",
            "{} is a native speaker of",
            "{} spoke the language",
            "{}, speaker of",
            "{}, a native",
        ),
        "P106": (
            "The occupation of {} is",
            "The profession of {} is",
            "{}'s profession is an",
            "{}'s profession is a",
            "{}'s occupation is",
            "{}, who works as",
            "{} works as",
        ),
        "P108": (
            "{}, who is employed by",
            "{} is employed by",
            "{}, who works for",
            "{} works for",
            "{}, of",
        ),
        "P127": (
            "{} is owned by",
            "{} is from",
            "{}'s owner",
            "{} owner",
            "{}, from",
            "{}, by",
        ),
        "P131": (
            "{} can be found in",
            "{} is located in",
            "{} is within",
            "{} is in",
            "{}, in",
        ),
        "P136": (
            "What does {} play? They play",
            "{} is known for performing",
            "The genre played by {} is",
            "{}, who plays",
            "{} performs",
            "{} plays",
        ),
        "P138": (
            "{}, which was called after",
            "{}, which is called after",
            "{}, which was named after",
            "{}, which is named after",
            "{}, which was named for",
            "{}, which is named for",
            "{} was called after",
            "{} is called after",
            "{} was named after",
            "{} is named after",
            "{} was named for",
            "{}, called after",
            "{} is named for",
            "{}, named after",
            "{}, named for",
        ),
        "P140": (
            "{} is affiliated with the religion",
            "The official religion of {} is",
            "{} follows the religion of",
            "{} is follower of",
        ),
        "P159": (
            "The headquarter of {} is located in",
            "{}, whose headquarters are in",
            "The headquarters of {} is in",
            "The headquarter of {} is in",
            "{}'s headquarters are in",
            "{} is headquartered in",
            "{} is based in",
        ),
        "P176": (
            "{} is a product of",
            "{} is developed by",
            "{} is produced by",
            "{} is created by",
            "{}, developed by",
            "{}, produced by",
            "{}, created by",
        ),
        "P178": (
            "{}, a product manufactured by",
            "{}, a product developed by",
            "{}, a product created by",
            "{} was a product of",
            "{} was developed by",
            "{} is a product of",
            "{} is developed by",
            "{} was created by",
            "{} is created by",
            "{}, a product of",
            "{}, developed by",
            "{}, created by",
        ),
        "P190": (
            "What is the twin city of {}? It is",
            "The twin city of {} is",
            "{} is a twin city of",
        ),
        "P264": (
            "The music label that is representing {} is",
            "The music label representing {} is",
            "{} is represented by record label",
            "{} is represented by music label",
            "{}, which is represented by",
            "{}, that is represented by",
            "{}'s record company is",
            "{}'s record label is",
            "{}'s music label is",
            "{} recorded for",
            "{}, released by",
            "{}'s label is",
            "{} label :",
        ),
        "P276": (
            "Where is {}? It is located in",
            "The location of {} is",
            "{} can be found in",
            "{} is located in",
            "{} is in",
        ),
        "P364": (
            "The original language of {} was",
            "The original language of {} is",
            "The language of {} was",
            "The language of {} is",
        ),
        "P407": (
            "The language of {} was",
            "The language of {} is",
            "{} was written in",
            "{} is written in",
        ),
        "P413": (
            "Which position does {} play? They play as",
            "{} plays in the position of",
            "{}, who plays the position",
            "{} plays as",
            "{}, the",
        ),
        "P449": (
            "{} was originally aired on",
            "{} was released on",
            "{} is to debut on",
            "{} premiered on",
            "{} premieres on",
            "{} debuted on",
        ),
        "P463": (
            "{} belongs to the organization of",
            "{} is affiliated with the",
            "{} is affiliated with",
            "{} is a part of the",
            "{} is a member of",
        ),
        "P495": (
            "{} was created in the country of",
            "{}, that was formulated in",
            "{}, that was developed in",
            "{}, that was created in",
            "{}, that originated in",
            "{} was formulated in",
            "{} was developed in",
            "{} was created in",
            "{}, formulated in",
            "{}, that was from",
            "{} originated in",
            "{}, developed in",
            "{}, created in",
            "{} was from",
            "{}, from",
            "{} from",
        ),
        "P641": (
            "What sport does {} play? They play",
            "{} professionally plays the sport",
            "{} is a professional",
            "{} plays",
            "{}, the",
        ),
        "P740": (
            "{}, that was created in",
            "{}, that was started in",
            "{} that was founded in",
            "{}, that originated in",
            "{}, that was formed in",
            "{} was created in",
            "{} was founded in",
            "{} was started in",
            "{} originated in",
            "{} was formed in",
            "{}, created in",
            "{}, founded in",
            "{} started in",
            "{} formed in",
        ),
        "P937": (
            "{} worked in the city of",
            "{} found employment in",
            "{} took up work in",
            "{} used to work in",
            "{} was employed in",
            "{} worked in",
        ),
        "P1303": (
            "{} plays the instrument",
            "{}, performing on the",
            "{} performs on the",
            "{}, playing the",
            "{} plays the",
            "{} plays",
            "{}, the",
        ),
        "P1412": (
            "The language used by {} is",
            "{} speaks the language",
            "{} writes in",
            "{} speaks",
        ),
    }
)
"""CounterFact relation id -> the cloze templates of the relation, with `{}` for the subject, longest fixed text first
(read-only). Collected from ROME's CounterFact records: the `requested_rewrite` prompts of each relation, and the
neighborhood and attribute prompts whose subject a known template already gave (the same subject written with
another template)."""


def questions_for(relation_id: str, subject: str) -> list[str]:
    """The questions of a relation about `subject`.

    Args:
        relation_id (`str`): a CounterFact relation id, e.g. `"P30"`.
        subject (`str`): the subject, e.g. `"Angola"`.

    Returns:
        `list[str]`: the relation's `RELATION_QUESTIONS` filled with the subject (the fact's question first, then its
        paraphrase), e.g. `["Which continent is Angola located in?", "On which continent is Angola?"]`; empty for a
        relation id that the table does not know.
    """
    return [template.replace("{}", subject) for template in RELATION_QUESTIONS.get(relation_id, ())]


def cloze_subject(relation_id: str, prompt: str) -> str | None:
    """The subject of a cloze prompt of the relation, found by its template.

    The relation's `RELATION_CLOZE_TEMPLATES` are tried longest first; a template matches when the prompt starts with
    the text before its `{}` and ends with the text after it, and what lies between (the subject) is non-empty and
    has no surrounding whitespace.

    Args:
        relation_id (`str`): a CounterFact relation id, e.g. `"P30"`.
        prompt (`str`): a cloze prompt with the subject filled in, e.g. `"Ghana is a part of the continent of"`.

    Returns:
        `str` or `None`: the subject (`"Ghana"`), or `None` when no template of the relation matches (or the relation
        id is unknown).
    """
    for template in RELATION_CLOZE_TEMPLATES.get(relation_id, ()):
        before, after = template.split("{}")
        if len(prompt) > len(before) + len(after) and prompt.startswith(before) and prompt.endswith(after):
            subject = prompt[len(before) : len(prompt) - len(after)]
            if subject and subject == subject.strip():
                return subject
    return None


def neighbor_questions(relation_id: str, prompts: Iterable[str]) -> list[str]:
    """The neighborhood's cloze prompts as questions: for each prompt whose subject [`cloze_subject`] recovers, the
    relation's first question template with that subject.

    Args:
        relation_id (`str`): the CounterFact relation id of the edited fact (its neighbors share it).
        prompts (`Iterable[str]`): the neighborhood prompts, e.g. `["Ghana is in", "Who is Ghana?"]`.

    Returns:
        `list[str]`: one question per prompt whose subject was recovered, in order, e.g.
        `["Which continent is Ghana located in?"]`; prompts without a matching template give no question, and an
        unknown relation id gives none at all.
    """
    if relation_id not in RELATION_QUESTIONS:
        return []
    first = RELATION_QUESTIONS[relation_id][0]
    subjects = (cloze_subject(relation_id, prompt) for prompt in prompts)
    return [first.replace("{}", subject) for subject in subjects if subject is not None]
