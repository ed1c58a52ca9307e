"""Where the configured POP3 users come from: the flags (`-u`, `--demo`) and the users file.

`UsersSource` is the one owner of "which users file content is in force" in a process.
Its operations say what each process of a cluster does with the file, and no more:
- `read()`: read the file now, as the user that serves (at start, at each reload);
- `use(content)`: take the content another process read (a worker takes its supervisor's);
- `matches(digest)`: whether a SHA-256 digest is that of the content in force here (a
  worker's hello carries the digest of what it read; its supervisor ships its content
  only when they differ, so the file is not sent to every worker at every start).
`configure(directory, users_file)` then makes those users a directory's configured ones;
only once taken is their content the one in force.
"""

from __future__ import annotations

from collections.abc import Sequence

from geventpop3.auth.users import Configured, UserDirectory, UsersFile, parse_users_data, parse_users_file
from geventpop3.core.names import UserError


class UsersSource:
    """The users of the users file at `path` (None: no file), between those given
    `before` it (flags: the file's entry of a name wins) and `after` it (--demo's wins)."""

    def __init__(self, path: str | None, before: Sequence[Configured | tuple[str, str]] = (),
                 after: Sequence[Configured | tuple[str, str]] = ()) -> None:
        self.path = path
        self.before = list(before)
        self.after = list(after)
        self.data = b""  # the users file's content in force ("" until taken, or without a file)
        self.digest = ""  # its SHA-256 (users.UsersFile.digest)
        self.notes: list[str] = []  # about it, for the log: ignored fields, users left out

    def read(self) -> UsersFile | None:
        """The users file as it is now (None without one); UserError, one line with
        `path:line`, if it cannot be read or parsed."""
        if not self.path:
            return None
        try:
            return parse_users_file(self.path)
        except OSError as exc:
            raise UserError(f"cannot read users file {self.path}: {exc.strerror}") from None

    def use(self, content: bytes) -> UsersFile | None:
        """The users file as another process read it (`content`); UserError if it cannot be parsed."""
        if not self.path:
            return None
        return parse_users_data(content, self.path)

    def matches(self, digest: str) -> bool:
        """Whether `digest` is that of the content in force here ("" for none)."""
        return digest == self.digest

    def configure(self, directory: UserDirectory, users_file: UsersFile | None) -> tuple[int, int, int]:
        """Make the users given and those of `users_file` the configured ones of `directory`
        (users.PasswordStore.configure: UserError, nothing changed, if one is unusable);
        (added, changed, removed). Then that content is the one in force here."""
        entries = [*self.before, *(users_file.entries if users_file is not None else ()), *self.after]
        counts = directory.configure(entries)
        if users_file is not None:
            self.data, self.digest, self.notes = users_file.data, users_file.digest, users_file.notes
        return counts
