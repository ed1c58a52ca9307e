"""Packaging for geventpop3: the server, the admin client and their test extras."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="geventpop3",
    version="0.1.0",
    description="A POP3 server on gevent for Maildir, with live management (MSMP), filters and load tests",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["geventpop3", "geventpop3.*", "admin", "admin.*"]),
    install_requires=[
        "gevent>=24.2,<26",
        "prometheus-client>=0.19,<1",
        # The TLS certificate's notAfter (expiry in STAT and metrics); not_valid_after_utc is 42+.
        "cryptography>=42,<50",
        # Dovecot's BLF-CRYPT and ARGON2I/ARGON2ID password schemes (geventpop3.auth.schemes)
        "bcrypt>=4.1,<6",
        "argon2-cffi>=23.1,<26",
        # The workers' and the keeper's titles in ps (geventpop3: worker 1)
        "setproctitle>=1.3,<2",
    ],
    extras_require={
        "test": [
            "pytest>=8,<10",
            "trustme>=1.1,<2",
            "pexpect>=4.8,<5",
            "getmail6>=6.19,<7",
            "ruff>=0.5",
            "mypy>=1.10,<3",
            "import-linter>=2.1,<3",  # the layer contracts in pyproject.toml (lint-imports in .ci/run)
            "types-gevent>=24.2",
            "hypothesis>=6.100,<7",
            "proxy-protocol>=0.11,<0.12",  # an independent PROXY protocol implementation to check ours against
            "psutil>=5.9,<8",  # which worker serves a connection (tests/e2e/test_workers.py)
        ],
        "load": [
            "locust>=2.20,<3",
            "psutil>=5.9,<8",
        ],
        # --state-url: PostgreSQL as the store shared by several instances (notifies(timeout=) is 3.2+)
        "postgres": [
            "psycopg[binary]>=3.2,<4",
            "psycopg-pool>=3.2,<4",
        ],
        # geventpop3.testing with tls=True: a throw-away CA
        "testing": [
            "trustme>=1.1,<2",
        ],
    },
    entry_points={
        "console_scripts": [
            "geventpop3 = geventpop3.__main__:main",
            "geventpop3-admin = admin.shell:main",
        ],
        # The fixtures pop3_server and pop3_server_session (geventpop3/testing/pytest_plugin.py)
        "pytest11": [
            "geventpop3 = geventpop3.testing.pytest_plugin",
        ],
    },
)
