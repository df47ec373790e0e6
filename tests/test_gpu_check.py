"""benchmarks/gpu_check.py without a GPU: the plan it prints, its time budget, the test selection, the report it
assembles from measurements, and the parts that can run on the CPU with a tiny HAT."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, tiny_hat_config
from benchmarks import bench_train
from benchmarks import gpu_check as gc
from hat.inference.memory import is_out_of_memory
from hat.utils.options import build_parser, parse_options


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def forbid(*_args, **_kwargs):
    raise AssertionError('heavy work started without CUDA')


# ----- without CUDA -----
def test_without_cuda_prints_the_plan_of_every_part_and_runs_nothing(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    for name in ('run_parts', 'run_group', 'run_child_part', 'inference_part', 'train_part', 'tiles_part',
                 'torchrun_part', 'tests_part'):
        monkeypatch.setattr(gc, name, forbid)
    monkeypatch.setattr(subprocess, 'Popen', forbid)
    monkeypatch.delenv('OUT', raising=False)
    monkeypatch.chdir(tmp_path)

    assert gc.main([]) == 0
    printed = capsys.readouterr().out
    assert 'CUDA is not available' in printed
    for part in gc.PARTS:
        assert gc.PART_TITLES[part] in printed
    # each part's share of the default 420 s budget
    assert '[42 s]' in printed and '[189 s]' in printed and '[76 s]' in printed
    assert 'tests/test_detect.py::test_build_on_cuda' in printed
    assert list(tmp_path.iterdir()) == []  # no report asked for: no file left in the working directory

    out = tmp_path / 'sub' / 'report.md'
    assert gc.main(['--out', str(out), '--parts', 'tiles,inference', '--budget-s', '100']) == 0
    text = out.read_text()
    assert gc.PART_TITLES['inference'] in text and gc.PART_TITLES['tiles'] in text
    assert gc.PART_TITLES['torchrun'] not in text
    assert text.index(gc.PART_TITLES['inference']) < text.index(gc.PART_TITLES['tiles'])  # the fixed order


def test_out_defaults_to_the_out_folder(monkeypatch, tmp_path):
    monkeypatch.setenv('OUT', str(tmp_path))
    assert gc.default_out() == tmp_path / 'gpu_check.md'
    monkeypatch.delenv('OUT')
    monkeypatch.chdir(tmp_path)
    assert gc.default_out() == tmp_path / 'gpu_check.md'


def test_bad_arguments_are_refused():
    for argv in (['--parts', 'inference,speed'], ['--budget-s', '0'], ['--parts', ',']):
        with pytest.raises(SystemExit):
            gc.parse_args(argv)


# ----- time budget -----
def test_parts_share_the_budget_cumulatively():
    deadlines = gc.part_deadlines(gc.PARTS, 420, 1000.0)
    assert math.isclose(deadlines['tests'], 1000 + 42)
    assert math.isclose(deadlines['torchrun'], 1420)  # the last part ends with the budget
    ends = [deadlines[p] for p in gc.PARTS]
    assert ends == sorted(ends)
    two = gc.part_deadlines(['inference', 'tiles'], 114, 0.0)  # renormalised over the parts asked for
    assert math.isclose(two['inference'], 114 * 0.45 / 0.57) and math.isclose(two['tiles'], 114)


def test_deadline_fits_what_is_left():
    clock = FakeClock(0.0)
    deadline = gc.Deadline.after(30, clock)
    assert deadline.fits(30) and not deadline.fits(31)
    clock.now = 25
    assert math.isclose(deadline.remaining(), 5) and not deadline.fits(6)


def test_time_left_by_a_part_goes_to_the_next_and_a_part_without_time_is_skipped():
    clock = FakeClock()
    limits = {}

    def runner(part, limit, _workdir):
        limits[part] = limit
        clock.now += {'inference': 10, 'train': 1000}[part]  # inference ends early, train overruns everything
        return [{'kind': 'row', 'part': part}]

    found = gc.run_parts(['inference', 'train', 'tiles'], 72, keep=False, runner=runner, clock=clock)
    assert math.isclose(limits['inference'], 45)
    assert math.isclose(limits['train'], 60 - 10)  # its 15 s plus the 35 s inference left
    assert 'tiles' not in limits
    assert found['tiles'][0][0]['kind'] == 'skip' and found['tiles'][1] == 0
    assert found['inference'] == ([{'kind': 'row', 'part': 'inference'}], 10)


def test_inference_items_that_do_not_fit_are_skipped_before_anything_is_built(monkeypatch):
    monkeypatch.setattr(gc, 'build', forbid)
    emit = gc.Recorder()
    gc.inference_part(gc.Deadline.after(1.0), emit, device=torch.device('cpu'), size=(16, 16))
    skipped = [r for r in emit.records if r['kind'] == 'skip']
    assert [(r['variant'], r['path']) for r in skipped] == gc.inference_schedule(gc.INFERENCE_VARIANTS,
                                                                                 gc.INFERENCE_PATHS)
    assert all('s left' in r['why'] for r in skipped)


def test_schedules_put_what_the_comparison_needs_first():
    assert gc.inference_schedule(['HAT', 'HAT-L'], ['official', 'compile-bf16', 'bf16', 'compile']) == [
        ('HAT', 'official'), ('HAT', 'bf16'), ('HAT-L', 'official'), ('HAT-L', 'bf16'),
        ('HAT', 'compile-bf16'), ('HAT-L', 'compile-bf16'), ('HAT', 'compile'), ('HAT-L', 'compile')]
    assert gc.train_schedule(['HAT-S', 'HAT'], ['official', 'bf16', 'fp32']) == [
        ('HAT-S', 'official'), ('HAT-S', 'bf16'), ('HAT', 'official'), ('HAT', 'bf16'), ('HAT-S', 'fp32'),
        ('HAT', 'fp32')]
    assert gc.forward_guess({}, 'HAT') == gc.FIRST_FORWARD_GUESS_S
    assert gc.forward_guess({'HAT': 1.5}, 'HAT-L') == 3.0
    first = gc.inference_estimate('compile', 1.0, 4, set())
    assert first > gc.inference_estimate('compile', 1.0, 4, {'compile'}) > gc.inference_estimate('fp32', 1.0, 4, set())


# ----- subprocesses and records -----
def test_a_subprocess_past_its_limit_is_stopped_and_its_output_kept():
    outcome = gc.run_group([sys.executable, '-c', 'import time; print("started", flush=True); time.sleep(60)'],
                           timeout=1)
    assert outcome.timed_out and outcome.returncode is None and 'started' in outcome.output
    done = gc.run_group([sys.executable, '-c', 'import sys; print("ok"); sys.exit(3)'], timeout=60)
    assert not done.timed_out and done.returncode == 3 and done.output.strip() == 'ok'


def test_records_survive_a_cut_off_line_and_name_the_unfinished_item(tmp_path):
    path = tmp_path / 'part.jsonl'
    emit = gc.Recorder(path)
    emit('start', item='HAT official')
    emit('row', item='HAT official', times=[1.0])
    emit('start', item='HAT-L official')
    with open(path, 'a') as handle:
        handle.write('{"kind": "row", "item": "HAT-L off')  # the writer was killed here
    records = gc.read_records(path)
    assert records == emit.records
    assert gc.unfinished_item(records) == 'HAT-L official'
    assert gc.unfinished_item(records[:2]) is None


def test_pytest_summary_line():
    assert gc.pytest_summary('.s\nSKIPPED [1] x.py:3: no\n1 passed, 1 skipped in 2.01s\n') == \
        '1 passed, 1 skipped in 2.01s'
    assert gc.pytest_summary('==== 2 failed, 1 error in 3.0s ====') == '2 failed, 1 error in 3.0s'
    assert gc.pytest_summary('Traceback ...').startswith('no pytest summary line')


# ----- (a) selection of the tests that need CUDA -----
def test_the_tests_that_need_cuda_are_found_by_what_they_mention(tmp_path):
    tests = tmp_path / 'tests'
    tests.mkdir()
    (tests / 'test_one.py').write_text(textwrap.dedent('''
        import pytest, torch
        requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')

        @pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')
        def test_skipif():
            pass

        @requires_cuda
        def test_named_mark():
            pass

        @pytest.mark.cuda
        def test_marker():
            pass

        def test_runtime_skip():
            if not torch.cuda.is_available():
                pytest.skip('no GPU')

        def test_fakes_cuda_on_the_cpu():
            assert torch.device('cuda').type == 'cuda'

        def helper_on_cuda():
            pass

        @requires_cuda
        class TestGroup:
            def test_inside(self):
                pass

        class TestPlain:
            @pytest.mark.skipif(not torch.cuda.is_available(), reason='x')
            def test_method(self):
                pass

            def test_cpu_method(self):
                pass
    '''))
    (tests / 'test_two.py').write_text(textwrap.dedent('''
        import pytest, torch
        pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='CUDA only')

        def test_anything():
            pass
    '''))
    (tests / 'helpers.py').write_text('def test_not_collected():\n    import torch.cuda\n')
    assert gc.cuda_test_ids(tests, root=tmp_path) == [
        'tests/test_one.py::test_skipif', 'tests/test_one.py::test_named_mark', 'tests/test_one.py::test_marker',
        'tests/test_one.py::test_runtime_skip', 'tests/test_one.py::TestGroup::test_inside',
        'tests/test_one.py::TestPlain::test_method', 'tests/test_two.py::test_anything']


def test_the_suites_cuda_tests():
    ids = gc.cuda_test_ids(REPO / 'tests')
    assert 'tests/test_detect.py::test_build_on_cuda' in ids
    assert 'tests/test_cuda.py::test_golden_outputs_on_cuda' in ids  # the module's skipif mark
    # CPU tests that fake CUDA (the precision policy, the device check of hat-upscale, this file)
    assert not any(module in i for module in ('test_precision', 'test_upscale', 'test_gpu_check') for i in ids)


# ----- report assembly from fake measurements -----
GIB = 2**30


def inference_records() -> list[dict]:
    return [
        {'kind': 'setup', 'size': [480, 640], 'warmup': 1, 'repeats': 3},
        {'kind': 'start', 'item': 'HAT official'},
        {'kind': 'row', 'item': 'HAT official', 'variant': 'HAT', 'path': 'official', 'times': [2.0, 2.2, 2.1],
         'setup_s': 3.0, 'peak_bytes': 10 * GIB},
        {'kind': 'row', 'item': 'HAT fp32', 'variant': 'HAT', 'path': 'fp32', 'times': [1.5, 1.5, 1.5],
         'setup_s': 2.0, 'peak_bytes': 6 * GIB, 'max_diff': 2e-6},
        {'kind': 'row', 'item': 'HAT bf16', 'variant': 'HAT', 'path': 'bf16', 'times': [0.5, 0.5, 0.6],
         'setup_s': 1.0, 'peak_bytes': 4 * GIB, 'psnr': 55.0},
        {'kind': 'row', 'item': 'HAT-L official', 'variant': 'HAT-L', 'path': 'official', 'times': [4.0],
         'setup_s': 5.0, 'peak_bytes': 20 * GIB, 'note': '1 of 3 timed runs (time)'},
        {'kind': 'row', 'item': 'HAT-L bf16', 'variant': 'HAT-L', 'path': 'bf16', 'times': [1.0],
         'setup_s': 1.0, 'peak_bytes': 12e9, 'psnr': 45.0},
        {'kind': 'row', 'item': 'HAT compile-bf16', 'variant': 'HAT', 'path': 'compile-bf16', 'times': [],
         'setup_s': 40.0, 'peak_bytes': None, 'error': 'BackendCompilerFailed: no C compiler'},
        {'kind': 'skip', 'item': 'HAT compile', 'variant': 'HAT', 'path': 'compile',
         'why': 'needs about 70 s, 9 s left'},
        {'kind': 'start', 'item': 'HAT-L compile-bf16'},
        {'kind': 'stopped', 'limit_s': 189.0, 'item': 'HAT-L compile-bf16'},
    ]


def test_inference_table_against_the_official_rows_and_the_targets():
    section = gc.inference_section(inference_records())
    text = '\n'.join(section.lines)
    assert '| HAT | official | 2.100 | 3 | 1.00x | 10240 | 1.00 | baseline | - |' in text
    assert '| HAT | fp32 | 1.500 | 3 | 1.40x | 6144 | 0.60 | max diff 2.0e-06 (ok) | NOT met / NOT met |' in text
    assert '| HAT | bf16 | 0.500 | 3 | 4.20x | 4096 | 0.40 | PSNR 55.0 dB (ok) | met / met |' in text
    assert '| HAT-L | official | 4.000 | 1 (1 of 3 timed runs (time)) |' in text
    assert 'PSNR 45.0 dB (LOW)' in text
    assert '| HAT | compile-bf16 (compile 40 s) | failed: BackendCompilerFailed: no C compiler |' in text
    assert 'HAT-L x4 at 480x640, bf16: peak 12.00 GB, target < 10 GB: NOT met' in text
    assert 'Skipped HAT compile: needs about 70 s, 9 s left.' in text
    assert 'while running HAT-L compile-bf16' in text
    assert 'both targets met by HAT bf16' in section.result


def test_training_table_and_summary():
    records = [
        {'kind': 'setup', 'batch': 4, 'patch': 64, 'warmup': 2, 'iters': 5},
        {'kind': 'row', 'variant': 'HAT-S', 'mode': 'official', 'times': [0.4, 0.4], 'peak_bytes': 8 * GIB,
         'growth_bytes': 7 * GIB, 'loss': 0.25},
        {'kind': 'row', 'variant': 'HAT-S', 'mode': 'bf16', 'times': [0.1, 0.1], 'peak_bytes': 3 * GIB,
         'growth_bytes': 2 * GIB, 'loss': 0.25},
        {'kind': 'row', 'variant': 'HAT', 'mode': 'official', 'times': [], 'error': 'OutOfMemoryError: CUDA'},
    ]
    section = gc.train_section(records)
    text = '\n'.join(section.lines)
    assert '| HAT-S | bf16 | 0.100 | 10.00 | 4.00x | 3072 | 0.38 | 2048 | 0.2500 | met / met |' in text
    assert '| HAT | official | failed: OutOfMemoryError: CUDA |' in text
    assert section.result == '2 rows measured; HAT-S bf16 4.00x vs official'


def test_tiles_table_says_which_check_held():
    records = [
        {'kind': 'setup', 'size': [240, 320], 'tile_pad': 32, 'device': 'cuda:0', 'variant': 'HAT'},
        {'kind': 'row', 'item': 'whole', 'case': 'untiled', 'tile': None, 'peak_bytes': 3 * GIB, 'seconds': 0.3},
        {'kind': 'row', 'item': 'forced budget', 'case': 'tile auto, forced budget', 'retries': [], 'target': 96,
         'budget_bytes': GIB, 'tile': 96, 'memory_model': {'fixed_bytes': 100 * gc.MIB, 'per_pixel_bytes': 40960},
         'peak_bytes': 0.9 * GIB, 'seconds': 0.8, 'psnr': 48.0, 'max_diff': 0.01},
        {'kind': 'row', 'item': 'simulated OOM', 'case': 'tile auto, out-of-memory error raised once',
         'retries': [], 'tile': None, 'peak_bytes': GIB, 'seconds': 0.5, 'psnr': 60.0, 'max_diff': 0.0},
        {'kind': 'row', 'item': 'real OOM', 'case': 'tile auto, real OOM', 'retries': [[320, 160], [160, 80]],
         'tile': 80, 'cap_bytes': 1.5 * GIB, 'peak_bytes': GIB, 'seconds': 1.0, 'psnr': 47.0, 'max_diff': 0.02},
    ]
    section = gc.tiles_section(records)
    text = '\n'.join(section.lines)
    assert '| tile auto, forced budget | 96 | 1024 | 922 | 0.80 | PSNR 48.0 dB, max diff 1.0e-02; peak within ' \
           'budget | ok |' in text
    assert '| tile auto, out-of-memory error raised once | whole image |' in text  # no retry happened: not ok
    assert '| tile auto, real OOM | 80 (out of memory: 320->160 160->80) | 1536 |' in text
    assert section.result == '2 ok, 1 not ok'


def test_tests_and_torchrun_sections_and_the_whole_report():
    tests = gc.tests_section([{'kind': 'pytest', 'ids': ['tests/test_detect.py::test_build_on_cuda'],
                               'command': 'python -m pytest -q', 'returncode': 0, 'timed_out': False, 'seconds': 9.0,
                               'summary': '1 passed in 2.10s', 'skipped': [], 'tail': ''}])
    assert tests.result == '1 passed in 2.10s'
    missing = gc.tests_section([{'kind': 'error', 'text': 'pytest is not installed'}])
    assert missing.result == 'pytest is not installed'
    torchrun = gc.torchrun_section([
        {'kind': 'row', 'item': 'first', 'command': 'python -m torch.distributed.run ...', 'returncode': 0,
         'timed_out': False, 'seconds': 12.0, 'tail': ''},
        {'kind': 'check', 'name': 'resumed', 'ok': True}, {'kind': 'check', 'name': 'nccl', 'ok': False}])
    assert torchrun.result == '1 of 2 checks passed' and '- [ ] nccl' in torchrun.lines
    skipped = gc.torchrun_section([{'kind': 'skip', 'item': 'the whole part', 'why': '3 s left of the 420 s budget'}])
    assert skipped.result == 'not completed'

    inference = gc.inference_section(inference_records())
    inference.seconds = 150
    report = gc.assemble_report(['GPU: NVIDIA H200 (139 GiB).', 'torch 2.14.1, CUDA 13.0'],
                                [tests, inference, torchrun, skipped], budget_s=420, took_s=400)
    assert report.startswith('# HAT on a GPU: first check\n\nGPU: NVIDIA H200 (139 GiB).\ntorch 2.14.1, CUDA 13.0')
    assert 'budget 420 s, took 400 s' in report
    assert 'at least 2x the official computation\'s speed and at most 0.5x its memory' in report
    assert f'| {gc.PART_TITLES["inference"]} | {inference.result} | 150 |' in report
    for part in ('tests', 'inference', 'torchrun'):
        assert f'## {gc.PART_TITLES[part]}' in report


# ----- the pieces that run on the CPU -----
def test_tiny_training_option_file_parses_and_torchrun_command(tmp_path):
    gc.write_tiny_image_set(tmp_path / 'data')
    opt_file = tmp_path / 'tiny.yml'
    opt_file.write_text(yaml.safe_dump(gc.tiny_training_options(tmp_path / 'data', 'gpu_check_test', 10)))
    with pytest.warns(UserWarning, match='running on the CPU'):
        opt, _ = parse_options(str(REPO), is_train=True, argv=['-opt', str(opt_file)])
    assert opt['network_g']['type'] == 'HAT' and opt['num_gpu'] == 0 and opt['train']['total_iter'] == 10
    assert opt['dist_params']['backend'] == 'nccl'
    from basicsr.data import build_dataset
    pair = build_dataset(opt['datasets']['train'])[0]
    assert pair['gt'].shape == (3, 32, 32) and pair['lq'].shape == (3, 16, 16)

    command = gc.torchrun_command(opt_file, '--auto_resume', '--force_yml', 'train:total_iter=15')
    assert command[:5] == [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=1']
    train_py = command.index(str(REPO / 'hat' / 'train.py'))
    args = build_parser().parse_args(command[train_py + 1:])
    assert args.launcher == 'pytorch' and args.auto_resume and args.force_yml == ['train:total_iter=15']


def test_resume_checks_read_the_experiment_folder(tmp_path):
    exp = tmp_path / 'exp'
    (exp / 'training_states').mkdir(parents=True)
    (exp / 'models').mkdir()
    torch.save({'iter': 10, 'optimizers': []}, exp / 'training_states' / '10.state')
    torch.save({'iter': 15, 'optimizers': []}, exp / 'training_states' / '15.state')
    (exp / 'models' / 'net_g_15.pth').write_bytes(b'x')
    (exp / 'train_a.log').write_text('INFO: Device: cuda, 1 processes\n')
    (exp / 'train_b.log').write_text('INFO: Resuming training from /x/10.state: epoch 4, iter 10.\n'
                                     'INFO: Device: cuda, 1 processes\n')
    checks = gc.torchrun_checks(exp, 10, 15, output='')
    assert all(c['ok'] for c in checks), checks
    checks = gc.torchrun_checks(exp, 10, 15, output='dist_params.backend is nccl but ...: falling back to gloo.')
    assert [c['ok'] for c in checks] == [True, True, True, True, False]
    (exp / 'train_b.log').write_text('INFO: iter 10 done\n')  # no resume line: not resumed
    assert not gc.torchrun_checks(exp, 10, 15, output='')[1]['ok']


def test_out_of_memory_raised_once_looks_like_cudas():
    calls = []
    wrapped = gc.OutOfMemoryOnce(lambda x: calls.append(x) or x)
    x = torch.zeros(1, 3, 8, 8)
    with pytest.raises(RuntimeError) as caught:
        wrapped(x)
    assert is_out_of_memory(caught.value) and calls == []
    assert wrapped(x) is x and len(calls) == 1


def test_tiles_part_on_the_cpu_with_a_tiny_hat(tmp_path):
    emit = gc.Recorder(tmp_path / 'tiles.jsonl')
    gc.tiles_part(gc.Deadline.after(600), emit, device=torch.device('cpu'), size=(24, 32), tile_pad=4,
                  config=tiny_hat_config(upscale=2, depths=(1,)))
    rows = {r['item']: r for r in emit.records if r['kind'] == 'row'}
    assert rows['whole']['tile'] is None
    forced = rows['forced budget']
    assert 'error' not in forced and forced['target'] == gc.forced_tile_side(24, 32, 4) == 8
    assert forced['tile'] == 8 and forced['retries'] == []  # the budget forced the target tile, no retry needed
    simulated = rows['simulated OOM']
    assert simulated['retries'] == [(32, 16)] and simulated['tile'] == 16 and simulated['psnr'] > 20
    assert {'kind': 'skip', 'item': 'real OOM', 'why': 'needs CUDA'} in emit.records
    assert len(gc.read_records(tmp_path / 'tiles.jsonl')) == len(emit.records)


def test_inference_part_on_the_cpu_with_a_tiny_hat():
    emit = gc.Recorder()
    gc.inference_part(gc.Deadline.after(600), emit, device=torch.device('cpu'), variants=('HAT',),
                      paths=('official', 'fp32'), size=(16, 24), repeats=2,
                      configs={'HAT': tiny_hat_config(upscale=4, depths=(1,))})
    rows = [r for r in emit.records if r['kind'] == 'row']
    assert [(r['path'], len(r['times'])) for r in rows] == [('official', 2), ('fp32', 2)]
    assert rows[1]['max_diff'] < 1e-5 and rows[0]['peak_bytes'] is None  # no allocator peak off CUDA
    assert '| HAT | fp32 |' in '\n'.join(gc.inference_section(emit.records).lines)


def test_train_part_on_the_cpu_with_a_tiny_hat(monkeypatch):
    monkeypatch.setattr(bench_train, 'network_config', lambda variant, scale=4: tiny_hat_config(upscale=4))
    emit = gc.Recorder()
    gc.train_part(gc.Deadline.after(600), emit, device=torch.device('cpu'), variants=('HAT-S',),
                  modes=('official', 'fp32'), batch=1, patch=16, warmup=1, iters=1)
    rows = [r for r in emit.records if r['kind'] == 'row']
    assert [r['mode'] for r in rows] == ['official', 'fp32']
    assert all('error' not in r and len(r['times']) == 1 and math.isfinite(r['loss']) for r in rows)
    assert rows[0]['loss'] == pytest.approx(rows[1]['loss'], rel=1e-4)  # same network, same data, same seed


def test_the_masked_attention_kernel_probe_reports_a_refusal_instead_of_raising():
    # On the CPU the memory-efficient kernel exists for no head size: every answer is a refusal.
    note = gc.masked_attention_kernels(torch.device('cpu'), heads=2, tokens=16)
    assert note.startswith('Memory-efficient attention with an additive mask')
    for answer in ('fp32 heads of 30: no', 'fp32 heads of 32: no', 'bf16 heads of 30: no', 'bf16 heads of 32: no'):
        assert answer in note


@pytest.mark.slow
def test_torchrun_part_on_the_cpu_trains_resumes_and_only_misses_nccl():
    # Part (e) as the GPU run will do it, here with the nccl option falling back to gloo: two torchrun jobs, the
    # second resumed; every check that does not need CUDA must hold, and the experiment folder is removed.
    system_temp = Path(tempfile.gettempdir())
    left_before = set(system_temp.glob('torchelastic_*'))
    emit = gc.Recorder()
    gc.torchrun_part(gc.Deadline.after(300), emit, first=5, more=5)  # a state every 5 iterations
    assert set(system_temp.glob('torchelastic_*')) == left_before  # torchrun's log folders went with the part's own
    rows = [r for r in emit.records if r['kind'] == 'row']
    assert [(r['item'], r['returncode']) for r in rows] == [('first', 0), ('resume', 0)], rows
    checks = {c['name']: c['ok'] for c in emit.records if c['kind'] == 'check'}
    assert checks == {'first run saved training_states/5.state': True, 'the second run resumed from iter 5': True,
                      'training_states/10.state holds iter 10': True, 'models/net_g_10.pth written': True,
                      'ran on CUDA with NCCL (no gloo fallback)': False}
    assert gc.torchrun_section(emit.records).result == '4 of 5 checks passed'
    assert not list((REPO / 'experiments').glob('gpu_check_*'))


def test_torchrun_part_removes_the_archived_experiment_folder_too(monkeypatch):
    # A second run that cannot resume archives the first run's folder as <name>_archived_<time>: it goes as well.
    def fake_run(command, *, timeout, cwd, env):
        name = Path(command[command.index('-opt') + 1]).stem
        for folder in (name, f'{name}_archived_20261206_120000'):
            (REPO / 'experiments' / folder).mkdir(parents=True, exist_ok=True)
        return gc.Outcome(0, False, 0.1, '')

    monkeypatch.setattr(gc, 'run_group', fake_run)
    emit = gc.Recorder()
    gc.torchrun_part(gc.Deadline.after(60), emit)
    assert [r['item'] for r in emit.records if r['kind'] == 'row'] == ['first', 'resume']
    assert not list((REPO / 'experiments').glob('gpu_check_*'))


def test_the_report_is_written_after_each_part(monkeypatch, tmp_path):
    # A run stopped from outside (the GPU machine's time limit) must leave what the finished parts found.
    out = tmp_path / 'gpu_check.md'
    tests_records = [{'kind': 'pytest', 'ids': ['tests/test_cuda.py::test_x'], 'command': 'python -m pytest',
                      'returncode': 0, 'timed_out': False, 'seconds': 5.0, 'summary': '1 passed in 4.00s',
                      'skipped': [], 'tail': ''}]
    seen = {}

    def fake_run_parts(parts, budget_s, *, keep, after_part):
        found = {'tests': (tests_records, 5.0)}
        after_part(found)
        seen['between'] = out.read_text()
        found['torchrun'] = ([{'kind': 'check', 'name': 'resumed', 'ok': True}], 20.0)
        return found

    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(gc, 'environment_lines', lambda device: ['GPU: a test double.'])
    monkeypatch.setattr(gc, 'run_parts', fake_run_parts)
    assert gc.main(['--out', str(out), '--parts', 'tests,torchrun']) == 0
    between, final = seen['between'], out.read_text()
    assert '| (a) CUDA tests of the suite | 1 passed in 4.00s | 5 |' in between
    assert f'Written while running: {gc.PART_TITLES["torchrun"]} not done yet.' in between
    assert f'## {gc.PART_TITLES["torchrun"]}' not in between
    assert 'not done yet' not in final and f'## {gc.PART_TITLES["torchrun"]}' in final
    assert set(json.loads(out.with_suffix('.json').read_text())['parts']) == {'tests', 'torchrun'}
