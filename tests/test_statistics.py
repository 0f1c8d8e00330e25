"""Tests of `memit_hf.statistics`: second moments against an explicit sum, one pass for several modules, the disk
cache (reuse, damage and content checks, locked writes from several processes, stale temporary files, permissions),
the fingerprint (every upstream weight, the dtype, the corpus), the provider, token pieces, corpus inputs and the
model-sampled corpus."""

import copy
import errno
import hashlib
import json
import multiprocessing
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import torch
from datasets import Dataset
from safetensors.torch import save_file

from memit_hf.architectures import get_layout
from memit_hf.editor import Editor
from memit_hf.files import host_name
from memit_hf.statistics import (
    PROVENANCE_FIELDS,
    STATS_FORMAT_VERSION,
    CollectionProgress,
    LayerStatistics,
    SecondMoment,
    StatisticsCache,
    StatisticsCheckpoint,
    StatisticsProvider,
    add_gram,
    collect_second_moments,
    corpus_texts,
    entry_lock,
    fingerprint_key,
    legacy_fingerprint_key,
    model_identity,
    read_second_moment,
    remove_stale_temporary_files,
    sample_corpus,
    statistics_fingerprint,
    temporary_owner,
    temporary_path,
    tensor_digest,
    token_pieces,
    tokenizer_digest,
    upstream_parameters,
    weights_digest,
)
from memit_hf.statistics.collection import pack_batches
from tests.testing_utils import (
    build_tiny_causal_lm,
    build_tiny_tokenizer,
    subject_final_requests,
    tiny_corpus,
    tiny_editing_arguments,
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer(add_bos=True)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


def explicit_moments(model, modules, pieces):
    """Each piece alone, unpadded, through a plain forward; `sum k k^T` in float64 from hooks."""
    totals = dict.fromkeys(modules, 0)
    count = 0
    for piece in pieces:
        seen = {}
        hooks = [
            model.get_submodule(name).register_forward_pre_hook(
                lambda m, a, name=name, seen=seen: seen.__setitem__(name, a[0])
            )
            for name in modules
        ]
        with torch.no_grad():
            model(input_ids=torch.tensor([piece]))
        for hook in hooks:
            hook.remove()
        for name in modules:
            keys = seen[name][0].double()
            totals[name] = totals[name] + keys.T @ keys
        count += len(piece)
    return totals, count


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "gpt_neox"])
def test_second_moments_equal_explicit_sum(model_type, tokenizer):
    model = build_tiny_causal_lm(model_type, vocab_size=len(tokenizer))
    layout = get_layout(model)
    modules = [layout.edit_name(0), layout.edit_name(2)]
    pieces = token_pieces(tokenizer, tiny_corpus(), num_tokens=600, max_length=24, seed=0)
    assert len({len(p) for p in pieces}) > 1  # padding is exercised
    moments = collect_second_moments(model, tokenizer, modules, pieces, batch_tokens=100, show_progress=False)
    expected, count = explicit_moments(model, modules, pieces)
    assert count == 600
    for name in modules:
        moment = moments[name]
        assert isinstance(moment, SecondMoment) and moment.count == count
        assert moment.total.dtype == torch.float64
        assert relative_error(moment.total, expected[name]) < 1e-6
        torch.testing.assert_close(moment.mean(), expected[name] / count, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(moment.total, moment.total.T, rtol=0, atol=1e-9 * float(moment.total.abs().max()))
        assert torch.linalg.eigvalsh(moment.mean()).min() > -1e-9


def test_one_pass_equals_separate_passes_and_stops_early(tokenizer):
    model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    layout = get_layout(model)
    names = [layout.edit_name(layer) for layer in (0, 1, 2)]
    pieces = token_pieces(tokenizer, tiny_corpus(), num_tokens=400, max_length=32, seed=1)
    calls = []
    hook = model.lm_head.register_forward_hook(lambda *a: calls.append("head"))
    after = model.model.layers[1].mlp.down_proj.register_forward_hook(lambda *a: calls.append("layer1"))
    together = collect_second_moments(model, tokenizer, [names[1], names[0]], pieces, 256, show_progress=False)
    assert calls == []  # the pass stops right before the last edited module: neither it nor the head ran
    hook.remove()
    after.remove()
    assert list(together) == [names[0], names[1]]  # sorted in execution order
    for name in names[:2]:
        alone = collect_second_moments(model, tokenizer, [name], pieces, 256, show_progress=False)[name]
        torch.testing.assert_close(together[name].total, alone.total, rtol=1e-12, atol=0)
        assert together[name].count == alone.count == 400
    # Different batching changes only float rounding.
    rebatched = collect_second_moments(model, tokenizer, names, pieces, 64, show_progress=False)
    for name in names[:2]:
        assert relative_error(rebatched[name].total, together[name].total) < 1e-6


@pytest.mark.parametrize("dim", [7, 16, 33])
def test_add_gram_is_the_full_product(dim):
    keys = torch.randn(50, dim, generator=torch.Generator().manual_seed(dim))
    total = torch.full((dim, dim), 2.0, dtype=torch.float64)
    add_gram(total, keys)
    expected = 2.0 + keys.double().T @ keys.double()
    assert relative_error(total, expected) < 1e-6
    torch.testing.assert_close(total, total.T, rtol=0, atol=1e-6 * float(total.abs().max()))


def test_batches_respect_the_token_budget():
    pieces = [[1] * n for n in (5, 9, 3, 9, 1, 7, 2, 8, 4, 6)]
    batches = pack_batches(pieces, batch_tokens=20)
    assert sorted(map(len, (p for b in batches for p in b))) == sorted(map(len, pieces))
    for batch in batches:
        assert max(map(len, batch)) * len(batch) <= 20
    assert pack_batches([[1] * 30], batch_tokens=20) == [[[1] * 30]]


def test_token_pieces_budget_and_max_length(tokenizer):
    texts = tiny_corpus()
    pieces = token_pieces(tokenizer, texts, num_tokens=500, max_length=16, seed=0)
    assert sum(map(len, pieces)) == 500
    assert all(1 <= len(p) <= 16 for p in pieces)
    # Every piece is a contiguous slice of some text's encoding.
    encodings = [tokenizer(t)["input_ids"] for t in texts]
    for piece in pieces[:20]:
        assert any(enc[i : i + len(piece)] == piece for enc in encodings for i in range(0, len(enc), 16)), piece
    # Seeded order: the same seed gives the same pieces, another seed another order.
    assert token_pieces(tokenizer, texts, 500, 16, seed=0) == pieces
    assert token_pieces(tokenizer, texts, 500, 16, seed=1) != pieces
    # A budget larger than the corpus takes every token once (one-token tails of long texts are dropped).
    total = sum(len(enc) for enc in encodings)
    everything = token_pieces(tokenizer, texts, 10**9, 16, seed=0)
    tails = sum(1 for enc in encodings if len(enc) > 16 and len(enc) % 16 == 1)
    assert sum(map(len, everything)) == total - tails
    assert all(len(p) <= 16 for p in everything)


def test_corpus_texts_accepts_every_input(tmp_path):
    assert corpus_texts(["a b", "  ", "", " c "]) == ["a b", "c"]
    assert corpus_texts(Dataset.from_dict({"text": ["x y", "", "z"], "id": [1, 2, 3]})) == ["x y", "z"]
    first = tmp_path / "one.txt"
    first.write_text("First doc line one\nline two\n\nSecond doc\n\n\n", encoding="utf-8")
    second = tmp_path / "two.txt"
    second.write_text("Third doc", encoding="utf-8")
    assert corpus_texts(str(first)) == ["First doc line one\nline two", "Second doc"]
    assert corpus_texts(first) == ["First doc line one\nline two", "Second doc"]
    assert corpus_texts([first, str(second), "inline text"]) == [
        "First doc line one\nline two",
        "Second doc",
        "Third doc",
        "inline text",
    ]


def test_corpus_texts_errors(tmp_path):
    with pytest.raises(ValueError, match=r"`stats_dataset` must have a `text` column, found \['content'\]"):
        corpus_texts(Dataset.from_dict({"content": ["a"]}))
    with pytest.raises(ValueError, match=r"`stats_dataset` items must be strings or paths, got int"):
        corpus_texts(["a", 3])
    with pytest.raises(ValueError, match=r"`stats_dataset` holds no non-empty text"):
        corpus_texts(["", "   "])
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="holds no non-empty text"):
        corpus_texts([empty])


