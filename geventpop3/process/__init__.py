"""Several worker processes behind the same ports, one supervisor (`--workers N`, N > 1).

`supervisor` binds every listener, keeps the one state store and serves MSMP and the
metrics; `worker` serves POP3 on the inherited listeners; `channel` is the message
pipe between them; `aggregate` sums what the workers report. `--workers 1` uses none
of this: it is the single process of geventpop3.process.server. See docs/architecture.md.
"""
