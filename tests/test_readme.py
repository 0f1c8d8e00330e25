"""Every Python code block of README.md runs as written, in order, in one session (the blocks build on each other).

They run in a subprocess on the embedded SmolLM2-135M-Instruct, offline: its Hub id resolves from a local Hub cache
made for the test (`HF_HOME` in a temporary folder), and `HfApi.create_repo` / `upload_folder` are fakes that record
the upload. A block preceded by `<!-- no-test -->` is skipped. Renaming a public name without updating the README
fails here.
"""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest


README = Path(__file__).resolve().parents[1] / "README.md"
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
FAKE_COMMIT = "0" * 40

PRELUDE = """
import json, shutil
from types import SimpleNamespace
import huggingface_hub

UPLOADS = []

def _create_repo(self, repo_id, **kwargs):
    return SimpleNamespace(repo_id=repo_id)

def _upload_folder(self, folder_path, repo_id, **kwargs):
    UPLOADS.append({"repo_id": repo_id, "files": sorted(p.name for p in __import__("pathlib").Path(folder_path).iterdir())})
    return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/fake")

huggingface_hub.HfApi.create_repo = _create_repo  # the fake Hub: nothing leaves the machine
huggingface_hub.HfApi.upload_folder = _upload_folder
"""


def python_blocks(text: str) -> list[str]:
    """The ```python blocks of a Markdown text, without those preceded by `<!-- no-test -->`."""
    blocks = []
    for match in re.finditer(r"(<!-- no-test -->\s*)?```python\n(.*?)```", text, re.S):
        if match.group(1) is None:
            blocks.append(match.group(2))
    return blocks


def test_python_blocks_are_found():
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert len(blocks) >= 6
    assert "Editor(" in blocks[0] and "editor.restore()" in blocks[0]
    assert python_blocks("<!-- no-test -->\n```python\nx\n```\n```python\ny\n```") == ["y\n"]


def make_offline_hub(home: Path) -> None:
    """A Hugging Face home whose Hub cache holds the embedded model under its Hub id (and memit-hf's own copy)."""
    from memit_hf.models import load_default_model

    model, tokenizer = load_default_model()
    repo = home / "hub" / ("models--" + DEFAULT_MODEL_ID.replace("/", "--"))
    snapshot = repo / "snapshots" / FAKE_COMMIT
    model.save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(FAKE_COMMIT)
    own = home / "memit_hf" / "models" / "SmolLM2-135M-Instruct-f32"
    own.parent.mkdir(parents=True)
    own.symlink_to(snapshot, target_is_directory=True)


@pytest.mark.integration
def test_readme_python_blocks_run(tmp_path):
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    make_offline_hub(tmp_path / "hf")
    (tmp_path / "held_out.txt").write_text("The Eiffel Tower is in Paris. Rome is the capital of Italy.\n" * 20)
    script = [PRELUDE]
    for index, block in enumerate(blocks):
        script += [textwrap.dedent(block), f"print('README block {index} ran', flush=True)"]
    script.append("print('UPLOADS ' + json.dumps(UPLOADS))")
    (tmp_path / "readme.py").write_text("\n".join(script), encoding="utf-8")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    env.pop("HF_HUB_CACHE", None)
    result = subprocess.run(
        [sys.executable, "readme.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    for index in range(len(blocks)):
        assert f"README block {index} ran" in result.stdout
    uploads = json.loads(result.stdout.split("UPLOADS ", 1)[1])
    assert uploads[0]["repo_id"] == "user/smollm2-edits"
    assert {"adapter_config.json", "adapter_model.safetensors", "memit_edits.json", "README.md"} <= set(
        uploads[0]["files"]
    )
