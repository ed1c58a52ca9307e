"""Settings changed over MSMP `SET`, kept in the store so they survive a restart.

Backend-independent: only `Store.load_settings` and `Store.save_setting` are used.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

from geventpop3.core.settings import SettingError, SettingNotSaved, Settings, Writer
from geventpop3.state import Store, StoreError

log = logging.getLogger(__name__)


def restore_settings(settings: Settings, store: Store, skip: Collection[str] = ()) -> dict[str, str]:
    """Apply the values saved by earlier MSMP `SET`s (source 'store'), except keys in
    `skip` (e.g. ones given explicitly on the command line, if those should win).
    A saved value that no longer validates, or that MSMP may no longer set (e.g. a filter
    `transformer_programs` stopped allowing), is skipped with a warning. Returns what was applied.

    Restored values are applied, not `set`: nothing is written back."""
    applied = {}
    for key, text in sorted(store.load_settings().items()):
        if key in skip:
            continue
        try:
            value = settings.parse(key, text)
            settings.check_msmp(key, value)
        except SettingError as exc:
            log.warning("ignoring saved setting %s=%r: %s", key, text, exc)
            continue
        settings.apply(key, value, "store")
        applied[key] = text
    return applied


def persist_settings(settings: Settings, store: Store) -> Writer:
    """Save every later `Settings.set` to the store, durably, before it takes effect.

    Subscribe once start-up configuration is applied; from then on MSMP `SET` is the
    only caller of `set`. A store failure refuses the change (SettingNotSaved): the
    old value stays, and SET answers -ERR instead of a change lost at the next restart."""

    def writer(key: str, value_text: str) -> None:
        try:
            store.save_setting(key, value_text)
        except StoreError as exc:
            log.error("setting %s not changed, it could not be saved: %s", key, exc)
            raise SettingNotSaved("Not changed: the state database cannot be written") from None

    settings.add_writer(writer)
    return writer