def test_sample_corpus_is_seeded(tokenizer):
    model = build_tiny_causal_lm("gpt2", vocab_size=len(tokenizer))
    rng = torch.random.get_rng_state()
    first = sample_corpus(model, tokenizer, num_texts=3, length=6, seed=0)
    assert torch.equal(torch.random.get_rng_state(), rng)  # the global generator is untouched
    assert len(first) == 3 and all(isinstance(t, str) and t for t in first)
    assert first[0].startswith("The") and first[1].startswith("In") and first[2].startswith("A")
    assert sample_corpus(model, tokenizer, num_texts=3, length=6, seed=0) == first
    assert sample_corpus(model, tokenizer, num_texts=3, length=6, seed=1) != first
    for text in first:  # starter plus exactly `length` sampled tokens
        assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) >= 6
    many = sample_corpus(model, tokenizer, num_texts=34, length=2, seed=0)
    assert len(many) == 34


# ------------------------------------------------------------------------------------------------- the disk cache
@pytest.fixture
def model(tokenizer):
    return build_tiny_causal_lm("llama", vocab_size=len(tokenizer))


def make_editor(model, tokenizer, cache_dir, **overrides):
    args = tiny_editing_arguments(cache_dir, stats_num_tokens=800, stats_max_length=64, stats_batch_tokens=256)
    for key, value in overrides.items():
        setattr(args, key, value)
    return Editor(model, args=args, processing_class=tokenizer, stats_dataset=tiny_corpus())


def sources(statistics) -> dict[str, str]:
    return {name: layer.source for name, layer in statistics.items()}


def test_cache_is_written_and_reused(model, tokenizer, tmp_path):
    editor = make_editor(model, tokenizer, tmp_path)
    first = editor.get_statistics([0, 1])
    names = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert sources(first) == dict.fromkeys(names, "collected") and editor.statistics.num_collections == 1
    assert len(list(tmp_path.glob("*.safetensors"))) == 2 and len(list(tmp_path.glob("*.json"))) == 2
    assert not list(tmp_path.glob("*.tmp"))
    assert first["model.layers.0.mlp.down_proj"].count == 800
    assert editor.get_statistics([1])[names[1]] is first[names[1]]  # from memory
    again = make_editor(model, tokenizer, tmp_path)
    second = again.get_statistics([0, 1])
    assert sources(second) == dict.fromkeys(names, "cache") and again.statistics.num_collections == 0
    for name, layer in first.items():
        assert torch.equal(second[name].moment.total, layer.moment.total) and second[name].count == layer.count
        assert second[name].key == layer.key
    # A subset of the cached layers is served from the cache as well.
    subset = make_editor(model, tokenizer, tmp_path).get_statistics([1])
    assert torch.equal(subset[names[1]].moment.total, first[names[1]].moment.total)


