"""Shareable statistics without network: `HfApi.create_repo` / `upload_folder` / `snapshot_download` are replaced by
a fake Hub that stores uploaded folders and serves them back. Statistics pushed from one editor are fetched by a fresh
editor with no local cache and no corpus, whose edit equals one with locally collected statistics; statistics of
another model, dtype, weights or layer are refused before any weight changes, and before any tensor is fetched."""

import copy
import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from memit_hf.editor import Editor
from memit_hf.statistics import (
    STATISTICS_REPO_TYPE,
    StatisticsCache,
    StatisticsMismatchError,
    build_statistics_card,
    push_statistics,
)
from tests.testing_utils import (
    FAKE_COMMIT,
    build_tiny_causal_lm,
    build_tiny_tokenizer,
    changed_tensors,
    fake_dataset_hub,
    parameters_snapshot,
    subject_final_requests,
    tiny_corpus,
    tiny_editing_arguments,
)


NAMES = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


@pytest.fixture
def fake_hub(tmp_path):
    with fake_dataset_hub(tmp_path / "hub") as hub:
        yield hub


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def base(tokenizer):
    return build_tiny_causal_lm("llama", vocab_size=len(tokenizer))


@pytest.fixture(scope="module")
def local(base, tokenizer, tmp_path_factory):
    """An edit with statistics collected locally over the tiny corpus, and the cache holding them."""
    cache_dir = tmp_path_factory.mktemp("local-stats")
    model = copy.deepcopy(base)
    editor = Editor(model, args=tiny_editing_arguments(cache_dir), processing_class=tokenizer,
                    stats_dataset=tiny_corpus())  # fmt: skip
    output = editor.edit(subject_final_requests())
    statistics = editor.get_statistics([0, 1])
    return SimpleNamespace(cache_dir=cache_dir, output=output, statistics=statistics, editor=editor)


def push(local, repo_id="me/tiny-stats", **kwargs):
    fingerprints = [layer.fingerprint for layer in local.statistics.values()]
    return push_statistics(repo_id, fingerprints, StatisticsCache(local.cache_dir), **kwargs)


def repo_editor(model, tokenizer, cache_dir, stats_repo, **overrides):
    args = tiny_editing_arguments(cache_dir, stats_repo=str(stats_repo), **overrides)
    return Editor(model, args=args, processing_class=tokenizer)  # no corpus: the repository replaces it


def test_push_uploads_every_layer_with_a_card(local, fake_hub):
    result = push(local, private=True, token="hf_secret")
    assert result.commit_url.startswith("https://huggingface.co/datasets/me/tiny-stats")
    assert fake_hub.created == [
        {"repo_id": "me/tiny-stats", "private": True, "repo_type": STATISTICS_REPO_TYPE, "token": "hf_secret"}
    ]
    (upload,) = fake_hub.uploads
    assert upload["repo_type"] == "dataset" and upload["message"] == "Upload memit-hf statistics of 2 modules"
    stems = sorted(
        StatisticsCache(local.cache_dir).paths(layer.fingerprint)[0].stem for layer in local.statistics.values()
    )
    assert upload["files"] == ["README.md"] + sorted(
        [f"{s}.json" for s in stems] + [f"{s}.safetensors" for s in stems]
    )
    card = (fake_hub.repo("me/tiny-stats") / "README.md").read_text()
    assert card.startswith("---\n") and "memit-hf" in card and "covariance-statistics" in card
    count = local.statistics[NAMES[0]].count
    assert "at layers [0, 1]" in card and f"over **{count:,} tokens** of 48 texts" in card  # layers, corpus, count
    assert f"`{local.statistics[NAMES[0]].fingerprint['corpus']}`" in card
    assert 'EditingArguments(layers=[0, 1], stats_repo="me/tiny-stats")' in card
    for name, layer in local.statistics.items():
        assert f"| `{name}` | 64 | {count:,} |" in card and layer.key in card
    assert "hf_secret" not in card
    # the uploaded files are the cache entries, byte for byte
    for layer in local.statistics.values():
        for path in StatisticsCache(local.cache_dir).paths(layer.fingerprint):
            assert (fake_hub.repo("me/tiny-stats") / path.name).read_bytes() == path.read_bytes()


def test_a_fresh_editor_fetches_pushed_statistics_and_edits_identically(local, base, tokenizer, fake_hub, tmp_path):
    push(local)
    model = copy.deepcopy(base)
    editor = repo_editor(model, tokenizer, tmp_path / "fresh", "me/tiny-stats")
    output = editor.edit(subject_final_requests())
    assert editor.statistics.num_collections == 0
    statistics = editor.get_statistics([0, 1])
    assert {name: layer.source for name, layer in statistics.items()} == dict.fromkeys(NAMES, "repo")
    for name, layer in local.statistics.items():
        assert statistics[name].key == layer.key
        assert torch.equal(statistics[name].moment.total, layer.moment.total)
    for mine, theirs in zip(output.deltas, local.output.deltas):
        assert mine.module_name == theirs.module_name and torch.equal(mine.dense(), theirs.dense())
    assert output.metadata["batch"]["statistics"] == local.output.metadata["batch"]["statistics"]
    # JSON first, then only the chosen tensors, from the very commit the JSON came from
    first, second = fake_hub.downloads
    assert first == {
        "repo_id": "me/tiny-stats",
        "repo_type": "dataset",
        "revision": None,
        "allow_patterns": ["*.json"],
    }
    assert second["revision"] == FAKE_COMMIT and sorted(second["allow_patterns"]) == sorted(
        StatisticsCache(local.cache_dir).paths(layer.fingerprint)[0].name for layer in local.statistics.values()
    )
    # the statistics are now in the editor's cache: another editor reads them with the Hub offline
    assert len(list((tmp_path / "fresh").glob("*.safetensors"))) == 2
    fake_hub.offline = True
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        repo_editor(copy.deepcopy(base), tokenizer, tmp_path / "other", "me/tiny-stats").get_statistics([0, 1])


