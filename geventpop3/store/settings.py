"""Settings changed over MSMP `SET`, kept in the store so they survive a restart.

Backend-independent: only `Store.load_settings` and `Store.save_setting` are used.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

from geventpop3.settings import Listener, SettingError, Settings, format_value
from geventpop3.store import Store, StoreError

log = logging.getLogger(__name__)


def restore_settings(settings: Settings, store: Store, skip: Collection[str] = ()) -> dict[str, str]:
    """Apply the values saved by earlier MSMP `SET`s (source 'store'), except keys in
    `skip` (e.g. ones given explicitly on the command line, if those should win).
    A saved value that no longer validates is skipped with a warning. Returns what was applied.

    Call before `persist_settings`, or the restored values are written back (harmless)."""
    applied = {}
    for key, text in sorted(store.load_settings().items()):
        if key in skip:
            continue
        try:
            value = settings.parse(key, text)
        except SettingError as exc:
            log.warning("ignoring saved setting %s=%r: %s", key, text, exc)
            continue
        settings.apply(key, value, "store")
        applied[key] = text
    return applied


def persist_settings(settings: Settings, store: Store) -> Listener:
    """Save every later change of `settings` to the store (durably, before `SET` answers).

    Settings listeners do not learn the source of a change, so subscribe this once
    start-up configuration is applied; from then on MSMP `SET` is the only writer.
    A store failure is logged; the change still takes effect for this run."""

    def listener(key: str, old: object, new: object) -> None:
        if format_value(old) == format_value(new):
            return
        try:
            store.save_setting(key, settings.get(key))
        except StoreError as exc:
            log.error("setting %s changed but not saved, it will not survive a restart: %s", key, exc)

    settings.subscribe(listener)
    return listener
