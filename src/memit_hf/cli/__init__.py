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

import sys

from .adapters import run_export, run_push
from .command import THIRD_PARTY_NOISE, main
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


if __name__ == "__main__":
    sys.exit(main())
