"""Exports of an [`~memit_hf.Editor`]'s edits: the peft adapter, the merged checkpoint and the Hub push, as a mixin
the Editor inherits (like `transformers`' `PushToHubMixin`)."""

import logging
import tempfile
from pathlib import Path
from typing import Any

from .distributed import on_main_process
from .export import ExportReport, check_output_dir, edit_metadata, save_merged_checkpoint, write_edit_adapter
from .hub import push_folder


logger = logging.getLogger(__name__)


class EditExportMixin:
    """`edit_metadata`, `save_adapter`, `merge_and_save` and `push_to_hub` of the [`~memit_hf.Editor`].

    It reads the editor's `args`, `model`, `tokenizer`, `state` (the process state), `edit_history` and
    `base_model_info`.
    """

    def edit_metadata(self, include_requests: bool = True, base_model_name_or_path: str | None = None) -> dict:
        """What an exported adapter records about the edits the model holds: the base model, and per `edit()` call
        the algorithm, layers, hyperparameters, statistics fingerprints, metrics and requests.

        Args:
            include_requests (`bool`, *optional*, defaults to `True`): list every request; otherwise only their
                count and SHA-256.
            base_model_name_or_path (`str`, *optional*): the base model's Hub id to record (default: the model's
                `name_or_path`, unless it is a temporary path).

        Raises:
            ValueError: when the model holds no edit.
        """
        records = [record.to_dict() for record in self.edit_history.records()]
        if not records:
            raise ValueError("The model holds no edit: call `edit()` first (`restore()` discards the edits).")
        return edit_metadata(self.base_model_info, records, include_requests, base_model_name_or_path)

    def save_adapter(
        self,
        path: str | Path | None = None,
        export_rank: int | float | None = None,
        base_model_name_or_path: str | None = None,
        include_requests: bool = True,
        repo_id: str | None = None,
        overwrite_output_dir: bool = False,
    ) -> ExportReport | None:
        """Save every edit made so far as one standard peft LoRA adapter (`adapter_config.json`,
        `adapter_model.safetensors`), with the edit metadata (`memit_edits.json`) and a model card (`README.md`);
        with `args.push_to_hub`, push the folder to `args.hub_model_id` afterwards (as `Trainer.save_model` does).

        Each edited module gets `r = lora_alpha = ` its number of edit keys (scaling 1) and holds the exact factors
        of its update; successive `edit()` calls are summed by concatenating their factors. Load it without memit-hf
        with `PeftModel.from_pretrained(base, path)`, `base.load_adapter(path)` or
        `AutoModelForCausalLM.from_pretrained(path)`.

        Args:
            path (`str` or `Path`, *optional*): output directory (created; other files in it are kept); default
                `args.output_dir`.
            export_rank (`int` or `float`, *optional*): store at most this rank per module (`int`) or keep this
                fraction of each update's energy (`float` in (0, 1]). Lossy below the update's rank; the relative
                error is in the returned report and logged. Ranks above `min(d_in, d_out)` are always reduced to it,
                exactly.
            base_model_name_or_path (`str`, *optional*): the base model's Hub id to record (default: the model's
                `name_or_path`, unless it is a temporary path).
            include_requests (`bool`, *optional*, defaults to `True`): list the requests in the metadata and card
                (otherwise only their count and hash).
            repo_id (`str`, *optional*): repository named in the model card's loading snippets (default:
                `args.hub_model_id`).
            overwrite_output_dir (`bool`, *optional*, defaults to `False`): remove a merged checkpoint found in
                `path` (otherwise refused: one kind of artefact per folder, see
                [`~memit_hf.export.check_output_dir`]).

        Returns:
            [`~memit_hf.export.ExportReport`]: ranks, reconstruction errors and sizes (`None` on non-main
            processes).

        Raises:
            ValueError: when `path` holds a merged checkpoint and `overwrite_output_dir` is `False` (on every
                process, before anything is written).
        """
        path, repo_id = output_folder(path, self.args.output_dir), repo_id or self.args.hub_model_id
        self._check_push(repo_id)
        report = self._write_adapter(
            path, export_rank, base_model_name_or_path, include_requests, repo_id, overwrite_output_dir
        )
        if self.args.push_to_hub:
            self._push(path, repo_id, merged=False)
        return report

    def _write_adapter(
        self, path: Path, export_rank, base_model_name_or_path, include_requests, repo_id, overwrite_output_dir
    ) -> ExportReport | None:
        metadata = self.edit_metadata(include_requests, base_model_name_or_path)
        deltas = self.edit_history.held_deltas()
        check_output_dir(path, "adapter", overwrite_output_dir)  # every process refuses, none waits at the barrier

        def write() -> ExportReport:
            report = write_edit_adapter(deltas, path, metadata, export_rank, repo_id, overwrite_output_dir)
            logger.info(
                "Adapter: %d parameters, %.2f MB (dense updates: %.2f MB), max reconstruction error %.1e.",
                report.num_parameters,
                report.adapter_bytes / 1e6,
                report.dense_bytes / 1e6,
                report.max_reconstruction_error,
            )
            return report

        return on_main_process(self.state, write)

    def merge_and_save(
        self,
        path: str | Path | None = None,
        base_model_name_or_path: str | None = None,
        include_requests: bool = True,
        repo_id: str | None = None,
        overwrite_output_dir: bool = False,
        **save_kwargs: Any,
    ) -> None:
        """Save the edited model as a full checkpoint (`save_pretrained`, safetensors) with its tokenizer, the edit
        metadata and a model card; `AutoModelForCausalLM.from_pretrained(path)` loads it. With `args.push_to_hub`
        the folder is pushed to `args.hub_model_id` afterwards.

        Args:
            path (`str` or `Path`, *optional*): output directory; default `args.output_dir`.
            base_model_name_or_path (`str`, *optional*): the base model's Hub id for the card's `base_model`.
            include_requests (`bool`, *optional*, defaults to `True`): list the requests in the metadata and card.
            repo_id (`str`, *optional*): repository named in the model card's loading snippets.
            overwrite_output_dir (`bool`, *optional*, defaults to `False`): remove an adapter found in `path`
                (otherwise refused with a `ValueError` on every process: one kind of artefact per folder).
            save_kwargs: passed to `save_pretrained` (e.g. `max_shard_size`).
        """
        path, repo_id = output_folder(path, self.args.output_dir), repo_id or self.args.hub_model_id
        self._check_push(repo_id)
        metadata = self.edit_metadata(include_requests, base_model_name_or_path)
        self._write_checkpoint(path, metadata, repo_id, overwrite_output_dir, **save_kwargs)
        if self.args.push_to_hub:
            self._push(path, repo_id, merged=True)

    def _write_checkpoint(self, path: Path, metadata: dict, repo_id: str | None, overwrite: bool, **kwargs) -> None:
        check_output_dir(path, "checkpoint", overwrite)
        with self.edit_history.applied.merged():  # edits held as hooks (`merge_edits=False`) merged for the save
            on_main_process(
                self.state,
                lambda: save_merged_checkpoint(
                    self.model, self.tokenizer, path, metadata, repo_id, overwrite, **kwargs
                ),
            )

    def push_to_hub(
        self,
        repo_id: str | None = None,
        merged: bool = False,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str | None = None,
        revision: str | None = None,
        export_rank: int | float | None = None,
        base_model_name_or_path: str | None = None,
        include_requests: bool = True,
    ) -> Any:
        """Push the edits to the Hub: the adapter (default) or the merged model, with the model card and metadata.

        Arguments left at `None` fall back to `args.hub_model_id`, `args.hub_private_repo` and `args.hub_token`, as
        `Trainer.push_to_hub` does. The repository is created if needed (`create_repo(exist_ok=True)`), then the
        export's files are uploaded (see [`~memit_hf.hub.push_folder`]).

        Args:
            repo_id (`str`, *optional*): `"user/name"`; defaults to `args.hub_model_id`.
            merged (`bool`, *optional*, defaults to `False`): push the full edited checkpoint instead of the adapter.
            private (`bool`, *optional*): visibility of a new repository.
            token (`str`, *optional*): Hub token.
            commit_message (`str`, *optional*): the commit message.
            revision (`str`, *optional*): branch to push to.
            export_rank, base_model_name_or_path, include_requests: as in [`save_adapter`].

        Returns:
            `huggingface_hub.CommitInfo` of the upload (`None` on non-main processes).
        """
        repo_id = repo_id or self.args.hub_model_id
        if not repo_id:
            raise ValueError(
                "Name the repository: `push_to_hub(repo_id=...)` or `EditingArguments(hub_model_id=...)`."
            )
        with tempfile.TemporaryDirectory(prefix="memit-hf-push-") as folder:
            if merged:
                metadata = self.edit_metadata(include_requests, base_model_name_or_path)
                self._write_checkpoint(Path(folder), metadata, repo_id, False)
            else:
                self._write_adapter(
                    Path(folder), export_rank, base_model_name_or_path, include_requests, repo_id, False
                )
            return self._push(Path(folder), repo_id, merged, private, token, commit_message, revision)

    def _check_push(self, repo_id: str | None) -> None:
        if self.args.push_to_hub and not repo_id:
            raise ValueError("`push_to_hub=True` needs `hub_model_id` (the repository to push to).")

    def _push(
        self,
        folder: Path,
        repo_id: str,
        merged: bool,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str | None = None,
        revision: str | None = None,
    ) -> Any:
        """The one upload of edits: `folder`'s export to `repo_id`, from the main process."""
        private = self.args.hub_private_repo if private is None else private
        token = self.args.hub_token if token is None else token
        message = commit_message or (
            f"Add {self.edit_history.num_edits} fact edits ({'merged model' if merged else 'adapter'})"
        )
        return on_main_process(self.state, lambda: push_folder(folder, repo_id, private, token, message, revision))


def output_folder(path: str | Path | None, default: str | None) -> Path:
    """The folder to write to: `path`, else `default` (`args.output_dir`, as `Trainer.save_model` uses it).

    Raises:
        ValueError: when both are `None`.
    """
    if path is None and default is None:
        raise ValueError("Name the folder: pass `path` or set `EditingArguments(output_dir=...)`.")
    return Path(path if path is not None else default)
