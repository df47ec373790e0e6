"""benchmarks.workers: one process per timed computation, driven in turn over pipes; and bench_train on top of it."""
from __future__ import annotations

import io
import json
import os
import sys
import textwrap

import pytest
import torch

from conftest import REPO

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import alternate, bench_inference, bench_train, workers  # noqa: E402
from hat.archs import linear as linear_module  # noqa: E402
from hat.archs.hat_arch import HAT  # noqa: E402
from hat.utils import heap  # noqa: E402


def replies(text: str) -> list[dict]:
    return [json.loads(line[len(workers.REPLY_MARK):]) for line in text.splitlines()
            if line.startswith(workers.REPLY_MARK)]


def test_serve_answers_each_request_after_ready(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(sys, 'stdout', out)
    workers.serve(lambda: ((lambda request: {'double': 2 * request['x']}), {'setup_s': 1.5}),
                  requests=io.StringIO('{"x": 3}\n\n{"x": -1}\n'))
    assert replies(out.getvalue()) == [{'ready': True, 'heap_reuse': False, 'setup_s': 1.5}, {'double': 6},
                                       {'double': -2}]


def test_serve_replies_a_failed_setup_and_stops(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(sys, 'stdout', out)

    def setup():
        raise RuntimeError('no compiler found\nlong trace')

    workers.serve(setup, requests=io.StringIO('{"x": 1}\n'))
    assert replies(out.getvalue()) == [{'error': 'RuntimeError: no compiler found'}]


def test_timed_with_usage_counts_the_page_faults_of_fresh_memory():
    """The process's page faults during the call: touching 64 MiB of fresh pages faults thousands of times, a call
    that touches nothing hardly at all; the wall time is the one the call returns."""
    if workers.resource is None:
        pytest.skip('no resource module on this system')

    def touch_fresh_memory() -> float:
        block = bytearray(64 << 20)  # zero pages: each is faulted in when written
        block[::4096] = b'x' * len(block[::4096])
        return 0.25

    touched = workers.timed_with_usage(touch_fresh_memory)
    idle = workers.timed_with_usage(lambda: 0.5)
    assert touched['seconds'] == 0.25 and idle['seconds'] == 0.5
    assert touched['faults'] >= 8000 > idle['faults']  # 16384 pages of 4 KiB (fewer where huge pages serve)
    assert touched['user_s'] >= 0 and touched['system_s'] >= 0


def test_usage_cell_gives_the_medians():
    replies_ = [{'seconds': 1, 'user_s': 14.0, 'system_s': 0.5, 'faults': 2_000_000},
                {'seconds': 1, 'user_s': 16.0, 'system_s': 0.01, 'faults': 10},
                {'seconds': 1, 'user_s': 15.0, 'system_s': 0.02, 'faults': 1_500_000}]
    assert workers.usage_cell(replies_) == '15.0 / 0.02 s, 1.50M'
    assert workers.usage_cell([{'seconds': 1}]) == '-'  # no resource module
    assert workers.usage_cell([]) == '-'


SCRIPT = textwrap.dedent('''
    import json, os, sys
    sys.path.insert(0, {repo!r})
    from benchmarks import workers
    spec = json.loads(sys.argv[2])
    print('a library logging to stdout', flush=True)
    if spec.get('crash'):
        sys.exit(3)
    def handle(request):
        if request.get('fail'):
            return {{'error': 'asked to fail'}}
        return {{'sum': spec['base'] + request['x'], 'pid': os.getpid(),
                 'variable': os.environ.get('HAT_SOME_VARIABLE'),
                 'threshold': os.environ.get('MALLOC_MMAP_THRESHOLD_')}}
    workers.serve(lambda: (handle, {{'base': spec['base']}}))
''')


@pytest.fixture
def script(tmp_path):
    path = tmp_path / 'worker.py'
    path.write_text(SCRIPT.format(repo=str(REPO)))
    return str(path)


def test_workers_keep_their_state_in_processes_of_their_own(script):
    first, second = workers.Worker(script, {'base': 10}), workers.Worker(script, {'base': 100})
    try:
        # the line printed before the reply is skipped
        assert first.ready == {'ready': True, 'heap_reuse': False, 'base': 10}
        answers = [first.request({'x': 1}), second.request({'x': 2}), first.request({'x': 3})]
        assert [a['sum'] for a in answers] == [11, 102, 13]
        assert answers[0]['pid'] == answers[2]['pid'] == first.process.pid != second.process.pid
    finally:
        first.close()
        second.close()
    assert first.process.returncode == 0 and second.process.returncode == 0


def test_a_worker_that_dies_is_an_error_not_a_hang(script):
    worker = workers.Worker(script, {'base': 0, 'crash': True})
    assert 'exited with code 3 without a reply' in worker.ready['error']
    worker.close()


def test_a_pool_drops_the_workers_that_fail_and_keeps_their_errors(script):
    specs = {'first': {'base': 1}, 'crashes': {'base': 0, 'crash': True}, 'second': {'base': 2}}
    with workers.WorkerPool(script, specs) as pool:
        assert list(pool.workers) == ['first', 'second'] and list(pool.ready) == ['first', 'second']
        assert 'exited with code 3' in pool.errors['crashes']
        assert pool.request('second', {'x': 5})['sum'] == 7
        assert pool.request('first', {'fail': True}) is None
        assert pool.errors['first'] == 'asked to fail' and list(pool.workers) == ['second']
        running = pool.workers['second'].process
    assert running.returncode == 0  # closed on leaving the block


def test_a_worker_killed_while_it_waits_is_dropped_and_the_others_go_on(script):
    """As when the kernel kills a worker for memory while another computes: the next request to it is an error that
    says so (not a broken pipe that ends the whole run), and the pool closes without raising."""
    with workers.WorkerPool(script, {'first': {'base': 1}, 'second': {'base': 2}}) as pool:
        pool.workers['first'].process.kill()
        pool.workers['first'].process.wait()
        assert pool.request('first', {'x': 'y' * 100_000}) is None  # more than a pipe's buffer: the write fails
        assert 'exited with code -9 (SIGKILL: out of memory? see dmesg)' in pool.errors['first']
        assert pool.request('second', {'x': 5})['sum'] == 7


def test_heap_reuse_starts_the_workers_with_the_malloc_settings_and_checks_them(script, monkeypatch):
    """heap_reuse: each worker's environment (this process's, or the one given) plus the malloc settings, which the
    worker confirms; a pool whose workers run otherwise than asked is refused (a header would misstate how they
    ran)."""
    monkeypatch.setenv('HAT_SOME_VARIABLE', 'kept')
    environment = {**os.environ, 'HAT_SOME_VARIABLE': 'given'}
    with workers.WorkerPool(script, {'first': {'base': 1}, 'second': {'base': 2}}, {'second': environment},
                            heap_reuse=True) as pool:
        assert all(ready['heap_reuse'] for ready in pool.ready.values())
        first, second = pool.request('first', {'x': 0}), pool.request('second', {'x': 0})
    assert (first['variable'], second['variable']) == ('kept', 'given')
    assert first['threshold'] == second['threshold'] == str(1 << 30)
    with workers.WorkerPool(script, {'first': {'base': 1}}) as pool:
        assert pool.ready['first']['heap_reuse'] is False
    # An environment given for one worker may hold the settings (alternate.py --env compares environments).
    with workers.WorkerPool(script, {'first': {'base': 1}, 'second': {'base': 2}},
                            {'second': {**os.environ, **workers.HEAP_REUSE_ENV}}) as pool:
        assert (pool.ready['first']['heap_reuse'], pool.ready['second']['heap_reuse']) == (False, True)
        assert pool.request('second', {'x': 0})['threshold'] == str(1 << 30)
    for name, value in workers.HEAP_REUSE_ENV.items():
        monkeypatch.setenv(name, value)
    assert workers.heap_reuse_in_force()
    with pytest.raises(RuntimeError, match=r'workers did not start as asked for the malloc settings of --heap-reuse '
                                           r'\(first without, second without\)'):
        workers.WorkerPool(script, {'first': {'base': 1}, 'second': {'base': 2}})
    monkeypatch.delenv('MALLOC_TRIM_THRESHOLD_')
    assert not workers.heap_reuse_in_force()


def test_bench_train_times_each_mode_in_its_own_process(tmp_path):
    """Two tiny modes, two rounds: a row per mode with its speed-up and the range of the rounds."""
    out = tmp_path / 'train.md'
    report = bench_train.main(['--variants', 'HAT-S', '--modes', 'official,fp32', '--batch', '1', '--patch', '16',
                               '--iters', '2', '--warmup', '1', '--no-memory', '--out', str(out)])
    assert out.read_text() == report + '\n'
    assert 'each mode in a process of its own; 2 interleaved rounds after 1 warm-up' in report
    rows = {line.split(' | ')[1]: line.split(' | ') for line in report.splitlines() if line.startswith('| HAT-S')}
    assert set(rows) == {'official', 'fp32'}
    official, fp32 = float(rows['official'][2]), float(rows['fp32'][2])
    assert rows['official'][4] == '1.00x'
    speed_up, rounds = rows['fp32'][4].split('x (rounds ')
    assert float(speed_up) == pytest.approx(official / fp32, rel=0.02) and rounds.endswith('x)')
    assert rows['official'][7] == rows['fp32'][7]  # the same loss after the warm-up: same weights, same batch
    if workers.resource is not None:  # each mode's own CPU time: at least its iteration's time on one thread
        for mode, row in rows.items():
            user_s = float(row[8].split(' / ')[0])
            assert user_s >= 0.5 * float(row[2]) and row[8].endswith('M |'), mode


def confirmed_heap_reuse(module, monkeypatch) -> list[bool]:
    """What the workers of ``module``'s pools said of the malloc settings in their ready replies, recorded."""
    said = []

    class RecordingPool(workers.WorkerPool):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            said.extend(ready['heap_reuse'] for ready in self.ready.values())

    monkeypatch.setattr(module, 'WorkerPool', RecordingPool)
    return said


def test_bench_train_with_heap_reuse_starts_its_workers_with_the_malloc_settings(monkeypatch):
    """The workers confirm the settings in force and the header says how they ran."""
    said = confirmed_heap_reuse(bench_train, monkeypatch)
    report = bench_train.main(['--variants', 'HAT-S', '--modes', 'fp32', '--batch', '1', '--patch', '16',
                               '--iters', '1', '--warmup', '1', '--no-memory', '--heap-reuse'])
    assert f'each mode in a process of its own; {workers.HEAP_REUSE_NOTE}; 1 interleaved rounds' in report
    assert any(line.startswith('| HAT-S | fp32 | ') for line in report.splitlines())
    assert said == [True]


def test_bench_inference_runs_each_path_in_its_own_process_with_the_same_weights(tmp_path, monkeypatch):
    """HAT-S x4 on a 16x16 image with a checkpoint: the official computation and our fp32 path, each in its own
    worker, compute the same function of the same weights (the outputs come back from the workers); with
    --heap-reuse, which the workers confirm."""
    said = confirmed_heap_reuse(bench_inference, monkeypatch)
    weights = tmp_path / 'hat_s.pth'
    torch.manual_seed(1)
    torch.save({'params_ema': HAT(**bench_inference.network_config('HAT-S')).state_dict()}, weights)
    report = bench_inference.main(['--variants', 'HAT-S', '--sizes', '16', '--paths', 'official,fp32', '--repeats',
                                   '2', '--no-memory', '--weights', str(weights), '--heap-reuse'])
    assert (f'each path in a process of its own; {workers.HEAP_REUSE_NOTE}; 2 interleaved rounds after 1 warm-up; '
            'weights') in report
    assert said == [True, True]
    rows = {line.split(' | ')[2]: line.split(' | ') for line in report.splitlines() if line.startswith('| HAT-S')}
    assert set(rows) == {'official', 'fp32'}
    assert rows['official'][-1] == 'baseline |'
    if workers.resource is not None:  # each path's own CPU time per forward, next to its wall time
        for path, row in rows.items():
            assert float(row[-2].split(' / ')[0]) >= 0.5 * float(row[3]), path
    max_diff = float(rows['fp32'][-1].removeprefix('max diff ').removesuffix(' |'))
    assert max_diff < 1e-5
    assert float(rows['fp32'][5].removesuffix('x')) == pytest.approx(float(rows['official'][3]) /
                                                                     float(rows['fp32'][3]), rel=0.02)


def test_memory_children_size_attention_calls_as_the_timed_workers(monkeypatch):
    """The memory child's allocator setting (blocks of 128 KiB up mapped afresh) would shrink HAT's attention calls
    (hat.archs.hat_arch.CALL_BUFFER_BYTES follows the heap): each child is told the size the timed workers' heap
    gives them instead, glibc's default or --heap-reuse's."""
    for name in ('MALLOC_MMAP_THRESHOLD_', 'GLIBC_TUNABLES'):
        monkeypatch.delenv(name, raising=False)
    specs = []
    monkeypatch.setattr(bench_inference, 'child_peak_mib', lambda script, spec, timeout, label: specs.append(spec))
    for heap_reuse in (False, True):
        bench_inference.measure_memory('HAT-S', 16, 'fp32', torch.device('cpu'), 1, 60.0, heap_reuse)
    assert [spec['call_buffer_bytes'] for spec in specs] == [heap.DEFAULT_REUSED_BLOCK, 1 << 30]


TINY_ALTERNATE = ['--task', 'inference', '--variant', 'HAT-S', '--size', '16', '--rounds', '2', '--warmup', '0']


def test_alternate_needs_a_setting_b_and_well_formed_variables(capsys):
    with pytest.raises(SystemExit):
        alternate.parse_args(TINY_ALTERNATE)
    assert 'give setting B: --set MODULE.NAME=VALUE and/or --env NAME=VALUE' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        alternate.parse_args([*TINY_ALTERNATE, '--env', 'THP_MEM_ALLOC_ENABLE'])
    assert "expected NAME=VALUE" in capsys.readouterr().err
    assert alternate.parse_args([*TINY_ALTERNATE, '--env', 'A_B=x=1']).env == [('A_B', 'x=1')]


def test_alternate_says_whether_the_rounds_show_a_difference():
    """The sign test's interval of the median ratio: with 8 rounds it runs from the 2nd smallest ratio to the 2nd
    largest (coverage 1 - 2 * 9/256 = 0.93; the 3rd would give 0.71); 4 rounds are too few for 90%."""
    ratios = [1.30, 0.95, 1.10, 1.02, 1.07, 1.04, 0.99, 1.12]
    assert alternate.median_interval(ratios) == (0.99, 1.12)
    assert alternate.median_interval(ratios[:5]) == (0.95, 1.30)  # 1 - 2/32: the extremes
    assert alternate.median_interval(ratios[:4]) is None
    assert alternate.ratio_evidence(ratios) == ('B faster in 6 of 8 rounds; median ratio within 0.990-1.120 with 90% '
                                                'confidence: no difference shown.')
    assert alternate.ratio_evidence([r + 0.05 for r in ratios]).endswith('within 1.040-1.170 with 90% confidence: '
                                                                          'B is faster.')
    assert alternate.ratio_evidence([0.9] * 6).startswith('B faster in 0 of 6 rounds')
    assert alternate.ratio_evidence([0.9] * 6).endswith('A is faster.')
    assert 'too few rounds' in alternate.ratio_evidence([1.2, 1.3])


def test_alternate_worker_b_runs_with_the_constants_set(monkeypatch, tmp_path):
    """In-process: worker B's set-up sets the --set constants for good (restored here by monkeypatch), reports what
    it sees, and a request with an output file gets the forward's output written there."""
    monkeypatch.setattr(linear_module, 'ROW_CHUNK', linear_module.ROW_CHUNK)
    monkeypatch.setenv('HAT_PROBE', 'b')
    argv = [*TINY_ALTERNATE, '--set', 'hat.archs.linear.ROW_CHUNK=64', '--env', 'HAT_PROBE=b']
    timed, seen = alternate.run_worker({'argv': argv, 'setting': 'B'})
    assert seen == {'constants': {'hat.archs.linear.ROW_CHUNK': 64}, 'environment': {'HAT_PROBE': 'b'}}
    assert linear_module.ROW_CHUNK == 64
    answer = timed({'output_file': str(tmp_path / 'out.pt')})
    assert answer['seconds'] > 0 and torch.load(tmp_path / 'out.pt').shape == (1, 3, 64, 64)


def test_alternate_with_an_environment_variable_runs_a_and_b_in_processes_of_their_own(monkeypatch):
    """The variable reaches B's process only (the driver checks what each worker sees and stops otherwise); the
    same computation gives the same output."""
    monkeypatch.delenv('HAT_PROBE', raising=False)
    report = alternate.main([*TINY_ALTERNATE, '--env', 'HAT_PROBE=b'])
    assert 'B: environment HAT_PROBE=b (A and B each in a process of its own). 2 rounds' in report
    rows = [line for line in report.splitlines() if line.startswith('| ') and line[2].isdigit()]
    assert len(rows) == 2
    assert 'Largest difference between the outputs of A and B: 0.00e+00' in report


def test_alternate_runs_module_constants_in_processes_of_their_own_when_asked(monkeypatch):
    """--processes: B's worker sets the constant, A's keeps the driver's value (each checked by the driver)."""
    before = linear_module.ROW_CHUNK
    report = alternate.main([*TINY_ALTERNATE, '--set', 'hat.archs.linear.ROW_CHUNK=64', '--processes'])
    assert 'B: hat.archs.linear.ROW_CHUNK = 64 (A and B each in a process of its own). 2 rounds' in report
    assert linear_module.ROW_CHUNK == before  # the driver's own constants are untouched
    largest = float(report.split('Largest difference between the outputs of A and B: ')[1].rstrip('.'))
    assert largest < 1e-5


def test_alternate_with_fresh_processes_starts_a_new_pair_for_each_round(monkeypatch):
    """--fresh-processes: one pool of workers A and B per round, each checked, the same computation alike."""
    pools = []
    pool_class = alternate.WorkerPool
    monkeypatch.setattr(alternate, 'WorkerPool', lambda *args, **kwargs: pools.append(1) or pool_class(*args,
                                                                                                        **kwargs))
    report = alternate.main([*TINY_ALTERNATE, '--set', 'hat.archs.linear.ROW_CHUNK=64', '--fresh-processes'])
    assert len(pools) == 2
    assert ('B: hat.archs.linear.ROW_CHUNK = 64 (A and B each in a process of its own, a new pair for each round). '
            '2 rounds') in report
    assert len([line for line in report.splitlines() if line.startswith('| ') and line[2].isdigit()]) == 2
    assert float(report.split('Largest difference between the outputs of A and B: ')[1].rstrip('.')) < 1e-5


def test_alternate_stops_when_a_worker_does_not_see_its_constants(monkeypatch):
    """The driver's constant differs from what a fresh process imports (as when a constant is computed at import
    differently in the driver): setting A's worker does not see the driver's value, and the comparison stops."""
    imported = linear_module.ROW_CHUNK
    monkeypatch.setattr(linear_module, 'ROW_CHUNK', 512)
    with pytest.raises(RuntimeError, match=f"setting A: its process sees {{'hat.archs.linear.ROW_CHUNK': {imported}}}"):
        alternate.main([*TINY_ALTERNATE, '--set', 'hat.archs.linear.ROW_CHUNK=64', '--processes'])
