"""Progress bars that honour tqdm's environment settings (`TQDM_DISABLE=1` and the other `TQDM_*` variables)."""

from tqdm.auto import tqdm


def progress_bar(show: bool = True, **kwargs) -> tqdm:
    """A `tqdm.auto` bar, hidden when `show` is false.

    A shown bar keeps tqdm's defaults from the environment: passing `disable=False` explicitly would override
    `TQDM_DISABLE=1`, so `disable` is passed only to hide the bar.

    Args:
        show (`bool`, *optional*, defaults to `True`): whether the caller wants the bar (e.g. only the main process).
        **kwargs: passed to `tqdm` (`total`, `desc`, `initial`, ...).

    Returns:
        `tqdm`: the bar (a disabled one when hidden).
    """
    if not show:
        kwargs["disable"] = True
    return tqdm(**kwargs)
