"""`python -m geventpop3` and the `geventpop3` console script.

gevent must patch the standard library before anything else imports socket,
threading or ssl, so this module does it first and imports the rest afterwards.
"""

from geventpop3.process.patching import patch_all

patch_all()

import sys  # noqa: E402


def main() -> None:
    from geventpop3.cli import main as cli_main

    sys.exit(cli_main())


if __name__ == "__main__":
    main()