def test_cache_is_found_wherever_the_model_and_tokenizer_were_loaded_from(model, tokenizer, tmp_path):
    """The same weights and tokenizer loaded from another place (a Hub id, a local copy, a converted GGUF file) find
    the statistics: the key leaves out the load locations, which the stored fingerprint still records."""
    first = make_editor(model, tokenizer, tmp_path).get_statistics([1])["model.layers.1.mlp.down_proj"]
    moved_tokenizer = copy.deepcopy(tokenizer)
    moved_tokenizer.name_or_path = "/somewhere/else/tokenizer"
    moved_model = copy.deepcopy(model)
    moved_model.config._name_or_path = "/somewhere/else/model"
    again = make_editor(moved_model, moved_tokenizer, tmp_path)
    found = again.get_statistics([1])["model.layers.1.mlp.down_proj"]
    assert found.source == "cache" and again.statistics.num_collections == 0
    assert torch.equal(found.moment.total, first.moment.total) and found.key == first.key
    differing = {name for name in first.fingerprint if first.fingerprint[name] != found.fingerprint[name]}
    assert differing == {"model", "tokenizer"} and differing <= set(PROVENANCE_FIELDS)
    assert legacy_fingerprint_key(found.fingerprint) != legacy_fingerprint_key(first.fingerprint)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1  # no second entry
    # What does count still misses: another weight upstream of the module.
    changed = copy.deepcopy(moved_model)
    with torch.no_grad():
        changed.model.layers[0].mlp.up_proj.weight[0, 0] += 1.0
    other = make_editor(changed, moved_tokenizer, tmp_path)
    assert other.get_statistics([1])["model.layers.1.mlp.down_proj"].source == "collected"
    assert other.statistics.num_collections == 1


def test_cache_entry_of_the_legacy_key_is_adopted(model, tokenizer, tmp_path):
    """An entry an earlier version wrote under the key that hashed the load locations too is found, given its
    current name (the legacy files stay) with its spectrum, and verified like any entry."""
    editor = make_editor(model, tokenizer, tmp_path)
    layer = editor.get_statistics([1])["model.layers.1.mlp.down_proj"]
    eigenvalues, _ = layer.spectrum()
    cache = StatisticsCache(tmp_path)
    current, legacy = cache.paths(layer.fingerprint), cache.legacy_paths(layer.fingerprint)
    assert current[0].name != legacy[0].name
    assert legacy[0].name.endswith(legacy_fingerprint_key(layer.fingerprint) + ".safetensors")
    for source, target in zip(current, legacy):
        os.replace(source, target)
    spectrum = cache.spectrum_path(layer.fingerprint)
    os.replace(spectrum, legacy[0].with_name(f"{legacy[0].stem}.spectrum.safetensors"))
    again = make_editor(model, tokenizer, tmp_path)
    found = again.get_statistics([1])["model.layers.1.mlp.down_proj"]
    assert found.source == "cache" and again.statistics.num_collections == 0
    assert torch.equal(found.moment.total, layer.moment.total) and found.key == layer.key
    assert all(path.exists() for path in current + legacy)
    assert torch.equal(cache.load_spectrum(layer.fingerprint)[0], eigenvalues)
    # A damaged legacy entry is adopted, refused on load like any damaged entry, and recomputed.
    for path in current:
        path.unlink()
    damage_flip(legacy[0])
    fresh = make_editor(model, tokenizer, tmp_path)
    assert fresh.get_statistics([1])["model.layers.1.mlp.down_proj"].source == "collected"


def test_model_sampled_corpus_is_identified_by_the_tokenizer_content(model, tokenizer, tmp_path):
    """Without a corpus the model samples its own text, which the tokenizer shapes: its content digest, not its
    path, is in the corpus identity."""
    settings = tiny_editing_arguments(tmp_path).statistics_settings()
    layout = get_layout(model)
    sampled = StatisticsProvider(model, tokenizer, layout, settings, None).corpus_id()
    assert sampled.startswith("model-samples:") and sampled.endswith(":" + tokenizer_digest(tokenizer))
    moved = copy.deepcopy(tokenizer)
    moved.name_or_path = "/somewhere/else"
    assert tokenizer_digest(moved) == tokenizer_digest(tokenizer)
    assert StatisticsProvider(model, moved, layout, settings, None).corpus_id() == sampled
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["<extra>"])
    assert tokenizer_digest(other) != tokenizer_digest(tokenizer)
    assert StatisticsProvider(model, other, layout, settings, None).corpus_id() != sampled
    special = copy.deepcopy(tokenizer)
    special.eos_token = "<s>"
    assert tokenizer_digest(special) != tokenizer_digest(tokenizer)


