"""Adding a method is one folder and one line: a toy method added to a copy of the package edits a tiny model, gets
its command-line flag, and the files that differ from the package are exactly those CONTRIBUTING.md names."""

import filecmp
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "memit_hf"

TOY_FILES = {
    "__init__.py": '''"""Toy: MEMIT with a scaled lambda."""

from .config import ToyConfig


__all__ = ["ToyConfig"]
''',
    "config.py": '''"""Hyperparameters of the toy method."""

from dataclasses import dataclass, field
from typing import ClassVar

from ..config import CovarianceConfig


@dataclass
class ToyConfig(CovarianceConfig):
    """MEMIT whose lambda is multiplied by `toy_scale`."""

    name: ClassVar[str] = "toy"
    implementation: ClassVar[str] = ".algorithm:Toy"

    toy_scale: float = field(default=2.0, metadata={"help": "Toy: multiplier of lambda."})
''',
    "algorithm.py": '''"""The toy method."""

from ..base import preserved_term
from ..memit.algorithm import MEMIT
from .config import ToyConfig


class Toy(MEMIT):
    config_class = ToyConfig

    def preserved(self, problem):
        return preserved_term(problem.statistics, self.config.toy_scale * self.config.mom2_update_weight)
''',
}

SCRIPT = """
import sys
import torch
import memit_hf
from memit_hf import Editor, EditingArguments
from memit_hf.algorithms import ALGORITHMS, ALGORITHM_NAMES
from memit_hf.cli import parse_args
from tests.testing_utils import build_tiny_causal_lm, build_tiny_tokenizer, subject_final_requests, tiny_corpus
from tests.testing_utils import tiny_editing_arguments

assert memit_hf.__file__.startswith(sys.argv[1]), memit_hf.__file__
assert "toy" in ALGORITHM_NAMES and ALGORITHMS["toy"].__name__ == "Toy"
_, parsed = parse_args(["edit", "--requests", "r.jsonl", "--output-dir", "o", "--algorithm", "toy", "--toy_scale", "3"])
assert parsed.algorithm == "toy" and parsed.algorithm_config == {"mom2_update_weight": None, "toy_scale": 3.0}
tokenizer = build_tiny_tokenizer()
requests = subject_final_requests()
settings = dict(v_num_grad_steps=3, v_batch_size=4)


def edit(model, algorithm, **method):
    args = tiny_editing_arguments(sys.argv[2], algorithm=algorithm, **settings, **method)
    editor = Editor(model, args=args, processing_class=tokenizer, stats_dataset=tiny_corpus())
    return editor, editor.edit(requests, values=values)


model = build_tiny_causal_lm("llama", len(tokenizer))
reference = Editor(model, args=tiny_editing_arguments(sys.argv[2], **settings), processing_class=tokenizer,
                   stats_dataset=tiny_corpus())
values = reference.compute_values(requests)
toy_editor, toy = edit(model, "toy", mom2_update_weight=1.5, toy_scale=2.0)
assert type(toy_editor.algorithm).__name__ == "Toy"
memit = edit(build_tiny_causal_lm("llama", len(tokenizer)), "memit", mom2_update_weight=3.0)[1]
assert len(toy.deltas) == len(memit.deltas) == 2
for a, b in zip(toy.deltas, memit.deltas):
    torch.testing.assert_close(a.lora_B @ a.lora_A, b.lora_B @ b.lora_A, rtol=1e-5, atol=1e-7)
print("toy ok")
"""


def contributing_method_files(name: str) -> set[str]:
    """The files of the "Adding a method" walk-through of CONTRIBUTING.md (its first `text` block), for `name`."""
    text = (ROOT / "CONTRIBUTING.md").read_text()
    section = text.split("## Adding a method", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```text\n(.*?)```", section, re.S).group(1)
    return {line.split()[0].replace("<name>", name) for line in block.splitlines() if line.strip()}


def differing_files(original: Path, copy: Path) -> set[str]:
    """Files (relative to the package's parent) added to or changed in `copy`."""
    changed = set()
    for path in copy.rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts:
            relative = path.relative_to(copy)
            twin = original / relative
            if not twin.exists() or not filecmp.cmp(path, twin, shallow=False):
                changed.add(str(Path("src/memit_hf") / relative))
    return changed


def test_a_method_is_one_folder_and_one_line(tmp_path):
    copy = tmp_path / "memit_hf"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    folder = copy / "algorithms" / "toy"
    folder.mkdir()
    for file_name, source in TOY_FILES.items():
        (folder / file_name).write_text(source)
    registry = copy / "algorithms" / "registry.py"
    text = registry.read_text()
    last = '    "alphaedit.config:AlphaEditConfig",\n'
    assert text.count(last) == 1
    registry.write_text(text.replace(last, last + '    "toy.config:ToyConfig",\n'))

    assert differing_files(PACKAGE, copy) == contributing_method_files("toy")

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(copy), str(tmp_path / "stats")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "toy ok" in result.stdout
