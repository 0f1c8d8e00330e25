"""Tests of `memit_hf.progress`: bars hidden on request, and `TQDM_DISABLE=1` honoured by the shown ones."""

import os
import subprocess
import sys

from memit_hf.progress import progress_bar


SHOWN_BAR = "from memit_hf.progress import progress_bar; print(progress_bar(True, total=3, desc='x').disable)"


def test_hidden_bar_is_disabled():
    bar = progress_bar(False, total=3, desc="hidden")
    assert bar.disable and bar.total == 3
    bar.close()


def test_shown_bar_honours_tqdm_disable_from_the_environment():
    """Before, the statistics and z bars passed `disable=False`, which overrides tqdm's `TQDM_DISABLE=1`."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("TQDM_")}
    shown = subprocess.run([sys.executable, "-c", SHOWN_BAR], env=env, capture_output=True, text=True, check=True)
    hidden = subprocess.run(
        [sys.executable, "-c", SHOWN_BAR], env={**env, "TQDM_DISABLE": "1"}, capture_output=True, text=True, check=True
    )
    assert shown.stdout.strip() == "False"
    assert hidden.stdout.strip() == "True"
