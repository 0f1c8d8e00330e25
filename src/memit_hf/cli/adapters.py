"""`memit-hf export` and `memit-hf push`: merge or re-export an edit adapter, upload a folder to the Hub."""

import argparse
import json
from pathlib import Path
from typing import Any

from ..arguments import EditingArguments
from .common import load_model


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


def run_export(namespace: argparse.Namespace, args: EditingArguments) -> Path:
    """`memit-hf export`: a merged checkpoint from an adapter (`--merged`), or the adapter at a lower rank."""
    from ..export import read_edits_metadata, save_merged_checkpoint, write_edit_adapter

    adapter, output_dir = Path(namespace.adapter), Path(namespace.output_dir)
    config, deltas = _read_adapter(adapter)
    metadata = read_edits_metadata(adapter) or {"batches": [], "num_edits": None}
    if namespace.merged:
        from ..loading import load_edits
        from ..models import DEFAULT_MODEL_ID

        base = namespace.model or config.get("base_model_name_or_path")
        if base is None:
            raise SystemExit("memit-hf export: error: the adapter names no base model; pass --model.")
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
    report = write_edit_adapter(deltas, output_dir, metadata, namespace.export_rank)
    print(
        f"Wrote the adapter at ranks {sorted(set(report.ranks.values()))} to {output_dir}: "
        f"{report.adapter_bytes / 1e6:.2f} MB, max relative reconstruction error {report.max_reconstruction_error:.2e}"
    )
    return output_dir


def run_push(namespace: argparse.Namespace, args: EditingArguments) -> Any:
    """`memit-hf push`: upload the files of an export (see [`~memit_hf.hub.push_folder`]: the ones its
    `memit_edits.json` lists, the model card rebuilt to name the repository, no local path), nothing else of the
    folder."""
    from ..hub import push_folder

    folder = Path(namespace.folder)
    if not folder.is_dir():
        raise SystemExit(f"memit-hf push: error: {folder} is not a directory.")
    commit = push_folder(
        folder, namespace.repo_id, namespace.private, namespace.token, namespace.commit_message, namespace.revision
    )
    print(f"Pushed {namespace.folder} to {namespace.repo_id}: {getattr(commit, 'commit_url', commit)}")
    return commit
