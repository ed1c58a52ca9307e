"""`python -m geventpop3.process --index I --parent PID --channel FD --listen SERVICE=FD... [--config-fd FD] -- ARGV`:
a worker process, started by the supervisor only (geventpop3.process.supervisor).

gevent patches the standard library first, as in geventpop3.__main__.
"""

from geventpop3.process.patching import patch_all

patch_all()

import os  # noqa: E402
import sys  # noqa: E402


def main(argv: list[str]) -> int:
    from geventpop3.config import UsageError, load_config
    from geventpop3.flags import build_parser
    from geventpop3.process.channel import MAX_LINE_FROM_SUPERVISOR, Channel, read_sealed
    from geventpop3.process.server import Server
    from geventpop3.process.worker import Worker, die_with_parent

    options, server_argv = _split(argv)
    index = int(options["--index"][0])
    die_with_parent(int(options["--parent"][0]))
    listeners: dict[str, list[int]] = {}
    for spec in options.get("--listen", []):
        service, _, fd = spec.partition("=")
        listeners.setdefault(service, []).append(int(fd))
    config_data = None
    if "--config-fd" in options:  # the config file as the supervisor read it, not as it may be now
        config_fd = int(options["--config-fd"][0])
        config_data = read_sealed(config_fd)
        os.close(config_fd)
    try:
        config = load_config(build_parser().parse_args(server_argv), config_data, checked=False)
    except UsageError as exc:
        print(f"geventpop3 worker {index}: {exc}", file=sys.stderr)
        return 2
    config.warnings.clear()  # the supervisor logged them once
    channel = Channel.from_fd(int(options["--channel"][0]), MAX_LINE_FROM_SUPERVISOR)
    return Server(config, Worker(index, channel, listeners)).run()


def _split(argv: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """`--name value` pairs before `--`, and the server's own command line after it."""
    end = argv.index("--")
    options: dict[str, list[str]] = {}
    for name, value in zip(argv[:end:2], argv[1:end:2], strict=True):
        options.setdefault(name, []).append(value)
    return options, argv[end + 1:]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
