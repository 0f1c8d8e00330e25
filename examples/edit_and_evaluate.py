"""Edit facts in a causal LM and evaluate the edit (CounterFact metrics before and after).

    python examples/edit_and_evaluate.py                                  # the embedded SmolLM2-135M-Instruct
    python examples/edit_and_evaluate.py --model DIR --corpus wiki.txt --config recipes/smollm2-135m.yaml

Every `EditingArguments` field and method hyperparameter is a flag, as for `memit-hf edit`.
"""

import json

from memit_hf import Editor, load_requests
from memit_hf.cli import make_script_parser, parse_script_args
from memit_hf.models import load_model_and_tokenizer


FACTS = [
    {
        "prompt": "{} is located in the city of",
        "subject": "The Eiffel Tower",
        "target_new": "Rome",
        "target_true": "Paris",
        "paraphrase_prompts": ["The Eiffel Tower stands in the city of"],
        "neighborhood_prompts": ["The Louvre is located in the city of"],
    },
    {
        "prompt": "The mother tongue of {} is",
        "subject": "Danielle Darrieux",
        "target_new": "English",
        "target_true": "French",
        "paraphrase_prompts": ["Danielle Darrieux grew up speaking"],
        "neighborhood_prompts": ["The mother tongue of Jean Gabin is"],
    },
]


def make_parser():
    parser = make_script_parser(__doc__)
    parser.add_argument("--requests", default=None, help="JSON/JSONL requests (default: the two facts above).")
    return parser


def main(argv=None) -> dict[str, float]:
    namespace, args = parse_script_args(make_parser(), argv)
    model, tokenizer = load_model_and_tokenizer(namespace.model, args.model_init_kwargs)
    requests = load_requests(namespace.requests or FACTS)
    editor = Editor(model, args=args, processing_class=tokenizer, stats_dataset=namespace.corpus)
    output = editor.edit(requests)
    metrics = editor.evaluate(requests)  # edited figures, and `pre_*` for the unedited model
    print(json.dumps({"edit_seconds": output.metrics["total_seconds"], **metrics}, indent=2))
    return metrics


if __name__ == "__main__":
    main()
