"""One process per compared computation, driven in turn: interleaved timing without a shared heap.

Timing two computations in one process lets each change the other's speed through the C allocator: on a Zen 4
(2 threads), the official computation's HAT-S training iteration (batch 4, 48x48) took 8.6-11 s in a process of its
own and 17.6-19 s in a process that also stepped our fp32 and bf16 models in turn; its page faults per iteration
went from 0.6-1.9M to 2.4-3.0M. Ours moved by about 10%. Timing them in one process flattered the speed-ups 1.5-2x.

:class:`Worker` runs ``script --worker SPEC`` (SPEC a JSON object) and talks to it over its stdin and stdout, one
JSON object per line: the worker builds and warms up what SPEC names, answers ``ready``, then answers each request
line with one reply line. The driver waits for each reply before sending the next request, so that one worker
computes at a time while the others wait on their stdin. Their memory stays resident, with what the C allocator keeps
for reuse: a run needs the memory of all its workers at once (HAT-S training at batch 4, 48x48, between two steps:
official 8.7 GiB, fp32 9.3 GiB, bf16 3.1 GiB resident, 21 GiB together). Workers write their replies with
:func:`reply`; any other line a worker prints (a library's log) is skipped.

Two identical workers stepped this way (HAT-S bf16 training, Zen 4, six rounds) gave per-round ratios of 0.89-1.03,
median 1.00: no bias from the process itself, and the same per-round noise as in one process.

A worker can measure what its process spends on a request besides the wall time (:func:`timed_with_usage`): CPU
time in user and system mode and page faults. They tell computation from memory management: on the Zen 4 above, the
official HAT-S iteration spent 2.8-4.3 s of system time on 1.1-1.8M page faults, ours none (0-10 faults).

Those faults come from glibc's malloc: a block above its mmap threshold (32 MiB at most) is mapped fresh and returned
to the kernel when freed, so every large tensor is faulted in page by page again at each iteration.
:data:`HEAP_REUSE_ENV` (the benchmarks' ``--heap-reuse``) starts the workers with malloc serving such blocks from its
heap and keeping freed memory, which takes the faults away after the warm-up: the tables then compare computation
alone. On the Zen 4, the official HAT-S iteration took 8.2-8.3 s that way against 10.5-11.8 s by default, and the
official forward of HAT x4 at 128x128 9.7-10.1 s against 15.4-16.3 s.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from typing import Callable, Mapping, TextIO

from hat.utils.heap import KEEP_FREED_MEMORY_ENV

try:
    import resource
except ImportError:  # Windows
    resource = None

REPLY_MARK = '@worker '

# glibc malloc: blocks up to 1 GiB from the heap (not mapped fresh), freed memory kept (trimmed only above 2 GiB),
# the heap grown 64 MiB at a time; read by glibc at the process's start. What hat-upscale and hat/test.py set.
HEAP_REUSE_ENV = KEEP_FREED_MEMORY_ENV
HEAP_REUSE_NOTE = ('glibc malloc set to keep freed memory for reuse (--heap-reuse: ' +
                   ', '.join(f'{name}={value}' for name, value in HEAP_REUSE_ENV.items()) + ')')


def add_heap_reuse_argument(parser) -> None:
    """The benchmarks' ``--heap-reuse`` option (pass ``args.heap_reuse`` to :class:`WorkerPool`)."""
    parser.add_argument('--heap-reuse', action='store_true',
                        help='start the timed workers with glibc malloc keeping freed memory (no page faults after '
                             'the warm-up: computation alone; see benchmarks/workers.py)')


def heap_reuse_in(environment: Mapping[str, str]) -> bool:
    """Whether ``environment`` holds every setting of :data:`HEAP_REUSE_ENV`."""
    return all(environment.get(name) == value for name, value in HEAP_REUSE_ENV.items())


def heap_reuse_in_force() -> bool:
    """Whether this process was started with :data:`HEAP_REUSE_ENV` (each worker tells its driver, see
    :func:`serve`)."""
    return heap_reuse_in(os.environ)


def reply(message: dict, stream: TextIO | None = None) -> None:
    """Send one message to the driver (from the worker process)."""
    stream = stream or sys.stdout
    stream.write(REPLY_MARK + json.dumps(message) + '\n')
    stream.flush()


def serve(setup: Callable[[], tuple[Callable[[dict], dict], dict]], requests: TextIO | None = None) -> None:
    """The worker's loop: ``setup()`` builds and warms up and returns the request handler and what to tell the driver
    (replied with ``ready: True`` and ``heap_reuse``, :func:`heap_reuse_in_force`); its failure is replied as
    ``{'error': ...}`` and ends the worker. Then each request line (JSON) is answered with ``handle(request)``, until
    the driver closes stdin."""
    try:
        handle, info = setup()
    except Exception as error:  # reported by the driver in its table
        reply({'error': f'{type(error).__name__}: {str(error).splitlines()[0][:100] if str(error) else ""}'})
        return
    reply({'ready': True, 'heap_reuse': heap_reuse_in_force(), **info})
    for line in requests or sys.stdin:
        if line.strip():
            reply(handle(json.loads(line)))


