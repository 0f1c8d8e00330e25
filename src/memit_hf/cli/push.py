"""`memit-hf push`: upload an adapter or merged checkpoint folder to the Hugging Face Hub."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..arguments import EditingArguments
from .parsing import command_parser, positional


if TYPE_CHECKING:
    from transformers import HfArgumentParser


@dataclass
class PushScriptArguments:
    """The options of `memit-hf push`.

    Args:
        folder (`str`): the adapter or checkpoint directory (the positional `FOLDER`).
        repo_id (`str`): `user/name` on the Hub.
        private (`bool`, *optional*): visibility of a new repository (`None`: the account's default).
        token (`str`, *optional*): Hub token (default: the logged-in one or `HF_TOKEN`).
        commit_message (`str`, *optional*): the commit message.
        revision (`str`, *optional*): branch to push to.
    """

    folder: str = field(metadata={"help": "Adapter or checkpoint directory.", "metavar": "FOLDER"})
    repo_id: str = field(metadata={"help": "`user/name` on the Hub."})
    private: bool | None = field(
        default=None,
        metadata={"help": "Repository visibility (`--private`, `--private false`).", "nargs": "?", "const": True},
    )
    token: str | None = field(default=None, metadata={"help": "Hub token (default: the logged-in one or `HF_TOKEN`)."})
    commit_message: str | None = field(default=None, metadata={"help": "Commit message."})
    revision: str | None = field(default=None, metadata={"help": "Branch to push to."})


def make_parser(subparsers: Any | None = None) -> "HfArgumentParser":
    """The parser of `memit-hf push FOLDER` (a subcommand of `subparsers`, or stand-alone): [`PushScriptArguments`]."""
    parser = command_parser(
        subparsers,
        "push",
        [PushScriptArguments],
        help_text="Upload an adapter or merged checkpoint folder to the Hugging Face Hub.",
        description="Create the repository if needed and upload the folder, with its model card updated to name "
        "the repository.",
    )
    positional(parser, "folder")
    parser.add_argument(
        "--no-private", "--no_private", dest="private", action="store_false", default=None, help="A public repository."
    )
    return parser


def main(script_args: PushScriptArguments, editing_args: EditingArguments | None = None) -> Any:
    """`memit-hf push`: upload the files of an export (see [`~memit_hf.hub.push_folder`]: the ones its
    `memit_edits.json` lists, the model card rebuilt to name the repository, no local path), nothing else of the
    folder.

    Args:
        script_args ([`PushScriptArguments`]): the command's options.
        editing_args ([`EditingArguments`], *optional*): not used (the command takes no editing arguments).

    Returns:
        `huggingface_hub.CommitInfo`: the upload's commit.
    """
    from ..hub import push_folder

    folder = Path(script_args.folder)
    if not folder.is_dir():
        raise SystemExit(f"memit-hf push: error: {folder} is not a directory.")
    commit = push_folder(
        folder,
        script_args.repo_id,
        private=script_args.private,
        token=script_args.token,
        commit_message=script_args.commit_message,
        revision=script_args.revision,
    )
    print(f"Pushed {script_args.folder} to {script_args.repo_id}: {getattr(commit, 'commit_url', commit)}")
    return commit