def test_a_local_folder_of_statistics(local, base, tokenizer, fake_hub, tmp_path):
    editor = repo_editor(copy.deepcopy(base), tokenizer, tmp_path / "fresh", local.cache_dir)
    statistics = editor.get_statistics([1])
    assert torch.equal(statistics[NAMES[1]].moment.total, local.statistics[NAMES[1]].moment.total)
    assert fake_hub.downloads == [] and editor.statistics.num_collections == 0
    assert [path.suffix for path in sorted((tmp_path / "fresh").iterdir())] == [".json", ".safetensors"]
    with pytest.raises(FileNotFoundError, match="neither a folder of statistics nor a Hub repository id"):
        repo_editor(copy.deepcopy(base), tokenizer, tmp_path / "other", tmp_path / "missing").get_statistics([1])


@pytest.mark.parametrize("change", ["weights", "dtype", "layers", "architecture"])
def test_statistics_of_another_model_are_refused_before_any_change(local, tokenizer, fake_hub, tmp_path, change):
    push(local)
    overrides = {}
    if change == "weights":
        model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=1)
        expected = (
            r"(?s)`model\.layers\.0\.mlp\.down_proj` in `stats_repo` me/tiny-stats do not match.*weights_digest: '"
        )
    elif change == "dtype":
        model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer)).to(torch.float64)
        expected = r"(?s)do not match the model.*dtype: 'float32' there, 'float64' here"
    elif change == "layers":
        model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
        overrides = {"layers": [1, 2]}
        expected = r"has no statistics of `model\.layers\.2\.mlp\.down_proj` \(it has \['model\.layers\.0"
    else:
        model = build_tiny_causal_lm("qwen2", vocab_size=len(tokenizer))
        expected = r"(?s)do not match the model.*model_type: 'llama' there, 'qwen2' here"
    before = parameters_snapshot(model)
    editor = repo_editor(model, tokenizer, tmp_path / "fresh", "me/tiny-stats", **overrides)
    with pytest.raises(StatisticsMismatchError, match=expected):
        editor.edit(subject_final_requests())
    assert changed_tensors(model, before) == []
    assert editor.statistics.num_collections == 0
    assert [d["allow_patterns"] for d in fake_hub.downloads] == [["*.json"]]  # no tensor was fetched
    assert not list((tmp_path / "fresh").glob("*.safetensors"))


def test_several_matching_statistics_are_chosen_by_the_settings(local, base, tokenizer, fake_hub, tmp_path):
    folder = tmp_path / "folder"
    shutil.copytree(local.cache_dir, folder)
    other = Editor(copy.deepcopy(base), args=tiny_editing_arguments(folder, stats_num_tokens=400),
                   processing_class=tokenizer, stats_dataset=tiny_corpus())  # fmt: skip
    other.get_statistics([0])
    # layer 0 has two matching entries (the tiny corpus's tokens and 400 tokens): the arguments choose
    chosen = repo_editor(copy.deepcopy(base), tokenizer, tmp_path / "a", folder, stats_num_tokens=400)
    assert chosen.get_statistics([0])[NAMES[0]].count == 400
    chosen = repo_editor(copy.deepcopy(base), tokenizer, tmp_path / "b", folder)
    assert chosen.get_statistics([0, 1])[NAMES[0]].count == local.statistics[NAMES[0]].count > 400
    with pytest.raises(StatisticsMismatchError, match=r"holds 2 statistics of `model\.layers\.0\.mlp\.down_proj`"):
        repo_editor(copy.deepcopy(base), tokenizer, tmp_path / "c", folder, stats_num_tokens=100).get_statistics([0])


def test_damaged_statistics_from_a_repository_are_refused(local, base, tokenizer, tmp_path, caplog):
    folder = tmp_path / "folder"
    shutil.copytree(local.cache_dir, folder)
    tensor = StatisticsCache(folder).paths(local.statistics[NAMES[0]].fingerprint)[0]
    data = bytearray(tensor.read_bytes())
    data[-17] ^= 0x01
    tensor.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"fetched from `stats_repo` .* are damaged"):
        repo_editor(copy.deepcopy(base), tokenizer, tmp_path / "fresh", folder).get_statistics([0])
    assert "checksum mismatch" in caplog.text


def test_card_without_layer_information():
    meta = {"fingerprint": {"module": "h.3.mlp.c_proj", "model": "gpt2", "corpus": "tokens:abc", "num_tokens": 9,
                            "format_version": 2, "dtype": "float32", "model_type": "gpt2"}, "count": 9}  # fmt: skip
    card = build_statistics_card([meta])
    assert "at layers ['h.3.mlp.c_proj']" in card and 'EditingArguments(stats_repo="path/to/this/folder")' in card
    json.dumps(card)