def damage_truncate(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def damage_flip(path: Path):
    data = bytearray(path.read_bytes())
    data[len(data) - 17] ^= 0x01  # one bit inside the tensor data
    path.write_bytes(bytes(data))


def damage_meta(path: Path):
    meta_path = path.with_suffix(".json")
    meta_path.write_text(meta_path.read_text()[:-10])


def damage_count(path: Path):
    """The JSON's count changed (its checksum of the tensor file still right)."""
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta["count"] -= 1
    meta_path.write_text(json.dumps(meta))


def damage_symmetry(path: Path):
    """One entry of the sum changed and the checksum updated: only a content check sees it."""
    read = read_second_moment(path)
    total = read.total.clone()
    total[5, 2] += 1.0
    save_file({"total": total, "count": torch.tensor([read.count])}, str(path))
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    meta_path.write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "damage",
    [damage_truncate, damage_flip, damage_meta, damage_count, damage_symmetry],
    ids=["truncated", "flipped", "meta", "count", "asymmetric"],
)
def test_damaged_cache_is_detected_and_recomputed(model, tokenizer, tmp_path, caplog, damage):
    editor = make_editor(model, tokenizer, tmp_path)
    original = editor.get_statistics([0, 1])
    name = "model.layers.1.mlp.down_proj"
    cache = StatisticsCache(tmp_path)
    fingerprint = original[name].fingerprint
    tensor_path, _ = cache.paths(fingerprint)
    assert tensor_path.exists()
    damage(tensor_path)
    with caplog.at_level("WARNING", logger="memit_hf.statistics.cache"):
        assert cache.load(fingerprint) is None
    assert "Ignoring damaged statistics cache" in caplog.text
    recomputed = make_editor(model, tokenizer, tmp_path).get_statistics([0, 1])
    # only the damaged module is recomputed
    assert sources(recomputed) == {"model.layers.0.mlp.down_proj": "cache", name: "collected"}
    for key, layer in original.items():
        assert torch.equal(recomputed[key].moment.total, layer.moment.total) and recomputed[key].count == layer.count
    # The cache is repaired.
    repaired = cache.load(fingerprint)
    assert repaired is not None and torch.equal(repaired.total, original[name].moment.total)


def test_fingerprint_tracks_what_determines_the_statistics(model, tokenizer, tmp_path):
    editor = make_editor(model, tokenizer, tmp_path)
    layout = get_layout(model)
    corpus_id = editor.statistics.corpus_id()
    cache = StatisticsCache(tmp_path)

    def fingerprint(of=model, layer=0, corpus=corpus_id, args=editor.args):
        return statistics_fingerprint(of, tokenizer, layout, layer, corpus, args.statistics_settings())

    base = fingerprint()
    for field, value in [("stats_num_tokens", 801), ("stats_max_length", 32), ("seed", 1)]:
        changed = make_editor(model, tokenizer, tmp_path, **{field: value})
        other = fingerprint(args=changed.args)
        assert other != base, field
        assert cache.paths(other) != cache.paths(base), field
    assert fingerprint(layer=1) != base
    assert fingerprint(corpus="tokens:other") != base
    other_model = build_tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=1)
    assert fingerprint(of=other_model) != base
    assert fingerprint(of=build_tiny_causal_lm("llama", vocab_size=len(tokenizer)).to(torch.float64)) != base
    # The batch size does not change the statistics and is not part of the fingerprint.
    batched = make_editor(model, tokenizer, tmp_path, stats_batch_tokens=512)
    assert fingerprint(args=batched.args) == base
    # End to end: a different token budget is recomputed, into new files.
    editor.get_statistics([0])
    more = make_editor(model, tokenizer, tmp_path, stats_num_tokens=600)
    assert more.get_statistics([0])["model.layers.0.mlp.down_proj"].count == 600
    assert more.statistics.num_collections == 1
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    # A different corpus (its token pieces differ) is another cache entry too.
    other_corpus = Editor(model, args=editor.args, processing_class=tokenizer, stats_dataset=tiny_corpus()[:40])
    assert other_corpus.statistics.corpus_id() != corpus_id
    other_corpus.get_statistics([0])
    assert other_corpus.statistics.num_collections == 1


@pytest.mark.parametrize("where", ["mlp", "attention", "norm", "embeddings"])
def test_fingerprint_changes_when_one_upstream_weight_changes(model, tokenizer, tmp_path, where):
    """A fine-tune saved at the same path is not handed the original's statistics: changing one element of any
    weight the edited module's input depends on misses the cache."""
    layout = get_layout(model)
    editor = make_editor(model, tokenizer, tmp_path)
    before = editor.get_statistics([1])["model.layers.1.mlp.down_proj"]
    parameter = {
        "mlp": model.model.layers[0].mlp.down_proj.weight,
        "attention": model.model.layers[1].self_attn.q_proj.weight,
        "norm": model.model.layers[1].post_attention_layernorm.weight,
        "embeddings": model.model.embed_tokens.weight,
    }[where]
    with torch.no_grad():
        parameter.view(-1)[7] += 1e-3  # one element, off the digest's sampling stride
    after = statistics_fingerprint(
        model, tokenizer, layout, 1, editor.statistics.corpus_id(), editor.statistics.settings
    )
    assert after["weights_digest"] != before.fingerprint["weights_digest"]
    again = make_editor(model, tokenizer, tmp_path).get_statistics([1])["model.layers.1.mlp.down_proj"]
    assert again.source == "collected"


