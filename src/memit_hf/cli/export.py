"""`memit-hf export`: merge an edit adapter into its base model, or re-export it at a lower rank."""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..arguments import EditingArguments
from .common import load_model
from .parsing import checked_export_rank, command_parser, export_rank_field, positional


if TYPE_CHECKING:
    from transformers import HfArgumentParser


@dataclass
class ExportScriptArguments:
    """The options of `memit-hf export`.

    Args:
        adapter (`str`): directory written by `memit-hf edit` (the positional `ADAPTER_DIR`).
        output_dir (`str`): where to write the result.
        merged (`bool`, *optional*, defaults to `False`): write a merged full checkpoint.
        model (`str`, *optional*): base model (default: the adapter's `base_model_name_or_path`).
        export_rank (`int`, `float` or `str`, *optional*): store at most this rank per module (`int`), or keep this
            fraction of each update's energy (`float`); a string from the command line is parsed into either.
    """

    adapter: str = field(metadata={"help": "Directory written by `memit-hf edit`.", "metavar": "ADAPTER_DIR"})
    output_dir: str = field(metadata={"help": "Where to write the result."})
    merged: bool = field(default=False, metadata={"help": "Write a merged full checkpoint."})
    model: str | None = field(
        default=None,
        metadata={
            "help": "Base model (default: the adapter's `base_model_name_or_path`; the embedded SmolLM2 for its id).",
            "metavar": "PATH_OR_GGUF",
        },
    )
    export_rank: str | None = export_rank_field()

    def __post_init__(self):
        self.export_rank = checked_export_rank(self.export_rank)


def make_parser(subparsers: Any | None = None) -> "HfArgumentParser":
    """The parser of `memit-hf export ADAPTER_DIR` (a subcommand of `subparsers`, or stand-alone):
    [`ExportScriptArguments`]."""
    parser = command_parser(
        subparsers,
        "export",
        [ExportScriptArguments],
        help_text="Turn an edit adapter into a merged checkpoint, or re-export it at a lower rank.",
        description="With --merged, load the adapter's base model (or --model), fold the edit into its weights and "
        "save a full checkpoint that `AutoModelForCausalLM.from_pretrained` loads. Without it, write the adapter "
        "again at --export-rank (lossy; the reconstruction error is printed).",
    )
    positional(parser, "adapter")
    return parser


def _read_adapter(path: Path) -> tuple[dict[str, Any], list[Any]]:
    """The config and the per-module [`LayerDelta`]s of a LoRA adapter directory with scaling-1 modules."""
    from safetensors.torch import load_file

    from ..deltas import LayerDelta
    from ..export import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME

    config_file = path / ADAPTER_CONFIG_NAME
    if not config_file.is_file():
        raise SystemExit(f"memit-hf: error: {path} holds no {ADAPTER_CONFIG_NAME}; is it an adapter directory?")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    tensors = load_file(path / ADAPTER_WEIGHTS_NAME)
    from peft.utils.other import get_pattern_key

    deltas = []
    for key in sorted(k for k in tensors if k.endswith(".lora_A.weight")):
        name = key[len("base_model.model.") : -len(".lora_A.weight")]
        lora_A, lora_B = tensors[key], tensors[key.replace("lora_A", "lora_B")]
        rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
        rank = rank_pattern.get(get_pattern_key(rank_pattern.keys(), name), config["r"])
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), name), config["lora_alpha"])
        scaling = alpha / (rank**0.5 if config.get("use_rslora") else rank)  # 1 for memit-hf adapters
        deltas.append(LayerDelta(name, lora_B.float() * scaling, lora_A.float(), bool(config.get("fan_in_fan_out"))))
    return config, deltas


def main(script_args: ExportScriptArguments, editing_args: EditingArguments | None = None) -> Path:
    """`memit-hf export`: a merged checkpoint from an adapter (`--merged`), or the adapter at a lower rank.

    Args:
        script_args ([`ExportScriptArguments`]): the command's options.
        editing_args ([`EditingArguments`], *optional*): only `model_init_kwargs` is used, to load the base model
            (default: the defaults).

    Returns:
        `Path`: the folder written.
    """
    from ..export import read_edits_metadata, save_merged_checkpoint, write_edit_adapter

    adapter, output_dir = Path(script_args.adapter), Path(script_args.output_dir)
    config, deltas = _read_adapter(adapter)
    metadata = read_edits_metadata(adapter) or {"batches": [], "num_edits": None}
    if script_args.merged:
        from ..loading import load_edits
        from ..models import DEFAULT_MODEL_ID

        base = script_args.model or config.get("base_model_name_or_path")
        if base is None:
            raise SystemExit("memit-hf export: error: the adapter names no base model; pass --model.")
        args = editing_args if editing_args is not None else EditingArguments()
        model, tokenizer = load_model(None if base == DEFAULT_MODEL_ID else base, args)
        merged = load_edits(model, adapter, merge=True)
        metadata = {**metadata, "base_model_name_or_path": config.get("base_model_name_or_path")}
        metadata.pop("export", None)
        save_merged_checkpoint(merged, tokenizer, output_dir, metadata)
        print(f"Merged {adapter} into {base}: wrote the checkpoint to {output_dir}")
        return output_dir
    metadata.pop("export", None)
    metadata.update(
        base_model_name_or_path=config.get("base_model_name_or_path"), base_model_revision=config.get("revision")
    )
    report = write_edit_adapter(deltas, output_dir, metadata, script_args.export_rank)
    print(
        f"Wrote the adapter at ranks {sorted(set(report.ranks.values()))} to {output_dir}: "
        f"{report.adapter_bytes / 1e6:.2f} MB, max relative reconstruction error {report.max_reconstruction_error:.2e}"
    )
    return output_dir
