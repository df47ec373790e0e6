"""The Cog predictor (predict.py), called in-process and served over HTTP by Cog's own server as ``make serve`` runs it.

In-process: ``Predictor.setup()`` and ``run()`` called directly, with the shipped HAT-demo model (its output is
pixel-identical to hat-upscale's) and with tiny checkpoints in a folder of their own (model switching, the options,
names that leave the folder). Served (slow): ``python -m cog.server.http`` on a free port of 127.0.0.1, real HTTP
requests with data URLs: a photo, a corrupt upload (that prediction fails, naming the problem), another photo (still
served), the model loaded once.

Needs ``cog`` and ``coglet`` (the Cog SDK and its HTTP server); skipped without them.
"""
from __future__ import annotations

import base64
import gc
import importlib.util
import inspect
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from conftest import REPO, smooth_image, tiny_hat_config

pytest.importorskip('coglet', reason='coglet (the Cog HTTP server) is not installed: pip install cog coglet')
pytest.importorskip('cog', reason='cog (the Cog SDK) is not installed: pip install cog coglet')

from cog import FieldInfo  # noqa: E402

from hat.archs.hat_arch import HAT  # noqa: E402
from hat.inference import Upscaler  # noqa: E402
from hat.inference.precision import PRECISION_CHOICES  # noqa: E402
from hat.io.images import OUTPUT_FORMATS as WRITABLE_FORMATS  # noqa: E402
from hat.io.images import UnreadableImageError, read_picture  # noqa: E402
from hat.upscale import main as hat_upscale  # noqa: E402

DEMO_MODEL = REPO / 'experiments' / 'pretrained_models' / 'HAT-demo_SRx4.pth'
SERVER_START_TIMEOUT = 180  # seconds: importing torch and hat on a busy two-core machine takes most of it
REQUEST_TIMEOUT = 300
BUSY_RETRY_SECONDS = 30  # how long a prediction is asked again while the server says its slot is busy
# Starts like a PNG, then garbage: the kind of upload a client truncates or mislabels.
CORRUPT_PNG = b'\x89PNG\r\n\x1a\n' + b'not really a png' * 4