def test_fingerprints_with_a_memo_digest_each_tensor_once_and_see_in_place_writes(model, tokenizer, tmp_path):
    """The digest memo (one per statistics provider) digests the embeddings once for every layer's fingerprint, not
    once per layer, and still sees an in-place write and a new tensor at a freed tensor's address."""
    layout = get_layout(model)
    settings = make_editor(model, tokenizer, tmp_path).statistics.settings
    memo = {}
    embedding = model.model.embed_tokens.weight
    assert model_identity(model, memo) == model_identity(model)
    entry = memo[id(embedding)]  # the embeddings' digest, taken by the model's identity
    fingerprints = [statistics_fingerprint(model, tokenizer, layout, layer, "c", settings, memo) for layer in (0, 1)]
    assert fingerprints == [statistics_fingerprint(model, tokenizer, layout, layer, "c", settings) for layer in (0, 1)]
    assert memo[id(embedding)] is entry  # reused by both layers' identity and weights digests, not taken again
    assert len(memo) == len(upstream_parameters(model, layout, 1))  # every upstream tensor digested once
    assert fingerprints[0]["embedding_digest"] == tensor_digest(embedding)
    with torch.no_grad():
        embedding.view(-1)[7] += 1e-3
    changed = statistics_fingerprint(model, tokenizer, layout, 0, "c", settings, memo)
    assert changed["embedding_digest"] == tensor_digest(embedding) != fingerprints[0]["embedding_digest"]
    assert changed["weights_digest"] != fingerprints[0]["weights_digest"]
    for seed in range(20):  # freed tensors' addresses are reused: a new tensor is never taken for the old one
        values = torch.randn(64, 64, generator=torch.Generator().manual_seed(seed))
        assert weights_digest([("w", values)], memo) == weights_digest([("w", values)])
        del values


def fine_tune_step(model, tokenizer):
    """One SGD step of the language-modelling loss on a corpus text, the embeddings frozen: every weight of the
    decoder blocks moves a little, in place (the model's name, size and embeddings stay the same)."""
    ids = torch.tensor([tokenizer(tiny_corpus()[0])["input_ids"]])
    model(input_ids=ids, labels=ids).loss.backward()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.startswith("model.layers."):
                parameter.sub_(0.5 * parameter.grad)
            parameter.grad = None


def test_statistics_of_a_fine_tuned_model_are_collected_again(model, tokenizer, tmp_path):
    """Statistics cached for a model are never reused after a fine-tune changed its upstream weights in place: an
    Editor on the same cache directory collects them again, from the fine-tuned weights, and edits with those."""
    names = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    original = make_editor(model, tokenizer, tmp_path).get_statistics([0, 1])
    assert sources(original) == dict.fromkeys(names, "collected")
    fine_tune_step(model, tokenizer)
    fine_tuned = copy.deepcopy(model)
    editor = make_editor(model, tokenizer, tmp_path)
    output = editor.edit(subject_final_requests())
    assert editor.statistics.num_collections == 1
    used = editor.get_statistics([0, 1])
    assert sources(used) == dict.fromkeys(names, "collected")
    expected = make_editor(fine_tuned, tokenizer, tmp_path / "fresh").get_statistics([0, 1])
    for name in names:
        assert used[name].key == expected[name].key != original[name].key
        assert output.metadata["batch"]["statistics"][name]["key"] == used[name].key
        assert torch.equal(used[name].moment.total, expected[name].moment.total)
        assert not torch.equal(used[name].moment.total, original[name].moment.total)
    assert len(list(tmp_path.glob("*.safetensors"))) == 4  # the original entries are kept, next to the new ones


def test_the_same_editor_collects_again_after_a_fine_tune(model, tokenizer, tmp_path):
    editor = make_editor(model, tokenizer, tmp_path)
    before = editor.get_statistics([1])["model.layers.1.mlp.down_proj"]
    fine_tune_step(model, tokenizer)
    after = editor.get_statistics([1])["model.layers.1.mlp.down_proj"]
    assert after.source == "collected" and after.key != before.key and editor.statistics.num_collections == 2


def test_fingerprint_ignores_weights_downstream_of_the_module(model, tokenizer):
    """Blocks after the edited layer and an untied LM head do not change the module's input."""
    layout = get_layout(model)
    names = {name for name, _ in upstream_parameters(model, layout, 0)}
    assert "model.layers.0.mlp.down_proj.weight" in names and "model.embed_tokens.weight" in names
    assert not any(name.startswith("model.layers.1.") for name in names)
    args = tiny_editing_arguments("unused").statistics_settings()
    before = statistics_fingerprint(model, tokenizer, layout, 0, "c", args)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.add_(1.0)
        if model.lm_head.weight is not model.model.embed_tokens.weight:
            model.lm_head.weight.add_(1.0)
    assert statistics_fingerprint(model, tokenizer, layout, 0, "c", args) == before


def test_fingerprint_digest_is_cheap_on_a_real_size_tensor():
    """The digest reads each tensor once (two float64 reductions and a strided sample): no copy of the tensor."""
    from memit_hf.statistics import tensor_digest

    big = torch.randn(4096, 1024)
    first = tensor_digest(big)
    assert first == tensor_digest(big.clone())
    big[1000, 3] += 1e-4
    assert tensor_digest(big) != first


def test_save_and_load_cached_round_trip(tmp_path):
    fingerprint = {"module": "m.0", "format_version": 1, "x": 1}
    keys = torch.randn(12, 4, dtype=torch.float64)
    total = keys.T @ keys  # a sum of k k^T: a random (asymmetric) matrix is refused on load
    cache = StatisticsCache(tmp_path / "sub")
    path = cache.save(fingerprint, SecondMoment(total, 12))
    assert path.exists() and path.suffix == ".safetensors"
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["fingerprint"] == fingerprint and meta["count"] == 12 and len(meta["sha256"]) == 64
    loaded = cache.load(fingerprint)
    assert torch.equal(loaded.total, total) and loaded.count == 12
    assert cache.load({**fingerprint, "x": 2}) is None
    assert StatisticsCache(tmp_path / "missing").load(fingerprint) is None


