"""Greenlets that carry one burst of a session after another, instead of a new one per burst.

A parked session holds no greenlet (geventpop3.net.transport): every burst of client input
(each command of a plain POP3 client) runs in a greenlet started for it. A new greenlet
costs more than it looks: on Python 3.11 its first frame needs a data-stack chunk of
its own (16 KiB, mmap), given back when it ends (munmap), and the fresh pages fault in
on first touch: about 14 µs per burst on this project's machine, over 200 µs of a full
session's 1.3-1.7 ms. A runner that has served a burst instead waits, idle, for the
next one and keeps its chunk. At most `keep` runners wait (the idle ones of a load peak
end): a fixed few hundred KiB per process (a chunk and a saved stack slice each), not
memory per session; a held session still holds no greenlet.

The runners are gevent Greenlets: a session's `greenlet` is the runner serving it, and
killing it (shutdown) raises GreenletExit in the burst, as before. After `close()` (the
process is stopping) a runner ends once its burst is done, so joining it returns.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gevent
from gevent.hub import get_hub

KEEP = 32  # idle runners kept at most: more than the bursts a loaded process has in flight at once


class Runners:
    """A stack of idle runner greenlets and the way to hand one a burst."""

    __slots__ = ("idle", "keep", "closed", "_hub")

    def __init__(self, keep: int = KEEP) -> None:
        self.idle: list[gevent.Greenlet[..., Any]] = []
        self.keep = keep
        self.closed = False
        self._hub = get_hub()

    def spawn(self, function: Callable[..., object], *args: object) -> gevent.Greenlet[..., Any]:
        """Run `function(*args)` in an idle runner (or a new one) from the next loop iteration,
        as gevent.spawn would; returns the runner. Also a StreamServer's `spawn`."""
        idle = self.idle
        if idle:
            runner = idle.pop()
            self._hub.loop.run_callback(runner.switch, function, args)
            return runner
        # The first burst in a list the runner empties: a Greenlet keeps its arguments while it
        # runs, and a runner runs long (they would keep the first session alive).
        return gevent.spawn(self._run, [(function, args)])

    def _run(self, first: list[tuple[Callable[..., object], tuple[object, ...]]]) -> None:
        """A runner's life: a burst, then wait in the hub for the next one (or end)."""
        function, args = first.pop()
        runner = gevent.getcurrent()
        switch = self._hub.switch
        idle = self.idle
        while True:
            function(*args)
            function = args = None  # type: ignore[assignment]  # nothing of the burst kept while idle
            if self.closed or len(idle) >= self.keep:
                return
            idle.append(runner)  # type: ignore[arg-type]
            function, args = switch()

    def close(self) -> None:
        """No runner waits any more: the idle ones end now, busy ones after their burst."""
        self.closed = True
        idle, self.idle = self.idle, []
        gevent.killall(idle, block=False)
