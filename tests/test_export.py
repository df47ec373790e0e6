"""ONNX export: the export path is the same function as the network, and the exported file reproduces it.

Three layers of proof:
* eager: :class:`ExportableHAT` reproduces the official golden outputs (1e-5) and the default forward at sizes that
  exercise every branch of the in-graph padding (reflect, replicate, none), batches of two, unshifted networks;
* ONNX: a file exported from golden weights reproduces PyTorch on ONNX Runtime at three sizes, none a multiple of
  the window, and the official golden output of a padded input (1e-4); its inputs, outputs and metadata are checked;
* command line: exit statuses and messages, the shipped demo model end to end (slow).

The released variants are built at full size on the meta device and traced there (shapes only); their ONNX export is
tested on depth-reduced copies (one RHAG of two HABs, everything else as released), because a full-depth export
takes minutes (HAT-S x4: about 1.5 CPU minutes, HAT-L about twice that).
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hat
from conftest import GOLDEN, GOLDEN_CASES, REPO, golden_config, golden_io, golden_net, tiny_hat_config
from hat.archs.export_forward import ExportableHAT
from hat.archs.hat_arch import HAT
from hat.archs.srvgg_arch import SRVGGNetCompact

RELEASED = [f'{variant}_SRx{scale}' for variant in ('HAT-S', 'HAT', 'HAT-L') for scale in (2, 3, 4)]
DEMO = REPO / 'experiments' / 'pretrained_models' / 'HAT-demo_SRx4.pth'
EAGER_TOLERANCE = 1e-5
ONNX_TOLERANCE = 1e-4


def released_config(name: str) -> dict:
    cfg = dict(json.loads((GOLDEN / f'manifest_{name}.json').read_text())['network_g'])
    cfg.pop('type')
    return cfg


def not_window_multiples(window: int) -> list[tuple[int, int, int]]:
    """(batch, height, width) of three inputs, none a multiple of the window: reflect, batch of two, replicate."""
    return [(1, window + 3, 2 * window - 3), (2, window // 2 + 1, window + 5), (1, 2, 5)]


# ---------------------------------------------------------------------------------------------------------------
# The export path in eager PyTorch
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('case', GOLDEN_CASES)
def test_export_path_reproduces_golden_outputs(case):
    net = golden_net(case)
    io = golden_io(case)
    with torch.no_grad():
        out = ExportableHAT(network=net)(io['input'])
    assert out.shape == io['output'].shape
    assert (out - io['output']).abs().max().item() <= EAGER_TOLERANCE


def test_export_path_pads_and_crops_like_the_official_model():
    io = golden_io('hat_tiny_x2_padded')
    net = golden_net(io['checkpoint'].removesuffix('.pth'))
    with torch.no_grad():
        out = ExportableHAT(network=net)(io['input'])
    assert out.shape == (1, 3, 42, 70)
    assert (out - io['output']).abs().max().item() <= EAGER_TOLERANCE


@pytest.mark.parametrize('img_size', [16, 4], ids=['shifted', 'unshifted'])
def test_export_path_equals_default_forward_at_any_size(img_size):
    """Window 4: 1x1 and 2x7 replicate (pad >= side), 9x6 and 3x5 reflect, 8x12 needs no padding."""
    torch.manual_seed(0)
    net = HAT(**tiny_hat_config(depths=(2, 2), img_size=img_size, conv_scale=0.5)).eval()
    exportable = ExportableHAT(network=net)
    for batch, height, width in [(1, 1, 1), (1, 2, 7), (2, 9, 6), (1, 3, 5), (2, 8, 12)]:
        x = torch.rand(batch, 3, height, width)
        with torch.no_grad():
            expected, got = net(x), exportable(x)
        assert got.shape == (batch, 3, 2 * height, 2 * width)
        assert (got - expected).abs().max().item() <= EAGER_TOLERANCE, (batch, height, width)


def test_export_path_refuses_absolute_position_embedding():
    with pytest.raises(ValueError, match='ape=True'):
        ExportableHAT(network=HAT(**tiny_hat_config(ape=True)))


@pytest.mark.parametrize('name', RELEASED)
def test_released_variant_traces_at_full_size(name):
    """The full released network (meta device: shapes only, no weights) runs through the export path."""
    cfg = released_config(name)
    with torch.device('meta'):
        net = HAT(**cfg).eval()
        out = ExportableHAT(network=net)(torch.empty(1, 3, 19, 27))
    assert out.shape == (1, 3, 19 * cfg['upscale'], 27 * cfg['upscale'])


# ---------------------------------------------------------------------------------------------------------------
# ONNX files
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def onnx_tools():
    onnx = pytest.importorskip('onnx', reason='ONNX export needs onnx (pip install onnx onnxruntime onnxscript)')
    ort = pytest.importorskip('onnxruntime', reason='checking the export needs onnxruntime (pip install onnxruntime)')
    pytest.importorskip('onnxscript', reason='torch.onnx.export needs onnxscript (pip install onnxscript)')
    return onnx, ort


def run_onnx(ort, path: Path, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    return torch.from_numpy(session.run(['output'], {'input': x.numpy()})[0])


def assert_reproduces(ort, path: Path, net: torch.nn.Module, sizes, channels: int = 3) -> None:
    for batch, height, width in sizes:
        x = torch.rand(batch, channels, height, width)
        with torch.no_grad():
            expected = net(x)
        got = run_onnx(ort, path, x)
        assert got.shape == expected.shape
        assert (got - expected).abs().max().item() <= ONNX_TOLERANCE, (batch, height, width)


@pytest.fixture(scope='module')
def golden_export(onnx_tools, tmp_path_factory):
    """hat_tiny_x2 (official golden weights, window 8) exported once: (path, network, result)."""
    from hat.export import export_network
    net = golden_net('hat_tiny_x2')
    sha = hashlib.sha256((GOLDEN / 'hat_tiny_x2.pth').read_bytes()).hexdigest()
    path = tmp_path_factory.mktemp('export') / 'tiny.onnx'
    result = export_network(net, path, source_sha256=sha, check_sizes=not_window_multiples(8))
    return path, net, result


def test_onnx_reproduces_pytorch_at_three_sizes_off_the_window_grid(onnx_tools, golden_export):
    _, ort = onnx_tools
    path, net, result = golden_export
    assert [check.input_shape[2:] for check in result.checks] == [s[1:] for s in not_window_multiples(8)]
    assert result.max_abs_diff <= ONNX_TOLERANCE
    torch.manual_seed(1)  # other inputs than the export's own check
    assert_reproduces(ort, path, net, [(1, 11, 13), (2, 9, 21), (1, 5, 3)])


def test_onnx_reproduces_the_official_output_of_a_padded_input(onnx_tools, golden_export):
    _, ort = onnx_tools
    io = golden_io('hat_tiny_x2_padded')  # 21x35: padded to 24x40 in the graph
    got = run_onnx(ort, golden_export[0], io['input'])
    assert (got - io['output']).abs().max().item() <= ONNX_TOLERANCE


def test_onnx_file_inputs_outputs_and_metadata(onnx_tools, golden_export):
    onnx, _ = onnx_tools
    path, _, _ = golden_export
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert max(entry.version for entry in model.opset_import if entry.domain in ('', 'ai.onnx')) >= 17

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    (graph_input, ), (graph_output, ) = model.graph.input, model.graph.output
    assert (graph_input.name, graph_output.name) == ('input', 'output')
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert graph_output.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert dims(graph_input) == ['batch', 3, 'height', 'width']
    assert dims(graph_output) == ['batch', 3, '2*height', '2*width']
    meta = {entry.key: entry.value for entry in model.metadata_props}
    assert meta['architecture'] == 'HAT' and meta['variant'] == 'custom'
    assert (meta['scale'], meta['window_size']) == ('2', '8')
    assert meta['source_sha256'] == hashlib.sha256((GOLDEN / 'hat_tiny_x2.pth').read_bytes()).hexdigest()
    assert meta['hat_version'] == hat.__version__
    options = json.loads(meta['network_options'])
    for key in ('embed_dim', 'depths', 'window_size', 'conv_scale'):  # conv_scale (0.5) is not in the weights
        assert options[key] == golden_config('hat_tiny_x2')[key]


def test_a_graph_that_does_not_reproduce_the_network_is_not_written(onnx_tools, golden_export, monkeypatch,
                                                                    tmp_path):
    """The check runs on the file before it gets its name: a wrong graph leaves the old file and no temporary."""
    onnx, _ = onnx_tools
    import hat.export as export
    path, _, _ = golden_export
    exported = onnx.load(str(path))
    monkeypatch.setattr(export, 'trace_to_onnx', lambda module, **kwargs: exported)
    net = golden_net('hat_tiny_x2')
    with torch.no_grad():  # the network moves on; the graph (the old weights) no longer reproduces it
        net.layers[0].residual_group.overlap_attn.relative_position_bias_table.mul_(1.1)
    target = tmp_path / 'model.onnx'
    target.write_bytes(b'previous export')
    with pytest.raises(export.ExportCheckError, match='differ by up to'):
        export.export_network(net, target)
    assert target.read_bytes() == b'previous export'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['model.onnx']


def test_srvggnetcompact_exports(onnx_tools, tmp_path):
    onnx, ort = onnx_tools
    from hat.export import export_network
    torch.manual_seed(0)
    net = SRVGGNetCompact(num_feat=8, num_conv=2, upscale=4, act_type='prelu').eval()
    result = export_network(net, tmp_path / 'compact.onnx', source_sha256='0' * 64)
    assert result.max_abs_diff <= ONNX_TOLERANCE
    meta = {e.key: e.value for e in onnx.load(str(tmp_path / 'compact.onnx')).metadata_props}
    assert (meta['architecture'], meta['scale'], meta['window_size']) == ('SRVGGNetCompact', '4', '1')
    assert_reproduces(ort, tmp_path / 'compact.onnx', net, [(1, 7, 5), (2, 1, 3), (1, 17, 10)])


@pytest.mark.slow
@pytest.mark.parametrize('name', RELEASED)
def test_released_variant_exports_depth_reduced(onnx_tools, tmp_path, name):
    """Each released configuration with one RHAG of two HABs (a full-depth export takes minutes)."""
    _, ort = onnx_tools
    from hat.export import export_network
    cfg = released_config(name)
    cfg.update(depths=[2], num_heads=cfg['num_heads'][:1])
    torch.manual_seed(0)
    net = HAT(**cfg).eval()
    result = export_network(net, tmp_path / f'{name}.onnx', check_sizes=not_window_multiples(cfg['window_size']))
    assert result.max_abs_diff <= ONNX_TOLERANCE
    assert result.metadata['window_size'] == '16' and result.metadata['scale'] == str(cfg['upscale'])
    assert_reproduces(ort, tmp_path / f'{name}.onnx', net, [(1, 5, 21)])


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def run_cli(args: list[str], caplog) -> tuple[int, str]:
    from hat.export import main
    caplog.clear()
    status = main(args)
    return status, caplog.text


def test_cli_user_errors_exit_2_without_traceback(tmp_path, caplog):
    junk = tmp_path / 'junk.pth'
    torch.save({'params': {'encoder.weight': torch.zeros(2, 2)}}, junk)
    text = tmp_path / 'notes.pth'
    text.write_text('not a checkpoint')
    out = str(tmp_path / 'out.onnx')
    cases = [
        (['-m', str(tmp_path / 'missing.pth'), '-o', out], 'checkpoint not found'),
        (['-m', str(junk), '-o', out], 'not a HAT or SRVGGNetCompact checkpoint'),
        (['-m', str(text), '-o', out], str(text)),
        (['-m', str(DEMO), '-o', str(tmp_path / 'no_such_folder' / 'x.onnx')], 'does not exist'),
        (['-m', str(DEMO), '-o', out, '--fp16'], 'HAT overflows in fp16'),
        (['-m', str(DEMO), '-o', out, '--opset', '16'], 'opset 18 or later'),
    ]
    for args, message in cases:
        status, log = run_cli(args, caplog)
        assert status == 2, args
        assert message in log, (args, log)
        assert 'Traceback' not in log
    assert list(tmp_path.glob('*.onnx')) == []


def test_cli_says_what_to_install(tmp_path, caplog, monkeypatch):
    import hat.export as export
    monkeypatch.setattr(export, 'missing_modules', lambda: ['onnxruntime', 'onnxscript'])
    status, log = run_cli(['-m', str(DEMO), '-o', str(tmp_path / 'x.onnx')], caplog)
    assert status == 2 and 'pip install onnxruntime onnxscript' in log


@pytest.mark.slow
def test_cli_exports_the_shipped_demo_model(onnx_tools, tmp_path, caplog):
    onnx, ort = onnx_tools
    from hat.archs.detect import build_from_checkpoint
    out = tmp_path / 'demo.onnx'
    status, log = run_cli(['-m', str(DEMO), '-o', str(out)], caplog)
    assert status == 0, log
    assert 'max abs difference' in log
    meta = {e.key: e.value for e in onnx.load(str(out)).metadata_props}
    assert meta['source_sha256'] == hashlib.sha256(DEMO.read_bytes()).hexdigest()
    assert (meta['architecture'], meta['scale'], meta['window_size']) == ('HAT', '4', '8')
    torch.manual_seed(2)
    assert_reproduces(ort, out, build_from_checkpoint(DEMO), not_window_multiples(8))


@pytest.mark.slow
def test_python_m_hat_export_reports_a_missing_checkpoint(tmp_path):
    result = subprocess.run([sys.executable, '-m', 'hat.export', '-m', str(tmp_path / 'none.pth'), '-o',
                             str(tmp_path / 'x.onnx')], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert 'checkpoint not found' in result.stderr and 'Traceback' not in result.stderr