@pytest.fixture(scope='module')
def predict_module():
    """predict.py loaded from the repository root, as Cog loads it (by file)."""
    spec = importlib.util.spec_from_file_location('predict', REPO / 'predict.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # setup() would set this test session's own malloc for the rest of the run (hat.utils.heap); the servers that
    # the tests start as processes of their own set theirs.
    module.keep_freed_memory = lambda **options: False
    return module


def write_photo(path: Path, seed: int, h: int, w: int) -> Path:
    """A photo-like PNG: smooth shading, an edge and fine noise (sizes need not be multiples of the window)."""
    rng = np.random.default_rng(seed)
    img = smooth_image(rng, h, w).astype(np.int16)
    img[:, w // 2:] -= 60
    img += rng.integers(-12, 13, size=img.shape, dtype=np.int16)
    cv2.imwrite(str(path), np.clip(img, 0, 255).astype(np.uint8))
    return path


def hat_upscale_output(image: Path, model: Path, out_dir: Path, *extra: str) -> np.ndarray:
    """What ``hat-upscale`` writes for ``image`` (fp32, png)."""
    assert hat_upscale(['-i', str(image), '-o', str(out_dir), '-m', str(model), '--precision', 'fp32', '-q',
                        *extra]) == 0
    (written,) = out_dir.glob('*.png')
    return cv2.imread(str(written), cv2.IMREAD_UNCHANGED)


def run_inputs(predictor_class) -> dict:
    """The declared defaults of ``run()``'s inputs (what Cog passes for an input the request leaves out)."""
    inputs = {}
    for name, parameter in inspect.signature(predictor_class.run).parameters.items():
        if name != 'self' and isinstance(parameter.default, FieldInfo):
            inputs[name] = parameter.default.default
    return inputs


def run_with_defaults(predictor, **inputs):
    """``predictor.run()`` with the declared defaults for the inputs not given (the model: the predictor's own)."""
    return predictor.run(**{**run_inputs(type(predictor)), 'model': predictor.default_model, **inputs})


# ---------------------------------------------------------------------------------------------------------------
# The declarations
# ---------------------------------------------------------------------------------------------------------------


def test_cog_yaml_points_at_the_predictor():
    config = yaml.safe_load((REPO / 'cog.yaml').read_text())
    assert config['predict'] == 'predict.py:Predictor'
    build = config['build']
    assert build['gpu'] is True
    assert build['python_version'] == '3.11'
    assert (REPO / build['python_requirements']).is_file()
    import cog
    assert build['sdk_version'] == cog.__version__, 'cog.yaml pins another SDK than the one the tests run'


def test_input_declarations_match_the_engine(predict_module):
    """The Input() literals (Cog may read them from the source text) agree with the constants and the engine."""
    parameters = inspect.signature(predict_module.Predictor.run).parameters
    assert list(parameters)[1:] == ['image', 'model', 'tile', 'precision', 'self_ensemble', 'output_format']
    defaults = run_inputs(predict_module.Predictor)
    assert defaults['image'] is None and parameters['image'].annotation is not inspect.Parameter.empty
    assert defaults['model'] == predict_module.DEFAULT_MODEL == DEMO_MODEL.name and DEMO_MODEL.is_file()
    assert defaults['tile'] == 'auto' and defaults['precision'] == 'auto'
    assert defaults['self_ensemble'] is False and defaults['output_format'] == 'png'
    assert tuple(parameters['precision'].default.choices) == predict_module.PRECISIONS == PRECISION_CHOICES
    assert tuple(parameters['output_format'].default.choices) == predict_module.OUTPUT_FORMATS
    assert set(predict_module.OUTPUT_FORMATS) <= set(WRITABLE_FORMATS)


def test_parse_tile(predict_module):
    parse = predict_module.parse_tile
    assert parse('auto') == 'auto' and parse(' AUTO ') == 'auto'
    assert parse('0') is None and parse('none') is None
    assert parse('256') == 256
    for bad in ('abc', '-8', '1.5', ''):
        with pytest.raises(ValueError, match='tile'):
            parse(bad)


def test_setup_keeps_freed_memory_as_the_commands_do(predict_module, monkeypatch):
    """The server sets glibc's malloc to keep freed memory (hat.utils.heap; HAT_KEEP_FREED_MEMORY=0 turns it off),
    with the switch's default on, as hat-upscale: the Upscaler gives the memory back after each image."""
    calls = []
    monkeypatch.setattr(predict_module, 'keep_freed_memory', lambda **options: calls.append(options) or False)
    predict_module.Predictor().setup()
    assert calls == [{}]


# ---------------------------------------------------------------------------------------------------------------
# In-process, the shipped demo model
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def demo_predictor(predict_module):
    predictor = predict_module.Predictor()
    predictor.setup()
    return predictor


def test_prediction_equals_hat_upscale(demo_predictor, tmp_path):
    """Defaults (precision auto = fp32 on a CPU without native bf16, tile auto, png): the pixels of hat-upscale."""
    photo = write_photo(tmp_path / 'photo.png', seed=1, h=28, w=36)
    output = run_with_defaults(demo_predictor, image=photo)
    assert Path(output).suffix == '.png' and Path(output).parent != tmp_path
    served = cv2.imread(str(output), cv2.IMREAD_UNCHANGED)
    assert served.shape == (28 * 4, 36 * 4, 3)
    np.testing.assert_array_equal(served, hat_upscale_output(photo, DEMO_MODEL, tmp_path / 'cli'))


def test_bad_upload_fails_with_the_problem_and_the_next_one_works(demo_predictor, tmp_path):
    corrupt = tmp_path / 'upload.png'
    corrupt.write_bytes(CORRUPT_PNG)
    with pytest.raises(ValueError, match='cannot read the uploaded image: ') as caught:
        run_with_defaults(demo_predictor, image=corrupt)
    assert str(tmp_path) not in str(caught.value)  # the server's temporary path means nothing to the client
    photo = write_photo(tmp_path / 'photo.png', seed=2, h=20, w=16)
    assert cv2.imread(str(run_with_defaults(demo_predictor, image=photo))).shape == (80, 64, 3)


# ---------------------------------------------------------------------------------------------------------------
# In-process, tiny checkpoints in a folder of their own
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def models_dir(tmp_path_factory) -> Path:
    """``tiny_x2.pth`` and ``tiny_x3.pth`` (random tiny HATs), a non-checkpoint and a sub-folder."""
    folder = tmp_path_factory.mktemp('pretrained_models')
    for scale in (2, 3):
        torch.manual_seed(scale)
        net = HAT(**tiny_hat_config(upscale=scale))
        torch.save({'params_ema': net.state_dict()}, folder / f'tiny_x{scale}.pth')
    (folder / 'README.md').write_text('not a model')
    (folder / 'sub').mkdir()
    torch.save({'params_ema': HAT(**tiny_hat_config()).state_dict()}, folder / 'sub' / 'hidden_x2.pth')
    return folder


@pytest.fixture
def tiny_predictor(predict_module, models_dir, monkeypatch):
    """A Predictor serving ``models_dir`` (default ``tiny_x2.pth``); ``.loads`` lists the files it loaded."""
    loads = []
    real_load = predict_module.load_model

    def counting_load(path, **kwargs):
        loads.append(Path(path).name)
        return real_load(path, **kwargs)

    monkeypatch.setattr(predict_module, 'load_model', counting_load)
    predictor = set_up_tiny_predictor(predict_module, models_dir)
    predictor.loads = loads
    return predictor


def set_up_tiny_predictor(predict_module, models_dir: Path):
    """A Predictor serving ``models_dir`` (default ``tiny_x2.pth``), set up."""
    predictor = predict_module.Predictor()
    predictor.models_dir = models_dir
    predictor.default_model = 'tiny_x2.pth'
    predictor.setup()
    return predictor


def test_switching_models_reloads_only_on_change(tiny_predictor, tmp_path):
    photo = write_photo(tmp_path / 'photo.png', seed=3, h=12, w=10)
    assert tiny_predictor.loads == ['tiny_x2.pth']
    sizes = []
    for name in ('tiny_x2.pth', 'tiny_x2.pth', 'tiny_x3.pth', 'tiny_x3.pth', 'tiny_x2.pth'):
        output = run_with_defaults(tiny_predictor, image=photo, model=name)
        sizes.append(cv2.imread(str(output)).shape[:2])
    assert sizes == [(24, 20), (24, 20), (36, 30), (36, 30), (24, 20)]
    assert tiny_predictor.loads == ['tiny_x2.pth', 'tiny_x3.pth', 'tiny_x2.pth']


@pytest.mark.parametrize('name', ['../HAT-demo_SRx4.pth', 'sub/hidden_x2.pth', '/etc/passwd', '..', '', 'README.md',
                                  'missing.pth', 'sub'])
def test_model_names_outside_the_folder_are_refused(tiny_predictor, tmp_path, name):
    photo = write_photo(tmp_path / 'photo.png', seed=4, h=8, w=8)
    with pytest.raises(ValueError, match='Available: tiny_x2.pth, tiny_x3.pth') as caught:
        run_with_defaults(tiny_predictor, image=photo, model=name)
    assert 'model' in str(caught.value)
    assert tiny_predictor.loads == ['tiny_x2.pth']


def test_options(tiny_predictor, tmp_path):
    photo = write_photo(tmp_path / 'photo.png', seed=5, h=14, w=18)
    whole = cv2.imread(str(run_with_defaults(tiny_predictor, image=photo, tile='0')), cv2.IMREAD_UNCHANGED)
    assert whole.shape == (28, 36, 3)
    auto = cv2.imread(str(run_with_defaults(tiny_predictor, image=photo)), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(auto, whole)  # a small image fits: one piece
    tiled = cv2.imread(str(run_with_defaults(tiny_predictor, image=photo, tile='8')), cv2.IMREAD_UNCHANGED)
    assert tiled.shape == whole.shape
    ensemble = run_with_defaults(tiny_predictor, image=photo, self_ensemble=True)
    assert cv2.imread(str(ensemble)).shape == whole.shape
    for fmt in ('webp', 'jpg'):
        output = Path(run_with_defaults(tiny_predictor, image=photo, output_format=fmt))
        assert output.suffix == f'.{fmt}' and cv2.imread(str(output)).shape == whole.shape
    with pytest.raises(ValueError, match='output_format must be one of png, webp, jpg'):
        run_with_defaults(tiny_predictor, image=photo, output_format='gif')
    with pytest.raises(ValueError, match='precision must be one of'):
        run_with_defaults(tiny_predictor, image=photo, precision='fp64')
    with pytest.raises(ValueError, match='tile'):
        run_with_defaults(tiny_predictor, image=photo, tile='large')
    with pytest.raises(ValueError, match='fp16'):  # CUDA only; the CPU refuses it with the reason
        run_with_defaults(tiny_predictor, image=photo, precision='fp16')


def test_out_of_memory_says_what_to_change(tiny_predictor, tmp_path, monkeypatch):
    photo = write_photo(tmp_path / 'photo.png', seed=7, h=8, w=8)

    def exhausted(self, picture):
        raise RuntimeError('CUDA out of memory. Tried to allocate 2.00 GiB\nmore details')

    monkeypatch.setattr(Upscaler, 'upscale_picture', exhausted)
    with pytest.raises(MemoryError, match=r"8x8 image \(CUDA out of memory. Tried to allocate 2.00 GiB\): use a "
                       r"smaller tile"):
        run_with_defaults(tiny_predictor, image=photo, tile='64')
    with pytest.raises(MemoryError, match="use tile 'auto'"):
        run_with_defaults(tiny_predictor, image=photo, tile='0')


def test_each_prediction_writes_into_a_fresh_folder(tiny_predictor, tmp_path):
    photo = write_photo(tmp_path / 'photo.png', seed=6, h=8, w=12)
    first = Path(run_with_defaults(tiny_predictor, image=photo))
    assert first.is_file()
    second = Path(run_with_defaults(tiny_predictor, image=photo))
    assert second.is_file() and second.parent != first.parent
    assert not first.parent.exists()  # the previous prediction's folder goes when the next one starts


def test_the_last_prediction_folder_goes_with_the_predictor(predict_module, models_dir, tmp_path):
    predictor = set_up_tiny_predictor(predict_module, models_dir)  # not the fixture, which keeps a reference
    output = Path(run_with_defaults(predictor, image=write_photo(tmp_path / 'photo.png', seed=9, h=8, w=8)))
    assert output.is_file()
    del predictor
    gc.collect()
    assert not output.parent.exists()


# ---------------------------------------------------------------------------------------------------------------
# Served by Cog's HTTP server
# ---------------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


class Server:
    """A running ``python -m cog.server.http`` and its combined output."""

    def __init__(self, process: subprocess.Popen, url: str, log: Path) -> None:
        self.process = process
        self.url = url
        self.log = log

    def output(self) -> str:
        return self.log.read_text(errors='replace')

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            return json.load(response)

    def predict(self, **inputs) -> dict:
        # The server answers 409 while its one prediction slot is still being released after the previous answer
        # (seen on a busy machine right after a failed prediction): ask again, for a bounded time.
        deadline = time.monotonic() + BUSY_RETRY_SECONDS
        while True:
            request = urllib.request.Request(self.url + '/predictions', data=json.dumps({'input': inputs}).encode(),
                                             headers={'Content-Type': 'application/json'}, method='POST')
            try:
                with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT) as response:
                    return json.load(response)
            except urllib.error.HTTPError as error:
                body = error.read().decode(errors='replace')
                if error.code == 409 and time.monotonic() < deadline:
                    time.sleep(0.5)
                    continue
                pytest.fail(f'POST /predictions answered {error.code}: {body}\n'
                            f'server output:\n{self.output()[-4000:]}')

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        status = 'no answer'
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f'the server exited with {self.process.returncode}:\n{self.output()[-4000:]}')
            try:
                status = self.get('/health-check').get('status')
            except (OSError, ValueError):  # not listening yet, or an answer in the middle of starting
                status = 'no answer'
            if status == 'READY':
                return
            if status in ('SETUP_FAILED', 'DEFUNCT'):
                break
            time.sleep(0.5)
        pytest.fail(f'the server is not READY after {timeout:.0f} s (health check: {status}):\n'
                    f'{self.output()[-4000:]}')

    def stop(self) -> None:
        """SIGTERM to the server and its worker (their own process group), SIGKILL to what is left after 20 s."""
        group = self.process.pid
        try:
            os.killpg(group, signal.SIGTERM)
            self.process.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(group, signal.SIGKILL)  # the worker, if it outlived the server, or a server that hung
        except ProcessLookupError:
            pass
        self.process.wait(timeout=20)


@pytest.fixture(scope='module')
def server(tmp_path_factory):
    """``make serve``'s command on a free port of 127.0.0.1, with this venv's bin first on PATH (Cog's worker runs
    the ``python`` found there)."""
    port = free_port()
    folder = tmp_path_factory.mktemp('server')
    log = folder / 'server.log'
    # TMPDIR: the predictor's work folders and Cog's uploads stay in pytest's folder (a stopped server's last work
    # folder is not removed by its finaliser).
    env = dict(os.environ, PORT=str(port), COG_PREDICT_TYPE_STUB='predict.py:Predictor', OMP_NUM_THREADS='1',
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get('PATH', '')]),
               TMPDIR=str(folder))
    env.pop('HAT_FORCE_BF16', None)
    with open(log, 'wb') as sink:
        process = subprocess.Popen([sys.executable, '-m', 'cog.server.http', '--host', '127.0.0.1'], cwd=REPO,
                                   env=env, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    running = Server(process, f'http://127.0.0.1:{port}', log)
    try:
        running.wait_ready(SERVER_START_TIMEOUT)
        yield running
    finally:
        running.stop()


def data_url(path: Path) -> str:
    return 'data:image/png;base64,' + base64.b64encode(path.read_bytes()).decode('ascii')


def decode_output(prediction: dict) -> np.ndarray:
    output = prediction['output']
    assert isinstance(output, str) and output.startswith('data:image/png;base64,'), str(output)[:80]
    content = base64.b64decode(output.split(',', 1)[1])
    return cv2.imdecode(np.frombuffer(content, np.uint8), cv2.IMREAD_UNCHANGED)


@pytest.mark.slow
def test_served_predictions(server, tmp_path):
    first = write_photo(tmp_path / 'first.png', seed=7, h=28, w=36)
    prediction = server.predict(image=data_url(first), precision='fp32')
    assert prediction['status'] == 'succeeded', prediction.get('error')
    np.testing.assert_array_equal(decode_output(prediction), hat_upscale_output(first, DEMO_MODEL, tmp_path / 'a'))

    corrupt = tmp_path / 'corrupt.png'
    corrupt.write_bytes(CORRUPT_PNG)
    with pytest.raises(UnreadableImageError) as unreadable:
        read_picture(corrupt)
    prediction = server.predict(image=data_url(corrupt), precision='fp32')
    assert prediction['status'] == 'failed'
    assert 'cannot read the uploaded image' in prediction['error']
    assert unreadable.value.problem in prediction['error']

    prediction = server.predict(image=data_url(first), model='../HAT-demo_SRx4.pth')
    assert prediction['status'] == 'failed' and 'experiments/pretrained_models' in prediction['error']

    second = write_photo(tmp_path / 'second.png', seed=8, h=17, w=23)
    prediction = server.predict(image=data_url(second), precision='fp32', model='HAT-demo_SRx4.pth')
    assert prediction['status'] == 'succeeded', prediction.get('error')
    np.testing.assert_array_equal(decode_output(prediction), hat_upscale_output(second, DEMO_MODEL, tmp_path / 'b'))

    assert server.get('/health-check')['status'] == 'READY'
    loads = server.output().count('Loaded model HAT-demo_SRx4.pth')
    assert loads == 1, f'the model was loaded {loads} times:\n{server.output()[-4000:]}'
