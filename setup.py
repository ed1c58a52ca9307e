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
    ],
    extras_require={
        "test": [
            "pytest>=8,<10",
            "trustme>=1.1,<2",
            "pexpect>=4.8,<5",
            "getmail6>=6.19,<7",
            "ruff>=0.5",
            "mypy>=1.10,<3",
            "types-gevent>=24.2",
            "hypothesis>=6.100,<7",
            "psutil>=5.9,<8",  # which worker serves a connection (tests/e2e/test_workers.py)
        ],
        "load": [
            "locust>=2.20,<3",
            "psutil>=5.9,<8",
        ],
    },
    entry_points={
        "console_scripts": [
            "geventpop3 = geventpop3.__main__:main",
            "geventpop3-admin = admin.shell:main",
        ],
    },
)
