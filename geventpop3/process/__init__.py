"""Processes: `server.Server(config, role).run()`, one fixed start-up sequence for every role.

`roles.Single` is the one process of `--workers 1`. With `--workers N` (N > 1),
`supervisor.Supervisor` binds every listener, keeps the one state store and serves
MSMP and the metrics, and N `worker.Worker` processes serve POP3 on the inherited
listeners; `messages` is their typed control plane, `channel` the pipe that carries it,
`aggregate` sums what the workers report, `restarts` says when a dead worker is replaced.
See docs/architecture.md.
"""