def process_usage() -> dict[str, float]:
    """This process's use of the machine so far: ``user_s`` and ``system_s`` (CPU seconds of all its threads) and
    ``faults`` (page faults, minor and major); empty where the ``resource`` module is missing."""
    if resource is None:
        return {}
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {'user_s': usage.ru_utime, 'system_s': usage.ru_stime, 'faults': usage.ru_minflt + usage.ru_majflt}


def timed_with_usage(run: Callable[[], float]) -> dict[str, float]:
    """``run()`` (which returns its own wall time in seconds, measured where it synchronises its device) as
    ``{'seconds': ..., 'user_s': ..., 'system_s': ..., 'faults': ...}``: what the process spent during the call (the
    last three missing where :func:`process_usage` is empty)."""
    before = process_usage()
    seconds = run()
    after = process_usage()
    return {'seconds': seconds, **{key: after[key] - before[key] for key in before}}


def usage_cell(replies: list[dict]) -> str:
    """A table cell for the replies of :func:`timed_with_usage`: the medians over the replies of the user and system
    CPU seconds and of the page faults, ``'14.3 / 0.02 s, 0.00M'``; ``'-'`` without them."""
    if not replies or any('user_s' not in r for r in replies):
        return '-'
    median = {key: statistics.median(r[key] for r in replies) for key in ('user_s', 'system_s', 'faults')}
    return f'{median["user_s"]:.1f} / {median["system_s"]:.2f} s, {median["faults"] / 1e6:.2f}M'


class Worker:
    """The driver's side of one worker process.

    Args:
        script: the Python file to run as ``script --worker SPEC``.
        spec: what the worker is to build (JSON-serialisable).
        env: its environment (default: this process's).
    """

    def __init__(self, script: str, spec: dict, env: dict | None = None) -> None:
        self.process = subprocess.Popen([sys.executable, script, '--worker', json.dumps(spec)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=env)
        self.ready = self._read()

    def request(self, message: dict) -> dict:
        """Send one request and wait for its reply (an ``error`` reply when the worker is gone, e.g. killed by the
        kernel for memory while the others computed)."""
        try:
            self.process.stdin.write(json.dumps(message) + '\n')
            self.process.stdin.flush()
        except BrokenPipeError:
            return self._exited()
        return self._read()

    def close(self) -> None:
        """End the worker (it exits when its stdin closes) and wait for it."""
        if self.process.stdin and not self.process.stdin.closed:
            try:
                self.process.stdin.close()
            except BrokenPipeError:  # it is gone already, with a request unread
                pass
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def _read(self) -> dict:
        for line in self.process.stdout:
            if line.startswith(REPLY_MARK):
                return json.loads(line[len(REPLY_MARK):])
        return self._exited()

    def _exited(self) -> dict:
        self.process.wait()
        code = self.process.returncode
        killed = ' (SIGKILL: out of memory? see dmesg)' if code == -9 else ''
        return {'error': f'the worker process exited with code {code}{killed} without a reply; its error is above'}


class WorkerPool:
    """Workers by label, for a driver: started one at a time (their warm-ups do not overlap), closed together (also
    as a context manager). A worker that fails to start, or whose reply to a request is an error, is closed and
    dropped from :attr:`workers`, its error kept in :attr:`errors`.

    Args:
        script: as for :class:`Worker`.
        specs: label -> the spec of its worker, in the order to start them.
        envs: label -> that worker's environment (default: this process's).
        heap_reuse: start every worker with :data:`HEAP_REUSE_ENV` added to its environment. Either way each
            started worker must confirm how it runs (a table's header says so), else RuntimeError: with the
            settings where ``heap_reuse`` is set or its environment in ``envs`` holds them (a comparison of
            environments), without them otherwise (not inherited unasked from this process's).
    """

    def __init__(self, script: str, specs: dict[str, dict], envs: dict[str, dict] | None = None, *,
                 heap_reuse: bool = False) -> None:
        self.workers: dict[str, Worker] = {}  # the running ones (after close: the labels that ran to the end)
        self.ready: dict[str, dict] = {}  # each running worker's ready reply
        self.errors: dict[str, str] = {}
        try:
            expected: dict[str, bool] = {}
            for label, spec in specs.items():
                env = (envs or {}).get(label)
                expected[label] = heap_reuse or (env is not None and heap_reuse_in(env))
                if heap_reuse:
                    env = {**(os.environ if env is None else env), **HEAP_REUSE_ENV}
                worker = Worker(script, spec, env)
                if 'error' in worker.ready:
                    self.errors[label] = worker.ready['error']
                    worker.close()
                else:
                    self.workers[label], self.ready[label] = worker, worker.ready
            wrong = [label for label, ready in self.ready.items() if ready['heap_reuse'] is not expected[label]]
            if wrong:
                asked = ', '.join(f'{label} {"with" if expected[label] else "without"}' for label in wrong)
                raise RuntimeError(f'workers did not start as asked for the malloc settings of --heap-reuse '
                                   f'({asked}): is MALLOC_* set in this environment?')
        except BaseException:
            self.close()
            raise

    def request(self, label: str, message: dict) -> dict | None:
        """The reply of ``label``'s worker to ``message``, or None when it replied an error (see the class doc)."""
        answer = self.workers[label].request(message)
        if 'error' in answer:
            self.errors[label] = answer['error']
            self.workers.pop(label).close()
            return None
        return answer

    def close(self) -> None:
        for worker in self.workers.values():
            worker.close()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