def _layer_statistics(cache, fingerprint, total, count=10):
    return LayerStatistics("m.0", SecondMoment(total, count), fingerprint, "k", "cache", cache)


def test_spectrum_is_cached_beside_the_statistics_it_was_made_from(tmp_path, caplog):
    fingerprint = {"module": "m.0", "format_version": 1}
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(50, 6, dtype=torch.float64, generator=generator)
    total = keys.T @ keys
    cache = StatisticsCache(tmp_path)
    cache.save(fingerprint, SecondMoment(total, 10))
    eigenvalues, eigenvectors = _layer_statistics(cache, fingerprint, total).spectrum()
    # The decomposition itself: C V = V diag(lambda), ascending.
    covariance = total / 10
    bound = 64 * torch.finfo(torch.float64).eps * float(eigenvalues.abs().max())
    torch.testing.assert_close(covariance @ eigenvectors, eigenvectors * eigenvalues, rtol=0, atol=bound)
    assert bool((eigenvalues[1:] >= eigenvalues[:-1]).all())
    assert cache.spectrum_path(fingerprint).exists()
    # Another LayerStatistics of the same entry reads it back bit for bit (no new decomposition).
    again = _layer_statistics(cache, fingerprint, torch.zeros(6, 6, dtype=torch.float64)).spectrum()
    assert torch.equal(again[0], eigenvalues) and torch.equal(again[1], eigenvectors)

    # The entry replaced by other statistics: the old spectrum no longer matches its checksum and is recomputed.
    other = total + torch.eye(6, dtype=torch.float64)
    cache.save(fingerprint, SecondMoment(other, 10))
    assert cache.load_spectrum(fingerprint) is None
    assert "made from other statistics" in caplog.text
    recomputed = _layer_statistics(cache, fingerprint, other).spectrum()
    torch.testing.assert_close(recomputed[0], eigenvalues + 0.1, rtol=0, atol=bound)
    assert torch.equal(cache.load_spectrum(fingerprint)[0], recomputed[0])


def test_spectrum_without_a_cache_entry_is_computed_and_not_written(tmp_path):
    total = torch.eye(3, dtype=torch.float64) * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    cache = StatisticsCache(tmp_path)
    eigenvalues, _ = _layer_statistics(cache, {"module": "m.0"}, total, count=1).spectrum()
    assert eigenvalues.tolist() == [1.0, 2.0, 3.0]
    assert not cache.spectrum_path({"module": "m.0"}).exists()
    assert _layer_statistics(None, {"module": "m.0"}, total, count=1).spectrum()[0].tolist() == [1.0, 2.0, 3.0]


