"""The `memit-hf` command: `edit`, `stats`, `evaluate`, `demo`, `export` and `push` subcommands.

Every [`EditingArguments`] field is a flag (`--layers 3 4 5`, `--mom2_update_weight 1500`, dashes or underscores),
and `--config recipe.yaml` reads the same fields from a YAML file; flags given on the command line win over the file.
Heavy libraries (torch, transformers models) are imported inside the command functions so that `--help` stays fast.

Examples:

```bash
memit-hf edit --requests edits.jsonl --corpus wiki.txt --output-dir out --layers 3 4 5 6 7
memit-hf edit --model ./my-model --requests edits.json --config recipe.yaml --output-dir out
memit-hf stats --corpus wiki.txt --stats_num_tokens 200000
memit-hf evaluate --requests counterfact.jsonl --edit --corpus wiki.txt --output-dir eval
memit-hf demo
memit-hf export out --merged --output-dir out-merged   # a full edited checkpoint from an edit adapter
memit-hf push out --repo-id user/my-edits              # upload an adapter or checkpoint folder to the Hub
```
"""

import logging
import sys
import warnings

from .adapters import run_export, run_push
from .demo import DEMO_REQUESTS, run_demo
from .edit import run_edit, run_stats
from .evaluate import comparison_table, markdown_table, run_evaluate
from .parsing import (
    COMMANDS,
    DEMO_DEFAULTS,
    EDITING_COMMANDS,
    EDITING_FIELDS,
    EVALUATION_CHOICES,
    export_rank_type,
    make_parser,
    make_script_parser,
    parse_args,
    parse_script_args,
    subcommand_parser,
)


__all__ = [
    "COMMANDS",
    "DEMO_DEFAULTS",
    "DEMO_REQUESTS",
    "EDITING_COMMANDS",
    "EDITING_FIELDS",
    "EVALUATION_CHOICES",
    "comparison_table",
    "main",
    "make_parser",
    "make_script_parser",
    "markdown_table",
    "parse_args",
    "parse_script_args",
    "run_demo",
    "run_edit",
    "run_evaluate",
    "run_export",
    "run_push",
    "run_stats",
]


THIRD_PARTY_NOISE = (
    # peft 0.21 on transformers 5 asks for `is_gradient_checkpointing` while loading any adapter; nothing to act on.
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning),
)
"""Deprecation warnings of our dependencies that a user cannot act on, hidden while a `memit-hf` command runs (only
there: importing memit-hf changes no warning filter)."""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `memit-hf` command; returns the exit code."""
    namespace, args = parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("memit_hf").setLevel(logging.INFO)
    commands = {
        "edit": run_edit, "stats": run_stats, "evaluate": run_evaluate, "demo": run_demo, "export": run_export,
        "push": run_push,
    }  # fmt: skip
    with warnings.catch_warnings():
        for message, category in THIRD_PARTY_NOISE:
            warnings.filterwarnings("ignore", message=message, category=category)
        commands[namespace.command](namespace, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
