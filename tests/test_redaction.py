"""Secrets are redacted wherever arguments and metadata are written."""

import pytest

from memit_hf.arguments import EditingArguments
from memit_hf.redaction import REDACTED, is_secret_key, redact


HUB_TOKEN = "hf_" + "a1B2c3D4e5" * 4


@pytest.mark.parametrize("key", ["token", "hub_token", "use_auth_token", "HF_TOKEN", "api_key", "openai_api_key"])
def test_secret_keys(key):
    assert is_secret_key(key)


@pytest.mark.parametrize("key", ["pad_token", "eos_token", "num_tokens", "stats_num_tokens", "max_new_tokens", 3])
def test_settings_that_are_not_secrets(key):
    assert not is_secret_key(key)


def test_redact_walks_nested_values_and_keeps_empty_ones():
    value = {
        "a": [{"token": "s1"}, ("x", {"password": "s2"})],
        "hub_token": None,
        "text": f"Bearer {HUB_TOKEN}!",
        "mine": "s3",
        "pad_token": "<pad>",
    }
    redacted = redact(value, extra_keys=["MINE"])
    assert redacted == {
        "a": [{"token": REDACTED}, ("x", {"password": REDACTED})],
        "hub_token": None,
        "text": f"Bearer {REDACTED}!",
        "mine": REDACTED,
        "pad_token": "<pad>",
    }
    assert value["a"][0]["token"] == "s1"  # a copy


def test_editing_arguments_to_dict_redacts_every_secret():
    args = EditingArguments(
        hub_token="s1",
        model_init_kwargs={"token": "s2", "revision": "main", "key": HUB_TOKEN},
        redact_keys=["revision"],
    )
    values = args.to_dict()
    assert values["hub_token"] == REDACTED
    assert values["model_init_kwargs"] == {"token": REDACTED, "revision": REDACTED, "key": REDACTED}
    assert args.model_init_kwargs["token"] == "s2"  # the arguments themselves keep them
    assert "s1" not in str(args.editing_values()) and "model_init_kwargs" not in args.editing_values()
