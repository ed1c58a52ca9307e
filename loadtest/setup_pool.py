"""Prepare the pool of load-test users: users files, Maildirs and a message corpus.

One mailbox per simulated user, in groups (download-and-delete, poller, idle), so no
two simulated users ever want the same mailbox lock. The corpus is a fixed set of
messages (about 26 KiB on average, the classic ISP profile); mailboxes get hard links
to it, so 10,000 mailboxes cost inodes, not gigabytes, and re-delivering the mail a
test deleted is one link() per message.

Written files, under ROOT:
  pool.json        what was made (read by the locustfile and run.py)
  users.hashed     name:$scrypt$... lines for `geventpop3 --users-file`
  users.plain      name:password lines (for the load generator and Dovecot's peer script)
  corpus/          the messages
  mail/<user>/     each user's Maildir

The entries in users.hashed use a cheap scrypt cost (n=2**8) on purpose: the server's
default cost (n=2**14, ~57 ms per hash on this machine) is right for real accounts but
would make 10,000 first logins cost ten minutes of CPU. A load test measures the
server, not scrypt.

    python -m loadtest.setup_pool --root /tmp/pool --dd 200 --poll 100 --idle 10100
    python -m loadtest.setup_pool --root /tmp/pool --refill            # top every mailbox up
    python -m loadtest.setup_pool --root /tmp/pool --watch 600         # refill every second, 600 s
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import random
import secrets
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from geventpop3.auth.users import hash_password  # noqa: E402

POOL_FILE = "pool.json"
LOAD_COST = (2**8, 8, 1)
GROUPS = ("dd", "poll", "idle")
DEFAULT_COUNTS = {"dd": 200, "poll": 100, "idle": 100}
DEFAULT_MESSAGES = {"dd": 30, "poll": 30, "idle": 5}
MEAN_SIZE = 26 * 1024
CORPUS_SIZE = 30

_counter = 0


@dataclass
class Pool:
    """A prepared pool, as read back from pool.json."""

    root: Path
    maildir: Path
    corpus: list[Path]
    users: dict[str, list[str]]  # group -> names
    messages: dict[str, int]  # group -> messages a full mailbox holds
    passwords: dict[str, str] = field(default_factory=dict)

    @property
    def users_hashed(self) -> Path:
        return self.root / "users.hashed"

    @property
    def users_plain(self) -> Path:
        return self.root / "users.plain"

    def group_of(self, name: str) -> str:
        return name.rstrip("0123456789")

    def refill(self, name: str) -> int:
        """Top the user's mailbox up to its group's count; returns messages delivered."""
        return refill(self.maildir / name, self.corpus, self.messages[self.group_of(name)])

    def refill_all(self) -> int:
        return sum(self.refill(name) for names in self.users.values() for name in names)


def load_pool(root: str | os.PathLike[str]) -> Pool:
    root = Path(root).resolve()
    meta = json.loads((root / POOL_FILE).read_text())
    passwords = {}
    plain = root / "users.plain"
    if plain.exists():
        for line in plain.read_text().splitlines():
            name, _, password = line.partition(":")
            passwords[name] = password
    return Pool(root, Path(meta["maildir"]), [Path(p) for p in meta["corpus"]], meta["users"],
                meta["messages"], passwords)


# -- corpus ----------------------------------------------------------------------

def corpus_sizes(count: int = CORPUS_SIZE, mean: int = MEAN_SIZE, seed: int = 1939) -> list[int]:
    """Message sizes with a long tail (mostly a few KiB, some large), scaled to `mean` exactly."""
    rng = random.Random(seed)
    raw = [rng.lognormvariate(0, 1.0) for _ in range(count)]
    scale = mean * count / sum(raw)
    sizes = [max(1024, int(r * scale)) for r in raw]
    sizes[-1] += mean * count - sum(sizes)  # exact mean
    return sizes


def make_message(number: int, size: int, rng: random.Random) -> bytes:
    """An RFC 5322 message of about `size` octets with LF line ends (as MTAs store them).

    A few body lines start with a dot, so dot-stuffing is exercised on every RETR.
    """
    head = (
        f"Return-Path: <sender{number}@example.org>\n"
        f"From: Sender {number} <sender{number}@example.org>\n"
        f"To: user@example.net\n"
        f"Subject: load-test message {number}\n"
        f"Date: Mon, 1 Jan 2024 12:{number % 60:02d}:00 +0000\n"
        f"Message-ID: <lt{number}.{size}@example.org>\n"
        f"MIME-Version: 1.0\n\n"
    ).encode()
    lines = []
    total = len(head)
    words = ("mail", "server", "gevent", "pop3", "maildir", "load", "test", "quick", "brown", "fox")
    while total < size:
        if rng.random() < 0.3 and size > 8192:
            line = base64.b64encode(rng.randbytes(57)).decode()
        else:
            line = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
            if rng.random() < 0.05:
                line = "." + line
        lines.append(line)
        total += len(line) + 1
    body = ("\n".join(lines) + "\n").encode()
    return (head + body)[:size - 1] + b"\n" if len(head + body) > size else head + body


def make_corpus(directory: Path, count: int = CORPUS_SIZE, mean: int = MEAN_SIZE) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(26)
    paths = []
    for number, size in enumerate(corpus_sizes(count, mean), 1):
        path = directory / f"msg{number:03d}.eml"
        path.write_bytes(make_message(number, size, rng))
        paths.append(path)
    return paths


# -- delivery ----------------------------------------------------------------------

def _unique_name() -> str:
    global _counter
    _counter += 1
    now = time.time()
    return f"{int(now)}.M{int(now * 1e6) % 1_000_000}P{os.getpid()}Q{_counter}.loadtest"


def deliver_link(maildir: Path, source: Path) -> None:
    """Deliver one corpus message: a hard link under a fresh unique name in new/ (atomic)."""
    target = maildir / "new" / _unique_name()
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed: copy the Maildir way
        temp = maildir / "tmp" / target.name
        temp.write_bytes(source.read_bytes())
        os.rename(temp, target)


def count_messages(maildir: Path) -> int:
    total = 0
    for sub in ("new", "cur"):
        with contextlib.suppress(FileNotFoundError):
            total += sum(1 for name in os.listdir(maildir / sub) if not name.startswith("."))
    return total


def refill(maildir: Path, corpus: list[Path], target: int) -> int:
    """Deliver corpus messages until the mailbox holds `target`; returns how many."""
    missing = target - count_messages(maildir)
    for i in range(max(missing, 0)):
        deliver_link(maildir, corpus[i % len(corpus)])
    return max(missing, 0)


# -- the pool ----------------------------------------------------------------------

def _hash(password: str) -> str:
    return hash_password(password, cost=LOAD_COST)


def create_pool(root: Path, counts: dict[str, int], messages: dict[str, int] | None = None,
                mean_size: int = MEAN_SIZE, corpus_count: int = CORPUS_SIZE) -> Pool:
    """Make (or grow) the pool; existing users keep their passwords and mail."""
    root = root.resolve()
    messages = {**DEFAULT_MESSAGES, **(messages or {})}
    maildir = root / "mail"
    maildir.mkdir(parents=True, exist_ok=True)
    corpus_dir = root / "corpus"
    corpus = sorted(corpus_dir.glob("*.eml")) if corpus_dir.is_dir() else []
    if len(corpus) != corpus_count:
        corpus = make_corpus(corpus_dir, corpus_count, mean_size)
    hashed: dict[str, str] = {}
    plain: dict[str, str] = {}
    if (root / "users.plain").exists() and (root / "users.hashed").exists():
        plain = dict(line.split(":", 1) for line in (root / "users.plain").read_text().splitlines() if line)
        hashed = dict(line.split(":", 1) for line in (root / "users.hashed").read_text().splitlines() if line)
    users: dict[str, list[str]] = {}
    for group in GROUPS:
        names = [f"{group}{i:05d}" for i in range(1, counts.get(group, 0) + 1)]
        users[group] = names
        for name in names:
            plain.setdefault(name, secrets.token_urlsafe(9))
    todo = [name for name in plain if name not in hashed]
    if todo:
        workers = min(os.cpu_count() or 1, 4)
        with ProcessPoolExecutor(workers) as executor:
            for name, digest in zip(todo, executor.map(_hash, [plain[n] for n in todo], chunksize=256), strict=True):
                hashed[name] = digest
    _write_lines(root / "users.plain", plain)
    _write_lines(root / "users.hashed", hashed)
    for group, names in users.items():
        for name in names:
            box = maildir / name
            for sub in ("cur", "new", "tmp"):
                (box / sub).mkdir(parents=True, exist_ok=True)
            refill(box, corpus, messages[group])
    meta = {"maildir": str(maildir), "corpus": [str(p) for p in corpus], "users": users, "messages": messages,
            "mean_size": sum(p.stat().st_size for p in corpus) // len(corpus)}
    (root / POOL_FILE).write_text(json.dumps(meta, indent=1))
    return load_pool(root)


def ensure_pool(root: Path, counts: dict[str, int], messages: dict[str, int] | None = None) -> Pool:
    """The pool at `root` with at least `counts` users per group, every mailbox topped up."""
    if (root / POOL_FILE).exists():
        pool = load_pool(root)
        wanted = {**DEFAULT_MESSAGES, **(messages or {})}
        if all(len(pool.users.get(g, [])) >= counts.get(g, 0) for g in GROUPS) and pool.messages == wanted:
            pool.refill_all()
            return pool
        counts = {g: max(counts.get(g, 0), len(pool.users.get(g, []))) for g in GROUPS}
    return create_pool(root, counts, messages)


def _write_lines(path: Path, entries: dict[str, str]) -> None:
    temp = path.with_suffix(".tmp")
    temp.write_text("".join(f"{name}:{value}\n" for name, value in entries.items()))
    os.chmod(temp, 0o600)
    os.replace(temp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, type=Path, help="pool directory (created)")
    for group in GROUPS:
        parser.add_argument(f"--{group}", type=int, default=None,
                            help=f"{group} users (default {DEFAULT_COUNTS[group]})")
        parser.add_argument(f"--{group}-messages", type=int, default=DEFAULT_MESSAGES[group],
                            help=f"messages in a full {group} mailbox (default {DEFAULT_MESSAGES[group]})")
    parser.add_argument("--refill", action="store_true", help="only top every mailbox up")
    parser.add_argument("--watch", type=float, metavar="SECONDS",
                        help="refill every second for this long (for a server on another host's disk)")
    args = parser.parse_args(argv)
    messages = {g: getattr(args, f"{g}_messages") for g in GROUPS}
    if args.refill or args.watch:
        pool = load_pool(args.root)
        deadline = time.monotonic() + (args.watch or 0)
        while True:
            delivered = pool.refill_all()
            if not args.watch or time.monotonic() >= deadline:
                break
            time.sleep(1)
        print(f"refilled: {delivered} messages delivered in the last pass")
        return 0
    counts = {g: DEFAULT_COUNTS[g] if getattr(args, g) is None else getattr(args, g) for g in GROUPS}
    start = time.monotonic()
    pool = ensure_pool(args.root, counts, messages)
    print(f"pool {pool.root}: " + ", ".join(f"{g}={len(pool.users[g])}" for g in GROUPS)
          + f"; {len(pool.corpus)} corpus messages; {time.monotonic() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
