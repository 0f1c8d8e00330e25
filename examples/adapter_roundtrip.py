"""Save an edit as a peft LoRA adapter, then load it elsewhere with plain peft (no memit-hf needed there).

    python examples/adapter_roundtrip.py --output_dir out/eiffel
    python examples/adapter_roundtrip.py --model DIR --corpus wiki.txt --output_dir out/eiffel

Every `EditingArguments` field and method hyperparameter is a flag, as for `memit-hf edit`.
"""

import torch
from peft import PeftModel

from memit_hf import Editor, load_requests
from memit_hf.cli import make_script_parser, parse_script_args
from memit_hf.models import load_model_and_tokenizer


FACT = {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome"}


def next_token(model, tokenizer, text: str) -> str:
    with torch.no_grad():
        logits = model(**tokenizer(text, return_tensors="pt")).logits[0, -1]
    return tokenizer.decode(int(logits.argmax()))


def make_parser():
    parser = make_script_parser(__doc__)
    parser.add_argument("--requests", default=None, help="JSON/JSONL requests (default: the Eiffel Tower in Rome).")
    return parser


def main(argv=None) -> dict[str, str]:
    namespace, args = parse_script_args(make_parser(), argv)
    if args.output_dir is None:
        raise SystemExit("Pass --output_dir: where the adapter is written.")
    model, tokenizer = load_model_and_tokenizer(namespace.model, args.model_init_kwargs)
    requests = load_requests(namespace.requests or [FACT])
    prompt = requests[0].text

    # On the machine that edits: edit, save the adapter, give the base model its weights back.
    editor = Editor(model, args=args, processing_class=tokenizer, stats_dataset=namespace.corpus)
    editor.edit(requests)
    edited = next_token(model, tokenizer, prompt)
    editor.save_adapter(args.output_dir)
    editor.restore()

    # Anywhere else: the base model and plain peft.
    served = PeftModel.from_pretrained(model, args.output_dir)
    answers = {"edited": edited, "adapter": next_token(served, tokenizer, prompt)}
    with served.disable_adapter():
        answers["adapter_disabled"] = next_token(served, tokenizer, prompt)
    print(
        f"{prompt!r} -> edited {answers['edited']!r}, through the adapter {answers['adapter']!r}, "
        f"adapter off {answers['adapter_disabled']!r}"
    )
    return answers


if __name__ == "__main__":
    main()
