"""Shareable statistics without network: `HfApi.create_repo` / `upload_folder` / `snapshot_download` are replaced by
a fake Hub that stores uploaded folders and serves them back. Statistics pushed from one editor are fetched by a fresh
editor with no local cache and no corpus, whose edit equals one with locally collected statistics; statistics of
another model, dtype, weights or layer are refused before any weight changes, and before any tensor is fetched;
damaged or unsound files are refused before they enter the cache; what `stats_repo` names (a folder or a Hub id) is
decided by clear rules; the commit and checksum of fetched statistics are recorded in the edit metadata."""

import copy
import hashlib
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from memit_hf.editor import Editor
from memit_hf.statistics import (
    STATISTICS_REPO_TYPE,
    StatisticsCache,
    StatisticsMismatchError,
    build_statistics_card,
    entry_name,
    fetch_statistics,
    fingerprint_key,
    push_statistics,
    resolve_stats_repo,
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
    editor = Editor(
        model, args=tiny_editing_arguments(cache_dir), processing_class=tokenizer, stats_dataset=tiny_corpus()
    )
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
    # the metadata records where the statistics came from: the repository, the commit and the file's checksum
    pushed = StatisticsCache(local.cache_dir)
    for name, layer in local.statistics.items():
        collected = local.output.metadata["batch"]["statistics"][name]
        assert collected["source"] == "collected" and collected["repo"] is collected["revision"] is None
        assert collected["sha256"] is None
        fetched = {"source": "repo", "repo": "me/tiny-stats", "revision": FAKE_COMMIT, "sha256": sha256(pushed, layer)}
        assert output.metadata["batch"]["statistics"][name] == {**collected, **fetched}
        assert statistics[name].info() == {**collected, **fetched}
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


def sha256(cache: StatisticsCache, layer) -> str:
    return hashlib.sha256(cache.paths(layer.fingerprint)[0].read_bytes()).hexdigest()


def test_a_local_folder_of_statistics(local, base, tokenizer, fake_hub, tmp_path):
    editor = repo_editor(copy.deepcopy(base), tokenizer, tmp_path / "fresh", local.cache_dir)
    statistics = editor.get_statistics([1])
    assert torch.equal(statistics[NAMES[1]].moment.total, local.statistics[NAMES[1]].moment.total)
    assert fake_hub.downloads == [] and editor.statistics.num_collections == 0
    assert [path.suffix for path in sorted((tmp_path / "fresh").iterdir())] == [".json", ".safetensors"]
    # a folder is recorded by its name only (no local path in shared metadata), without a commit
    info = statistics[NAMES[1]].info()
    layer = local.statistics[NAMES[1]]
    assert info == {
        **layer.info(),
        "source": "repo",
        "repo": local.cache_dir.name,
        "revision": None,
        "sha256": sha256(StatisticsCache(local.cache_dir), layer),
    }
    assert str(local.cache_dir.parent) not in json.dumps(info)
    with pytest.raises(FileNotFoundError, match=r"is taken for a local path \(it starts with `/`\) but it is no such"):
        repo_editor(copy.deepcopy(base), tokenizer, tmp_path / "other", tmp_path / "missing").get_statistics([1])


def test_a_pinned_revision_is_fetched_and_recorded(local, base, tokenizer, fake_hub, tmp_path):
    push(local)
    editor = repo_editor(
        copy.deepcopy(base), tokenizer, tmp_path / "fresh", "me/tiny-stats", stats_repo_revision=FAKE_COMMIT
    )
    # fetched by `fingerprints` (no tensor loaded), then loaded from the cache by `get`: the provenance follows
    keys = editor.statistics.fingerprints([0, 1])
    assert [fingerprint_key(fingerprint) for fingerprint in keys.values()] == [
        local.statistics[name].key for name in NAMES
    ]
    statistics = editor.get_statistics([0, 1])
    assert [download["revision"] for download in fake_hub.downloads] == [FAKE_COMMIT, FAKE_COMMIT]
    assert {name: layer.info()["revision"] for name, layer in statistics.items()} == dict.fromkeys(NAMES, FAKE_COMMIT)
    # what the edits record reaches the saved editor state
    editor.edit(subject_final_requests())
    editor.save_state(tmp_path / "state", save_adapters=False)
    manifest = json.loads((tmp_path / "state" / "editor_state.json").read_text())
    (batch,) = manifest["batches"]
    recorded = batch["metadata"]["statistics"]
    assert {
        name: (info["source"], info["repo"], info["revision"]) for name, info in recorded.items()
    } == dict.fromkeys(NAMES, ("repo", "me/tiny-stats", FAKE_COMMIT))
    assert recorded[NAMES[0]]["sha256"] == sha256(StatisticsCache(local.cache_dir), local.statistics[NAMES[0]])


def test_statistics_from_the_cache_or_collected_record_their_source(local, base, tokenizer, tmp_path):
    editor = Editor(
        copy.deepcopy(base),
        args=tiny_editing_arguments(local.cache_dir),
        processing_class=tokenizer,
        stats_dataset=tiny_corpus(),
    )
    info = editor.get_statistics([0])[NAMES[0]].info()
    assert info == {**local.statistics[NAMES[0]].info(), "source": "cache"}
    assert list(info) == ["key", "corpus", "num_tokens", "count", "source", "repo", "revision", "sha256"]
    assert local.statistics[NAMES[0]].info()["source"] == "collected"


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
    other = Editor(
        copy.deepcopy(base),
        args=tiny_editing_arguments(folder, stats_num_tokens=400),
        processing_class=tokenizer,
        stats_dataset=tiny_corpus(),
    )
    other.get_statistics([0])
    # layer 0 has two matching entries (the tiny corpus's tokens and 400 tokens): the arguments choose
    chosen = repo_editor(copy.deepcopy(base), tokenizer, tmp_path / "a", folder, stats_num_tokens=400)
    assert chosen.get_statistics([0])[NAMES[0]].count == 400
    chosen = repo_editor(copy.deepcopy(base), tokenizer, tmp_path / "b", folder)
    assert chosen.get_statistics([0, 1])[NAMES[0]].count == local.statistics[NAMES[0]].count > 400
    with pytest.raises(StatisticsMismatchError, match=r"holds 2 statistics of `model\.layers\.0\.mlp\.down_proj`"):
        repo_editor(copy.deepcopy(base), tokenizer, tmp_path / "c", folder, stats_num_tokens=100).get_statistics([0])


def rewrite(folder: Path, fingerprint: dict, change: str) -> str:
    """Change the statistics of `fingerprint` in `folder` as `change` says, keeping the JSON's checksum right (except
    for `"checksum"`); returns the safetensors file's name."""
    tensor_path, meta_path = StatisticsCache(folder).paths(fingerprint)
    tensors = load_file(str(tensor_path))
    total, count = tensors["total"].clone(), int(tensors["count"].item())
    meta = json.loads(meta_path.read_text())
    if change == "checksum":
        data = bytearray(tensor_path.read_bytes())
        data[-17] ^= 0x01
        tensor_path.write_bytes(bytes(data))
        return tensor_path.name
    if change == "json-count":
        meta["count"] = count + 1
    elif change == "zero-count":
        count = meta["count"] = 0
    elif change == "over-budget":
        count = meta["count"] = fingerprint["num_tokens"] + 1
    elif change == "float32":
        total = total.float()
    elif change == "side":
        total = total[:32, :32].contiguous()
    elif change == "asymmetric":
        total[0, 1] += 1.0
    elif change == "nan":
        total[2, 2] = float("nan")
    elif change == "negative-diagonal":
        total[3, 3] = -1.0
    save_file({"total": total, "count": torch.tensor([count])}, str(tensor_path))
    meta["sha256"] = hashlib.sha256(tensor_path.read_bytes()).hexdigest()
    meta_path.write_text(json.dumps(meta))
    return tensor_path.name


UNSOUND = {
    "checksum": r"has SHA-256 [0-9a-f]{64}, but \S+\.json records [0-9a-f]{64}: the file is damaged",
    "json-count": r"`count` is (\d+) in the tensors but \d+ in the JSON",
    "zero-count": r"`count` is 0 \(it must be positive\)",
    "over-budget": r"`count` 100001 exceeds the fingerprint's token budget `num_tokens` 100000",
    "float32": r"`total` is float32 \(it must be float64\)",
    "side": r"`total` is 32 x 32 but the module's input has `d_in` 64",
    "asymmetric": r"`total` is not symmetric \(largest \|total - total\^T\| 1,",
    "nan": r"`total` holds non-finite values",
    "negative-diagonal": r"`total` has a negative diagonal entry \(-1 at index 3\)",
}


@pytest.mark.parametrize("change", list(UNSOUND))
def test_damaged_or_unsound_statistics_from_a_folder_are_refused(local, base, tokenizer, tmp_path, change):
    folder = tmp_path / "folder"
    shutil.copytree(local.cache_dir, folder)
    name = rewrite(folder, local.statistics[NAMES[0]].fingerprint, change)
    model = copy.deepcopy(base)
    before = parameters_snapshot(model)
    editor = repo_editor(model, tokenizer, tmp_path / "fresh", folder)
    with pytest.raises(StatisticsMismatchError, match=rf"`stats_repo` {folder}: {name} .*{UNSOUND[change]}"):
        editor.edit(subject_final_requests())
    assert changed_tensors(model, before) == [] and editor.statistics.num_collections == 0
    assert not list((tmp_path / "fresh").glob(f"{Path(name).stem}.*"))  # never put into the cache


def test_unsound_statistics_from_the_hub_are_refused(local, base, tokenizer, fake_hub, tmp_path):
    push(local)
    fingerprint = local.statistics[NAMES[1]].fingerprint
    name = rewrite(fake_hub.repo("me/tiny-stats"), fingerprint, "asymmetric")
    editor = repo_editor(copy.deepcopy(base), tokenizer, tmp_path / "fresh", "me/tiny-stats")
    with pytest.raises(StatisticsMismatchError, match=rf"`stats_repo` me/tiny-stats: {name} holds unsound statistics"):
        editor.get_statistics([0, 1])
    assert not StatisticsCache(tmp_path / "fresh").paths(fingerprint)[0].exists()


def test_unsound_statistics_of_gpt2_are_measured_against_the_transposed_weight(tokenizer, tmp_path):
    """GPT-2's `Conv1D` stores its weight as (in, out): `d_in` is its first dimension."""
    model = build_tiny_causal_lm("gpt2", vocab_size=len(tokenizer))
    editor = Editor(
        copy.deepcopy(model),
        args=tiny_editing_arguments(tmp_path / "gpt2", stats_num_tokens=300),
        processing_class=tokenizer,
        stats_dataset=tiny_corpus(),
    )
    layer = editor.get_statistics([0])["transformer.h.0.mlp.c_proj"]
    module = model.get_submodule("transformer.h.0.mlp.c_proj")
    assert layer.moment.total.shape[0] == module.weight.shape[0] != module.weight.shape[1]
    again = repo_editor(
        copy.deepcopy(model), tokenizer, tmp_path / "fresh", tmp_path / "gpt2", layers=[0], stats_num_tokens=300
    )
    assert torch.equal(again.get_statistics([0])["transformer.h.0.mlp.c_proj"].moment.total, layer.moment.total)
    rewrite(tmp_path / "gpt2", layer.fingerprint, "side")
    other = repo_editor(copy.deepcopy(model), tokenizer, tmp_path / "other", tmp_path / "gpt2", layers=[0])
    with pytest.raises(StatisticsMismatchError, match=r"`total` is 32 x 32 but the module's input has `d_in` 128"):
        other.get_statistics([0])


# ------------------------------------------------------------------------------------- what `stats_repo` names
@pytest.mark.parametrize(
    "value, reason",
    [
        ("/no/such/memit-stats", "it starts with `/`"),
        ("./stats", "it starts with `./`"),
        ("../stats", "it starts with `../`"),
        ("~/no-such-memit-stats", "it starts with `~`"),
        ("stats/", "it ends with a path separator"),
        ("me\\stats", "it contains a backslash"),
        ("me/tiny/stats", "it has more than one `/`"),
        ("local/stats", "`local` is a local folder"),
    ],
)
def test_a_stats_repo_that_looks_like_a_path_must_exist(fake_hub, tmp_path, monkeypatch, value, reason):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local").mkdir()
    message = (
        rf"`stats_repo` {re.escape(repr(value))} is taken for a local path \({re.escape(reason)}\) but it is no such "
        r"folder\. Give an existing folder of statistics, or a Hub repository id: a Hub repository id is `name` or "
        r"`namespace/name`"
    )
    with pytest.raises(FileNotFoundError, match=message):
        resolve_stats_repo(value)
    with pytest.raises(FileNotFoundError, match="is taken for a local path"):
        fetch_statistics(value, {}, StatisticsCache(tmp_path / "cache"))
    assert fake_hub.downloads == []  # never sent to the Hub as a repository id


def test_what_stats_repo_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "stats").mkdir()
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "stats").mkdir()
    (tmp_path / "a-file").write_text("")
    assert resolve_stats_repo("stats") == Path("stats")
    assert resolve_stats_repo("stats/") == Path("stats")
    assert resolve_stats_repo("local/stats") == Path("local/stats")
    assert resolve_stats_repo(tmp_path / "stats") == tmp_path / "stats"
    for repo_id in ("me/tiny-stats", "gpt2-stats", "Org_1/name.v2"):
        assert resolve_stats_repo(repo_id) == repo_id
    with pytest.raises(FileNotFoundError, match=r"\(it is a path object\) but it is no such folder"):
        resolve_stats_repo(Path("me/tiny-stats"))
    with pytest.raises(FileNotFoundError, match=r"`stats_repo` './a-file' .* but it is a file, not a folder"):
        resolve_stats_repo("./a-file")
    for invalid in ("me/tiny stats", "a--b", "me/x.git", "-me/x", "me/x:1"):
        with pytest.raises(ValueError, match=rf"`stats_repo` '{invalid}' is neither an existing folder nor a valid"):
            resolve_stats_repo(invalid)
    with pytest.raises(ValueError, match=r"`stats_repo` is empty"):
        resolve_stats_repo("")
    with pytest.raises(
        ValueError, match=r"`stats_repo` 'me/tiny stats' is neither an existing folder nor a valid Hub"
    ):
        resolve_stats_repo("me/tiny stats")


def test_card_without_layer_information():
    meta = {
        "fingerprint": {
            "module": "h.3.mlp.c_proj",
            "model": "gpt2",
            "corpus": "tokens:abc",
            "num_tokens": 9,
            "format_version": 2,
            "dtype": "float32",
            "model_type": "gpt2",
        },
        "count": 9,
    }
    card = build_statistics_card([meta])
    assert "at layers ['h.3.mlp.c_proj']" in card and 'EditingArguments(stats_repo="path/to/this/folder")' in card
    # the table shows what is unknown as `?` and still names the file and the key
    fingerprint = meta["fingerprint"]
    row = (
        f"| ? | `h.3.mlp.c_proj` | ? | 9 | `{entry_name(fingerprint)}.safetensors` "
        f"| `{fingerprint_key(fingerprint)}` |"
    )
    assert row in card.splitlines()
    assert "(gpt2, float32, revision unknown)" in card and "over **9 tokens** of tokens:abc" in card
    assert "--layers" not in card and "layers=" not in card