# ------------------------------------------------------------------- content checks and safe writes of the cache
def sound_total(dim: int = 6, tokens: int = 50, seed: int = 0) -> torch.Tensor:
    keys = torch.randn(tokens, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return keys.T @ keys


@pytest.mark.parametrize(
    "total, count, dim, reason",
    [
        (sound_total(), 11, None, "`count` 11 exceeds the fingerprint's token budget `num_tokens` 10"),
        (
            sound_total().index_put((torch.tensor([0]), torch.tensor([1])), torch.tensor([9.0], dtype=torch.float64)),
            10,
            None,
            "`total` is not symmetric",
        ),
        (torch.full((6, 6), float("inf"), dtype=torch.float64), 10, None, "`total` holds non-finite values"),
        (-torch.eye(6, dtype=torch.float64), 10, None, "`total` has a negative diagonal entry (-1 at index 0)"),
        (sound_total(), 10, 7, "`total` is 6 x 6 but the module's input has `d_in` 7"),
        (sound_total(), 0, None, "`count` is 0 (it must be positive)"),
    ],
    ids=["over-budget", "asymmetric", "infinite", "negative-diagonal", "side", "zero-count"],
)
def test_cache_load_checks_the_content(tmp_path, caplog, total, count, dim, reason):
    fingerprint = {"module": "m.0", "format_version": 1, "num_tokens": 10}
    cache = StatisticsCache(tmp_path)
    cache.save(fingerprint, SecondMoment(total, count))  # the checksum is right: only the content is wrong
    with caplog.at_level("WARNING", logger="memit_hf.statistics.cache"):
        assert cache.load(fingerprint, dim) is None
    assert "Ignoring damaged statistics cache" in caplog.text and reason in caplog.text
    cache.save(fingerprint, SecondMoment(sound_total(), 10))
    assert torch.equal(cache.load(fingerprint, dim=6).total, sound_total())


def test_cache_load_checks_the_count_against_the_json(tmp_path, caplog):
    fingerprint = {"module": "m.0", "format_version": 1}
    cache = StatisticsCache(tmp_path)
    cache.save(fingerprint, SecondMoment(sound_total(), 12))
    damage_count(cache.paths(fingerprint)[0])
    assert cache.load(fingerprint) is None
    assert "`count` is 12 in the tensors but 11 in the JSON" in caplog.text


def save_repeatedly(directory: str, seed: int, barrier, rounds: int) -> None:
    """Spawned: write one entry `rounds` times, starting together with the other writer."""
    cache = StatisticsCache(directory)
    moment = SecondMoment(sound_total(dim=256, tokens=300, seed=seed), 300)
    barrier.wait()
    for _ in range(rounds):
        cache.save({"module": "m.0", "format_version": 1}, moment)


def hold_lock(path: str, held, seconds: float, marker: str) -> None:
    """Spawned: hold `entry_lock(path)` for `seconds`, then write `marker` and release."""
    with entry_lock(path):
        held.set()
        time.sleep(seconds)
        Path(marker).write_text("released")


def test_two_processes_writing_one_entry_at_once_leave_a_sound_entry(tmp_path):
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    writers = [context.Process(target=save_repeatedly, args=(str(tmp_path), seed, barrier, 25)) for seed in (1, 2)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=300)
    assert [writer.exitcode for writer in writers] == [0, 0]
    fingerprint = {"module": "m.0", "format_version": 1}
    loaded = StatisticsCache(tmp_path).load(fingerprint)  # the checksum and the content verify
    assert loaded is not None and loaded.count == 300
    candidates = [sound_total(dim=256, tokens=300, seed=seed) for seed in (1, 2)]
    assert any(torch.equal(loaded.total, total) for total in candidates)
    stem = StatisticsCache(tmp_path).paths(fingerprint)[0].stem
    assert sorted(path.name for path in tmp_path.iterdir()) == [f"{stem}.json", f"{stem}.safetensors"]  # no lock left


def test_a_writer_waits_for_the_lock_of_the_entry(tmp_path):
    fingerprint = {"module": "m.0", "format_version": 1}
    cache = StatisticsCache(tmp_path / "cache")
    context = multiprocessing.get_context("spawn")
    held, marker = context.Event(), tmp_path / "released"
    holder = context.Process(target=hold_lock, args=(str(cache.lock_path(fingerprint)), held, 2.0, str(marker)))
    holder.start()
    try:
        assert held.wait(timeout=300)
        cache.save(fingerprint, SecondMoment(sound_total(), 10))
        assert marker.read_text() == "released"  # the save waited until the other process let the lock go
    finally:
        holder.join(timeout=300)
    assert holder.exitcode == 0 and cache.load(fingerprint) is not None
    assert not cache.lock_path(fingerprint).exists()


def test_without_flock_writes_are_not_locked_and_say_so(tmp_path):
    with pytest.warns(RuntimeWarning, match=r"not locked .*`fcntl.flock` is not available"):
        with entry_lock(tmp_path / "entry.lock", use_flock=False):
            pass
    assert not (tmp_path / "entry.lock").exists()
    # a file system that cannot lock (some network file systems): the entry is written unlocked, with a warning
    fingerprint = {"module": "m.0", "format_version": 1}
    cache = StatisticsCache(tmp_path / "cache")
    with mock.patch("fcntl.flock", side_effect=OSError(errno.ENOLCK, "No locks available")):
        with pytest.warns(RuntimeWarning, match=r"not locked .*: the file system cannot lock"):
            cache.save(fingerprint, SecondMoment(sound_total(), 10))
    assert torch.equal(cache.load(fingerprint).total, sound_total())
    assert not cache.lock_path(fingerprint).exists()


def test_stale_temporary_files_are_removed_on_the_next_write(tmp_path, caplog):
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()  # its pid no longer runs
    here, day = host_name(), 24 * 3600
    names = {
        "dead": f".m.0-k.safetensors.memit-tmp.{here}.{finished.pid}.0a1b2c3d.tmp",
        "live": temporary_path(tmp_path / "m.0-k.safetensors").name,  # this process's
        "elsewhere": f".m.0-k.json.memit-tmp.other-machine.{finished.pid}.00ff00ff.tmp",
        "elsewhere-old": f".m.0-k.json.memit-tmp.other-machine.{finished.pid}.11ff11ff.tmp",
        "legacy-old": "tmpab12cd_4.tmp",
        "legacy": "tmpzz99yy88.tmp",
        "safetensors-old": ".tmpAb12Cd",
        "unrelated-old": "notes.tmp",
    }
    for key, name in names.items():
        if key in ("dead", "live", "elsewhere-old"):  # temporary folders, as the cache writes them
            (tmp_path / name).mkdir()
            (tmp_path / name / "m.0-k.safetensors").write_bytes(b"partial")
            (tmp_path / name / ".tmpXy12Zw").write_bytes(b"safetensors' own temporary file")
        else:
            (tmp_path / name).write_bytes(b"partial")
        if key.endswith("-old"):
            old = time.time() - day - 60
            os.utime(tmp_path / name, (old, old))
    assert temporary_owner(tmp_path / names["live"]) == (here, os.getpid())
    assert temporary_owner(tmp_path / names["dead"]) == (here, finished.pid)
    assert temporary_owner(tmp_path / names["legacy"]) is None
    with caplog.at_level("INFO", logger="memit_hf.files"):
        StatisticsCache(tmp_path).save({"module": "m.0", "format_version": 1}, SecondMoment(sound_total(), 10))
    kept = {key for key, name in names.items() if (tmp_path / name).exists()}
    assert kept == {"live", "elsewhere", "legacy", "unrelated-old"}
    assert f"Removed the stale temporary file {tmp_path / names['dead']}" in caplog.text
    # past the age limit every temporary file goes, even one whose pid runs (it may be another process's by now)
    removed = remove_stale_temporary_files(tmp_path, max_age=60, now=time.time() + 61)
    assert sorted(path.name for path in removed) == sorted([names["elsewhere"], names["legacy"], names["live"]])
    assert [path.name for path in tmp_path.iterdir() if path.suffix != ".json" and "safetensors" not in path.name] == [
        "notes.tmp"
    ]


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_cache_files_get_the_permissions_of_the_umask(tmp_path, umask):
    """Not `tempfile`'s 0o600: a cache shared between users stays readable by them."""
    fingerprint = {"module": "m.0", "format_version": 1}
    previous = os.umask(umask)
    try:
        cache = StatisticsCache(tmp_path / "cache")
        tensor_path, meta_path = cache.paths(fingerprint)
        cache.save(fingerprint, SecondMoment(sound_total(), 10))
        spectrum = cache.save_spectrum(fingerprint, *torch.linalg.eigh(sound_total()))
        copied = StatisticsCache(tmp_path / "copied")
        with mock.patch("os.link", side_effect=OSError("cross-device link")):  # another file system: a copy
            copied.add(tensor_path, meta_path)
        checkpoint = StatisticsCheckpoint(tmp_path / "cache", "key", every_batches=1)
        checkpoint.save(CollectionProgress({"m.0": sound_total()}, 10, 1), 2)
    finally:
        os.umask(previous)
    files = [tensor_path, meta_path, spectrum, *copied.paths(fingerprint), checkpoint.path]
    assert {path.name: stat.S_IMODE(path.stat().st_mode) for path in files} == dict.fromkeys(
        (path.name for path in files), 0o666 & ~umask
    )


def test_cache_writes_go_through_temporary_files_named_by_their_owner(tmp_path):
    """A run killed between writing a temporary file and renaming it leaves a file whose name says whose it is."""
    renamed = []
    real_replace = os.replace

    def replace(source, target):
        renamed.append((Path(source), Path(target)))
        real_replace(source, target)

    fingerprint = {"module": "m.0", "format_version": 1}
    cache = StatisticsCache(tmp_path)
    with mock.patch("os.replace", side_effect=replace):
        cache.save(fingerprint, SecondMoment(sound_total(), 10))
    assert [target for _, target in renamed] == list(cache.paths(fingerprint))
    for source, target in renamed:
        assert source.name == target.name and source.parent.parent == tmp_path
        assert source.parent.name.startswith(f".{cache.paths(fingerprint)[0].name}.memit-tmp.")
        assert temporary_owner(source.parent) == (host_name(), os.getpid())
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(path.name for path in cache.paths(fingerprint))


def test_fingerprint_key_is_unchanged_by_the_settings_object(model, tokenizer, tmp_path):
    """Statistics cached before `StatisticsSettings` existed are still found: the fingerprint holds exactly the
    fields, values and key it held when it was built from `EditingArguments` (`stats_num_tokens`,
    `stats_max_length`, `seed`)."""
    args = tiny_editing_arguments(tmp_path, stats_num_tokens=800, stats_max_length=64, stats_batch_tokens=256)
    layout = get_layout(model)
    legacy = {
        "format_version": STATS_FORMAT_VERSION,
        **model_identity(model),
        "weights_digest": weights_digest(upstream_parameters(model, layout, 1)),
        "module": layout.edit_name(1),
        "tokenizer": getattr(tokenizer, "name_or_path", "") or "",
        "vocab_size": len(tokenizer),
        "corpus": "tokens:abc",
        "num_tokens": args.stats_num_tokens,
        "max_length": args.stats_max_length,
        "seed": args.seed,
        "accumulation": "float64",
    }
    fingerprint = statistics_fingerprint(model, tokenizer, layout, 1, "tokens:abc", args.statistics_settings())
    assert fingerprint == legacy and list(fingerprint) == list(legacy)
    assert fingerprint_key(fingerprint) == fingerprint_key(legacy)
    # The provider the Editor builds from the arguments finds what a provider of the same settings cached.
    first = make_editor(model, tokenizer, tmp_path)
    cached = first.get_statistics([1])["model.layers.1.mlp.down_proj"]
    provider = StatisticsProvider(model, tokenizer, layout, first.args.statistics_settings(), tiny_corpus())
    found = provider.get([1])["model.layers.1.mlp.down_proj"]
    assert found.source == "cache" and found.key == cached.key and provider.num_collections == 0


def test_provider_and_fingerprint_take_statistics_settings(model, tokenizer, tmp_path):
    args = tiny_editing_arguments(tmp_path)
    with pytest.raises(TypeError, match="statistics_settings"):
        StatisticsProvider(model, tokenizer, get_layout(model), args)
    with pytest.raises(TypeError, match="statistics_settings"):
        statistics_fingerprint(model, tokenizer, get_layout(model), 0, "c", args)


def test_editor_keeps_its_provider_until_the_settings_or_corpus_change(model, tokenizer, tmp_path):
    editor = make_editor(model, tokenizer, tmp_path)
    provider = editor.statistics
    assert editor.statistics is provider and provider.settings == editor.args.statistics_settings()
    editor.args.stats_batch_tokens = 512  # another setting: another provider
    assert editor.statistics is not provider and editor.statistics.settings.batch_tokens == 512
    provider = editor.statistics
    editor.stats_dataset = tiny_corpus()[:40]  # another corpus object: another provider
    assert editor.statistics is not provider and editor.statistics.corpus is editor.stats_dataset
