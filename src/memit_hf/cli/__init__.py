"""The `memit-hf` command: `edit`, `stats`, `evaluate`, `demo`, `export` and `push` subcommands.

Each command is a module of this package shaped like TRL's scripts: its options are a dataclass (e.g.
[`~memit_hf.cli.edit.EditScriptArguments`]), `make_parser(subparsers=None)` builds its `HfArgumentParser` (a
subcommand of `memit-hf`, or stand-alone) and `main(script_args, editing_args=None)` runs it. Every
[`EditingArguments`] field is a flag of the editing commands (`--layers 3 4 5`, `--mom2_update_weight 1500`, dashes
or underscores), and `--config recipe.yaml` reads the same fields from a YAML file
([`EditingArguments.read_recipe`]); flags given on the command line win over the file. Heavy libraries (torch,
transformers models) are imported inside the commands' `main` so that `--help` stays fast.

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

from .command import THIRD_PARTY_NOISE, command_modules, main, make_parser, parse_args, parse_command_line
from .demo import DEMO_DEFAULTS, DEMO_REQUESTS, DemoScriptArguments
from .edit import EditScriptArguments
from .evaluate import EVALUATION_CHOICES, EvaluateScriptArguments, comparison_table, markdown_table
from .export import ExportScriptArguments
from .parsing import (
    EDITING_COMMANDS,
    EDITING_FIELDS,
    apply_config,
    command_arguments,
    export_rank_type,
    make_script_parser,
    parse_command,
    parse_script_args,
    subcommand_parser,
)
from .push import PushScriptArguments
from .stats import StatsScriptArguments


__all__ = [
    "DEMO_DEFAULTS",
    "DEMO_REQUESTS",
    "EDITING_COMMANDS",
    "EDITING_FIELDS",
    "EVALUATION_CHOICES",
    "DemoScriptArguments",
    "EditScriptArguments",
    "EvaluateScriptArguments",
    "ExportScriptArguments",
    "PushScriptArguments",
    "StatsScriptArguments",
    "command_modules",
    "comparison_table",
    "export_rank_type",
    "main",
    "make_parser",
    "make_script_parser",
    "markdown_table",
    "parse_args",
    "parse_command",
    "parse_command_line",
    "parse_script_args",
    "subcommand_parser",
]
