"""Sequential editing: a batch of corrections each week, each week in a fresh process, on one saved state.

Each week the base model is loaded again, the state saved the week before is continued (`Editor.from_state`), the
week's facts are edited with a method that protects the earlier ones (accumulated-key MEMIT, `memit_seq`, by
default), and the new state is saved with the whole history as one peft adapter and one adapter per week. At the end
the last week is rolled back, bit for bit.

    python examples/weekly_corrections.py --state_dir out/facts
    python examples/weekly_corrections.py --state_dir out/facts --weeks week1.jsonl week2.jsonl --algorithm alphaedit

Every `EditingArguments` field and method hyperparameter is a flag, as for `memit-hf edit`.
"""

import torch

from memit_hf import Editor, load_requests
from memit_hf.cli import make_script_parser, parse_script_args
from memit_hf.editor_state import StateLock, is_state_dir
from memit_hf.models import load_model_and_tokenizer


WEEKS = [
    [{"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome"}],
    [{"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English"}],
]


def next_token(model, tokenizer, text: str) -> str:
    with torch.no_grad():
        logits = model(**tokenizer(text, return_tensors="pt")).logits[0, -1]
    return tokenizer.decode(int(logits.argmax()))


def make_parser():
    parser = make_script_parser(__doc__)
    parser.add_argument("--weeks", nargs="+", default=None, help="One JSON/JSONL requests file per week.")
    parser.add_argument("--state_dir", "--state-dir", required=True, help="Where the editor state lives.")
    parser.set_defaults(algorithm="memit_seq")  # the best of the sequential methods in benchmarks/sequential.py
    return parser


def edit_one_week(namespace, args, requests) -> Editor:
    """What a weekly job does, in a process of its own: load the base model, continue the state, edit, save."""
    model, tokenizer = load_model_and_tokenizer(namespace.model, args.model_init_kwargs)
    with StateLock(namespace.state_dir):  # a second job on the same state stops here instead of losing a batch
        if is_state_dir(namespace.state_dir):
            editor = Editor.from_state(
                model, namespace.state_dir, args=args, processing_class=tokenizer, stats_dataset=namespace.corpus
            )
        else:
            editor = Editor(model, args=args, processing_class=tokenizer, stats_dataset=namespace.corpus)
        editor.edit(requests)
        editor.save_state(namespace.state_dir)
    return editor


def main(argv=None) -> dict[str, list[str]]:
    namespace, args = parse_script_args(make_parser(), argv)
    weeks = [load_requests(path) for path in namespace.weeks] if namespace.weeks else [load_requests(w) for w in WEEKS]
    prompts = [request.text for week in weeks for request in week]
    answers: dict[str, list[str]] = {}
    for number, requests in enumerate(weeks, start=1):
        editor = edit_one_week(namespace, args, requests)
        answers[f"week {number}"] = [next_token(editor.model, editor.tokenizer, prompt) for prompt in prompts]
        print(
            f"week {number}: {len(editor.history)} batches, {sum(len(o.requests) for o in editor.history)} edits; "
            f"next tokens {answers[f'week {number}']}"
        )

    editor.rollback()  # undo the last week: the weights are those after the week before, bit for bit
    answers["rolled back"] = [next_token(editor.model, editor.tokenizer, prompt) for prompt in prompts]
    print(f"after rolling back the last week: {answers['rolled back']}")
    print(f"the state, the adapter of all weeks and batches/ (one adapter per week) are in {namespace.state_dir}")
    return answers


if __name__ == "__main__":
    main()
