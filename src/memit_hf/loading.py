"""Loading edit adapters onto a model: one, several side by side, combined, or merged into the weights.

Plain peft and transformers load the adapters too (`PeftModel.from_pretrained`, `model.load_adapter`); these helpers
add the checks and conveniences of memit-hf (model-type check against the edit metadata, exact combination).
"""

import json
import logging
import os
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from .export import EDITS_METADATA_NAME, read_edits_metadata


logger = logging.getLogger(__name__)


def _edits_metadata(path_or_repo: str, revision: str | None, token: str | None) -> dict[str, Any] | None:
    if Path(path_or_repo).is_dir():
        return read_edits_metadata(path_or_repo)
    try:
        from huggingface_hub import hf_hub_download

        file = hf_hub_download(path_or_repo, EDITS_METADATA_NAME, revision=revision, token=token)
    except Exception:  # not a memit-hf adapter, or offline: peft will say what is wrong
        return None
    return json.loads(Path(file).read_text(encoding="utf-8"))


def load_edits(
    model: Any,
    path_or_repo: str | os.PathLike,
    adapter_name: str = "default",
    merge: bool = False,
    revision: str | None = None,
    token: str | None = None,
) -> Any:
    """Load an edit adapter saved by [`Editor.save_adapter`] (or pushed with [`Editor.push_to_hub`]) onto `model`.

    Args:
        model (`PreTrainedModel` or `peft.PeftModel`):
            The unedited base model, or a `PeftModel` that already holds other adapters (the new one is added beside
            them under `adapter_name`, not activated; use `model.set_adapter(name)` or [`combine_edits`]).
        path_or_repo (`str` or `os.PathLike`): the adapter directory or Hub repository.
        adapter_name (`str`, *optional*, defaults to `"default"`): the name of the loaded adapter.
        merge (`bool`, *optional*, defaults to `False`): fold the edit into the weights and return the plain
            transformers model (`merge_and_unload`).
        revision (`str`, *optional*): the repository revision.
        token (`str`, *optional*): Hub token.

    Returns:
        `peft.PeftModel` with the adapter (active when it is the first one), or the merged `PreTrainedModel` when
        `merge=True`.

    Raises:
        ValueError: when the edit metadata says the adapter was made for another model type.

    Example:

    ```python
    >>> from memit_hf import load_edits
    >>> model = load_edits(base_model, "out/adapter")  # PeftModel; `with model.disable_adapter():` gives the base
    ```
    """
    from peft import PeftModel

    path_or_repo = str(path_or_repo)
    metadata = _edits_metadata(path_or_repo, revision, token)
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    if metadata is not None and isinstance(base, PreTrainedModel):
        expected, actual = metadata.get("model_type"), base.config.model_type
        if expected and expected != actual:
            raise ValueError(
                f"The edits in {path_or_repo} were made for a `{expected}` model, but `model` is `{actual}`."
            )
        expected_name, actual_name = metadata.get("base_model_name_or_path"), base.config._name_or_path
        if expected_name and actual_name and expected_name != actual_name:
            logger.warning(
                "The edits in %s were made on %s; loading them onto %s.", path_or_repo, expected_name, actual_name
            )
    kwargs = {"revision": revision, "token": token} if not Path(path_or_repo).is_dir() else {}
    if isinstance(model, PeftModel):
        model.load_adapter(path_or_repo, adapter_name=adapter_name, **kwargs)
    else:
        model = PeftModel.from_pretrained(model, path_or_repo, adapter_name=adapter_name, **kwargs)
    model.eval()
    if merge:
        return model.merge_and_unload(adapter_names=[adapter_name])
    return model


def combine_edits(model: Any, adapter_names: list[str], combined_name: str = "combined", activate: bool = True) -> Any:
    """Add an adapter holding the exact sum of the edits of `adapter_names` (peft's `add_weighted_adapter` with
    `combination_type="cat"` and unit weights: the factors are concatenated, so its rank is the sum of theirs).

    Batches edited one after another form an ordered stack: batch `k` was computed with the batches before it applied,
    so the sum reproduces the sequential edit, and dropping an earlier batch is not an exact undo of only that batch.

    Args:
        model (`peft.PeftModel`): a model holding the adapters (see [`load_edits`]).
        adapter_names (`list[str]`): the adapters to combine, at least two.
        combined_name (`str`, *optional*, defaults to `"combined"`): the new adapter's name.
        activate (`bool`, *optional*, defaults to `True`): make the combined adapter the active one.

    Returns:
        `peft.PeftModel`: `model`, with the combined adapter added.
    """
    if len(adapter_names) < 2:
        raise ValueError(f"`combine_edits` needs at least two adapters, got {adapter_names}.")
    missing = [name for name in adapter_names if name not in model.peft_config]
    if missing:
        raise ValueError(f"Unknown adapters {missing}; the model holds {list(model.peft_config)}.")
    if combined_name in model.peft_config:
        raise ValueError(f"An adapter named `{combined_name}` already exists.")
    model.add_weighted_adapter(adapter_names, [1.0] * len(adapter_names), combined_name, combination_type="cat")
    if activate:
        model.set_adapter(combined_name)
    return model
