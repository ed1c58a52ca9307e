"""gevent's `monkey.patch_all()`, done first by every entry point (`python -m geventpop3`,
a cluster worker) before anything else imports socket, threading or ssl."""

from gevent import monkey


def patch_all() -> None:
    """`monkey.patch_all()`, with the installed entry points read once instead of 25 times.

    gevent looks up its plugins (entry point groups `gevent.plugins.monkey.*`) at each of
    the 25 events of patch_all, and each look-up reads the metadata of every installed
    distribution: 70 to 90 ms of a 450 ms start with 140 packages installed (and of every
    worker's start with --workers). The entry points cannot change meanwhile, so the same
    plugins are called with the same events."""
    from importlib import metadata

    installed = metadata.entry_points()
    lookup = metadata.entry_points
    metadata.entry_points = lambda **params: installed.select(**params) if params else installed  # type: ignore[assignment]
    try:
        monkey.patch_all()
    finally:
        metadata.entry_points = lookup
