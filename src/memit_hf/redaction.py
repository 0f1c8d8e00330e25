"""Secrets never leave the process: one redaction of secret-like values, applied wherever arguments or metadata are
serialised (adapters, merged checkpoints, editor states, CLI outputs, model cards)."""

import re
from collections.abc import Iterable, Mapping
from typing import Any


SECRET_KEYS = frozenset(
    {"token", "hub_token", "hf_token", "use_auth_token", "auth_token", "access_token", "api_key", "password", "secret"}
)
"""Keys whose values are secrets wherever they appear (compared case-insensitively), as `token` in
`model_init_kwargs` (the usual way to load a gated model) or `hub_token`."""
SECRET_SUFFIXES = ("_auth_token", "_access_token", "_api_key", "_password", "_secret")
"""Key suffixes that mark a secret too (`pad_token` and the like are tokenizer settings, not secrets)."""
HUB_TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{20,}")
"""A Hugging Face access token inside any string (redacted even under an unexpected key)."""
REDACTED = "<REDACTED>"


def is_secret_key(key: Any, extra_keys: Iterable[str] = ()) -> bool:
    """Whether the value of `key` is a secret: a name of [`SECRET_KEYS`], one ending in a [`SECRET_SUFFIXES`] suffix,
    or one of `extra_keys` (all case-insensitive)."""
    if not isinstance(key, str):
        return False
    name = key.lower()
    return name in SECRET_KEYS or name.endswith(SECRET_SUFFIXES) or name in {k.lower() for k in extra_keys}


def redact(value: Any, extra_keys: Iterable[str] = ()) -> Any:
    """A copy of `value` (nested dicts, lists and tuples) with every secret replaced by `"<REDACTED>"`: the values of
    secret keys (see [`is_secret_key`]; `None` and `False` are kept, they hold no secret) and any Hugging Face token
    (`hf_...`) inside a string.

    Args:
        value (`Any`): what is about to be serialised.
        extra_keys (`Iterable[str]`, *optional*): further keys to treat as secret (`EditingArguments.redact_keys`).

    Returns:
        `Any`: the redacted copy; other values are returned as they are.
    """
    extra = tuple(extra_keys)
    if isinstance(value, Mapping):
        return {
            key: (REDACTED if item not in (None, False) else item)
            if is_secret_key(key, extra)
            else redact(item, extra)
            for key, item in value.items()
        }
    if isinstance(value, (list, tuple)):
        return type(value)(redact(item, extra) for item in value)
    if isinstance(value, str) and HUB_TOKEN_PATTERN.search(value):
        return HUB_TOKEN_PATTERN.sub(REDACTED, value)
    return value
