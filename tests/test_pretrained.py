"""load_pretrained / list_pretrained / the weights cache, against a loopback
HTTP server on 127.0.0.1 that serves files the tests write."""

import ast
import functools
import hashlib
import http.server
import importlib.util
import io
import os
import pathlib
import socket
import threading
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_resnet
from flax_resnet import convert, pretrained
from flax_resnet.pretrained import ChecksumMismatch, DownloadError, Weights
from flax_resnet.references import torchvision_source
from flax_resnet.train import config_check, init_from
from fault_config import get_config as fault_config_base
from flax_resnet.zoo import PRESETS

PRESET = 'resnet20'


# ------------------------------------------------------------------ fixtures


class _Handler(http.server.BaseHTTPRequestHandler):
  """Serves server.files[path] = (body, how, status, headers); how is 'ok',
  'truncate' (announces the full Content-Length, sends half, closes) or
  'no-length' (no Content-Length: the body ends when the connection closes)."""

  def do_GET(self):  # pylint: disable=invalid-name
    self.server.requests.append(self.path)
    if self.path not in self.server.files:
      self.send_error(404)
      return
    body, how, status, headers = self.server.files[self.path]
    self.send_response(status)
    for name, value in headers.items():
      self.send_header(name, value)
    if how != 'no-length':
      self.send_header('Content-Length', str(len(body)))
    self.end_headers()
    if how == 'truncate':
      self.wfile.write(body[:len(body) // 2])
      self.wfile.flush()
      self.close_connection = True
      return
    self.wfile.write(body)
    if how == 'no-length':
      self.close_connection = True

  def log_message(self, *args):
    pass


class LoopbackServer:

  def __init__(self):
    self.httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _Handler)
    self.httpd.files = {}
    self.httpd.requests = []
    # A short poll interval: shutdown() waits up to one interval per test.
    self.thread = threading.Thread(target=self.httpd.serve_forever,
                                   kwargs={'poll_interval': 0.02}, daemon=True)
    self.thread.start()
    self.url = f'http://127.0.0.1:{self.httpd.server_address[1]}'

  def serve(self, path, body, how='ok', status=200, headers=None):
    self.httpd.files[path] = (body, how, status, headers or {})
    return self.url + path

  @property
  def requests(self):
    return self.httpd.requests

  def stop(self):
    self.httpd.shutdown()
    self.httpd.server_close()


@pytest.fixture
def server():
  s = LoopbackServer()
  yield s
  s.stop()


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
  root = tmp_path / 'cache'
  monkeypatch.setenv('FLAX_RESNET_CACHE', str(root))
  monkeypatch.delenv('FLAX_RESNET_MIRROR', raising=False)
  return root



@pytest.fixture(scope='module')
def weights_file(tmp_path_factory):
  """(bytes, variables) of a torchvision-format resnet20 .safetensors file."""
  model = flax_resnet.create_model(PRESET)
  variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)),
                                           train=False))(jax.random.key(7))
  path = tmp_path_factory.mktemp('w') / 'resnet20.safetensors'
  convert.save_safetensors(variables, PRESET, path)
  return path.read_bytes(), variables


def sha256(data):
  return hashlib.sha256(data).hexdigest()


def files_under(root):
  return sorted(str(p.relative_to(root)) for p in root.rglob('*')
                if p.is_file()) if root.exists() else []


def assert_same_variables(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


# ---------------------------------------------------------------- downloads


def test_registry_tag_downloads_once_then_loads(server, registered,
                                                weights_file, cache):
  data, variables = weights_file
  url = server.serve('/models/resnet20-abc.safetensors', data)
  registered(Weights(PRESET, 'TEST_V1', url, 'sha256:' + sha256(data)[:8],
                     None, 'user', num_classes=10))
  model, loaded = flax_resnet.load_pretrained(PRESET, 'TEST_V1',
                                              progress=False)
  assert model.spec.num_classes == 10
  assert_same_variables(loaded, variables)
  port = server.url.rsplit(':', 1)[1]
  assert files_under(cache) == [
      f'weights/127.0.0.1_{port}/models/resnet20-abc.safetensors']
  flax_resnet.load_pretrained(PRESET, 'TEST_V1', progress=False)
  assert len(server.requests) == 1  # the second call used the cache


def test_cache_hit_with_the_server_gone(server, registered, weights_file):
  data, variables = weights_file
  url = server.serve('/r20.safetensors', data)
  registered(Weights(PRESET, 'TEST_V1', url, sha256(data), None, 'user',
                     num_classes=10))
  flax_resnet.load_pretrained(PRESET, 'TEST_V1', progress=False)
  server.stop()
  _, loaded = flax_resnet.load_pretrained(PRESET, 'TEST_V1', progress=False)
  assert_same_variables(loaded, variables)


def test_one_cache_folder_for_weights_extensions_and_the_wheel(
    monkeypatch, tmp_path):
  """$FLAX_RESNET_CACHE, else $XDG_CACHE_HOME/flax_resnet, else ~/.cache."""
  from flax_resnet import native  # pylint: disable=g-import-not-at-top
  url = 'https://host.example/models/r20.safetensors'
  monkeypatch.delenv('FLAX_RESNET_CACHE')
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  monkeypatch.delenv('XDG_CACHE_HOME', raising=False)
  assert native.cache_dir() == str(tmp_path / 'home' / '.cache' / 'flax_resnet')
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
  assert native.cache_dir() == str(tmp_path / 'xdg' / 'flax_resnet')
  monkeypatch.setenv('FLAX_RESNET_CACHE', '~/mine')
  assert native.cache_dir() == str(tmp_path / 'home' / 'mine')
  assert pretrained.cache_path(url) == (
      tmp_path / 'home' / 'mine' / 'weights' / 'host.example' / 'models' /
      'r20.safetensors')


def test_corrupted_download_is_discarded(server, registered, weights_file,
                                         cache):
  data, _ = weights_file
  corrupted = bytearray(data)
  corrupted[len(data) // 2] ^= 0xFF
  url = server.serve('/r20.safetensors', bytes(corrupted))
  registered(Weights(PRESET, 'TEST_V1', url, 'sha256:' + sha256(data), None,
                     'user', num_classes=10))
  with pytest.raises(ChecksumMismatch) as e:
    flax_resnet.load_pretrained(PRESET, 'TEST_V1', progress=False)
  message = str(e.value)
  assert f'has sha256 {sha256(bytes(corrupted))}' in message
  assert f'but {sha256(data)} was expected' in message
  assert 'nothing was kept' in message
  assert files_under(cache) == []  # neither the file nor a temporary one


def test_caller_checksum_mismatch(server, weights_file, cache):
  data, _ = weights_file
  url = server.serve('/r20.safetensors', data)
  wrong = '0' * 64
  with pytest.raises(ChecksumMismatch) as e:
    flax_resnet.load_pretrained(PRESET, url, sha256=wrong, progress=False)
  assert f'has sha256 {sha256(data)}, but {wrong} was expected' in str(e.value)
  assert files_under(cache) == []
  # The right checksum (a prefix, as torchvision's file names carry) loads.
  flax_resnet.load_pretrained(PRESET, url, sha256=sha256(data)[:10],
                              progress=False)


def test_interrupted_transfer_keeps_no_half_file(server, weights_file, cache):
  data, variables = weights_file
  url = server.serve('/r20.safetensors', data, how='truncate')
  dest = pretrained.cache_path(url)
  with pytest.raises(DownloadError) as e:
    flax_resnet.load_pretrained(PRESET, url, progress=False)
  message = str(e.value)
  assert f'cannot download {url}' in message
  assert f'ended after {len(data) // 2:,} of {len(data):,} bytes' in message
  assert str(dest) in message
  assert files_under(cache) == []
  server.serve('/r20.safetensors', data)  # the server recovers: so does a run
  _, loaded = flax_resnet.load_pretrained(PRESET, url, progress=False)
  assert_same_variables(loaded, variables)


def test_offline_without_cache_fails_with_one_message(registered, cache,
                                                      weights_file):
  url = f'http://127.0.0.1:{free_port()}/models/resnet20-0123abcd.safetensors'
  registered(Weights(PRESET, 'TEST_V1', url, 'sha256:0123abcd', None, 'user',
                     num_classes=10))
  with pytest.raises(DownloadError) as e:
    flax_resnet.load_pretrained(PRESET, 'TEST_V1', progress=False)
  dest = pretrained.cache_path(url)
  message = str(e.value)
  assert '\n' not in message
  assert message.startswith(f'cannot download {url}: ')
  assert f'place it at {dest} (sha256:0123abcd)' in message
  assert e.value.__cause__ is None and e.value.__suppress_context__
  assert files_under(cache) == []
  # Doing what the message says works without network.
  data, variables = weights_file
  dest.parent.mkdir(parents=True)
  dest.write_bytes(data)
  registered(Weights(PRESET, 'TEST_V2', url, sha256(data), None, 'user',
                     num_classes=10))
  _, loaded = flax_resnet.load_pretrained(PRESET, 'TEST_V2', progress=False)
  assert_same_variables(loaded, variables)


def test_a_damaged_cached_file_is_named_not_trusted(server, registered,
                                                    weights_file):
  data, _ = weights_file
  url = server.serve('/r20.safetensors', data)
  registered(Weights(PRESET, 'TEST_V1', url, sha256(data), None, 'user',
                     num_classes=10))
  path, _ = pretrained.resolve(PRESET, 'TEST_V1', progress=False)
  path.write_bytes(data[:100])
  with pytest.raises(ChecksumMismatch) as e:
    flax_resnet.load_pretrained(PRESET, 'TEST_V1', progress=False)
  assert f'the cached file {path} has sha256' in str(e.value)
  assert 'delete it to download again' in str(e.value)


def test_mirror_serves_registry_urls(server, registered, weights_file,
                                     monkeypatch):
  data, variables = weights_file
  origin = 'https://weights.example.invalid/models/r20.safetensors'
  server.serve('/weights.example.invalid/models/r20.safetensors', data)
  registered(Weights(PRESET, 'TEST_V1', origin, sha256(data), None, 'user',
                     num_classes=10))
  monkeypatch.setenv('FLAX_RESNET_MIRROR', server.url + '/')
  path, _ = pretrained.resolve(PRESET, 'TEST_V1', progress=False)
  assert path == pretrained.cache_path(origin)  # cached under the origin
  _, loaded = flax_resnet.load_pretrained(PRESET, 'TEST_V1', progress=False)
  assert_same_variables(loaded, variables)


def test_zip_member_with_sha1_as_the_gluon_zoo_serves(server):
  params = b'\x12\x01\x00\x00\x00\x00\x00\x00' + bytes(range(256)) * 4
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, 'w') as zf:
    zf.writestr('resnet9_v1-0123abcd.params', params)
  url = server.serve('/gluon/models/resnet9_v1-0123abcd.zip',
                     buffer.getvalue())
  sha1 = hashlib.sha1(params).hexdigest()
  path = pretrained.fetch(url, checksum=f'sha1:{sha1}',
                          member='resnet9_v1-0123abcd.params', progress=False)
  assert path.name == 'resnet9_v1-0123abcd.params'
  assert path.read_bytes() == params
  assert [p.name for p in path.parent.iterdir()] == [path.name]  # zip gone


# ------------------------------------------------------------------- sources


def test_local_path_and_url_sources(server, weights_file, tmp_path):
  data, variables = weights_file
  local = tmp_path / 'mine.safetensors'
  local.write_bytes(data)
  _, from_path = flax_resnet.load_pretrained(PRESET, str(local))
  assert_same_variables(from_path, variables)
  _, from_url = flax_resnet.load_pretrained(
      PRESET, server.serve('/mine.safetensors', data), progress=False)
  assert_same_variables(from_url, variables)
  with pytest.raises(ChecksumMismatch):
    flax_resnet.load_pretrained(PRESET, local, sha256='f' * 64)


def test_pretrained_carries_the_transform_and_class_names(server, registered,
                                                         tmp_path):
  model = flax_resnet.create_model(PRESET, num_classes=1000)
  variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)),
                                           train=False))(jax.random.key(3))
  path = tmp_path / 'in1k.safetensors'
  convert.save_safetensors(variables, model, path)
  transform = pretrained.transforms.torchvision(36, 32)
  entry = registered(Weights(
      PRESET, 'TEST_IN1K', server.serve('/in1k.safetensors', path.read_bytes()),
      None, None, 'user', num_classes=1000, transform=transform,
      label_set='imagenet-1k'))
  pre = flax_resnet.load_pretrained(PRESET, 'TEST_IN1K', num_classes=1000,
                                    progress=False)
  assert isinstance(pre, flax_resnet.Pretrained)
  assert (pre.transform, pre.entry) == (transform, entry)
  assert pre.categories == pretrained.imagenet_categories()
  x = pre.transform(np.zeros((40, 50, 3), np.uint8))
  logits = pre.model.apply(pre.variables, x[None], train=False)
  assert pre.categories[int(logits.argmax())] in pre.categories
  unpacked_model, unpacked = pre  # the old two-value form still works
  assert unpacked_model is pre.model and unpacked is pre.variables
  # A fresh head (another size, or skip_head) has no class names; the
  # body's preprocessing still holds.
  for kwargs in ({'num_classes': 5}, {'num_classes': 1000,
                                      'skip_head': True}):
    fresh = flax_resnet.load_pretrained(PRESET, 'TEST_IN1K', progress=False,
                                        **kwargs)
    assert fresh.categories is None and fresh.transform == transform
  # A plain file knows neither, says so, and takes a transform by tag.
  plain = flax_resnet.load_pretrained(PRESET, path, num_classes=1000)
  assert (plain.transform, plain.categories, plain.entry) == (None, None, None)
  assert 'transform: unknown (weights from a file or URL' in repr(plain)
  assert flax_resnet.load_pretrained(
      PRESET, path, num_classes=1000, transform='TEST_IN1K').transform == (
          transform)
  with pytest.raises(ValueError, match=r"transform='TEST_V9'.*TEST_IN1K"):
    flax_resnet.load_pretrained(PRESET, path, transform='TEST_V9')


def test_num_classes_gives_a_fresh_head_and_skip_head_works(weights_file,
                                                            tmp_path):
  data, variables = weights_file
  local = tmp_path / 'mine.safetensors'
  local.write_bytes(data)
  model, loaded = flax_resnet.load_pretrained(PRESET, local, num_classes=3)
  assert model.spec.num_classes == 3
  assert loaded['params']['fc']['kernel'].shape == (64, 3)
  body = lambda v: {k: x for k, x in v['params'].items() if k != 'fc'}
  assert_same_variables(body(loaded), body(variables))
  assert_same_variables(loaded['batch_stats'], variables['batch_stats'])
  _, kept = flax_resnet.load_pretrained(PRESET, local, skip_head=True)
  assert_same_variables(body(kept), body(variables))
  assert not np.array_equal(kept['params']['fc']['kernel'],
                            variables['params']['fc']['kernel'])
  logits = model.apply(loaded, jnp.ones((2, 32, 32, 3)), train=False)
  assert logits.shape == (2, 3)


def test_fresh_head_from_a_gluon_file_whose_head_has_other_names(tmp_path):
  """Gluon names its classifier output.*, not fc.*: num_classes still works."""
  source = flax_resnet.create_model('gluon_resnet18_v1', num_classes=5)
  variables = jax.jit(functools.partial(source.init, train=False))(
      jax.random.key(1), jnp.zeros((1, 32, 32, 3)))
  path = tmp_path / 'resnet18_v1.params'
  convert.save_gluon(variables, source, path)
  with pytest.raises(convert.StateDictMismatch) as e:
    convert.load_weights(path, flax_resnet.create_model('gluon_resnet18_v1',
                                                        num_classes=3))
  assert e.value.head_only
  model, loaded = flax_resnet.load_pretrained('gluon_resnet18_v1', path,
                                              num_classes=3)
  assert loaded['params']['fc']['kernel'].shape == (512, 3)
  body = lambda v: {k: x for k, x in v['params'].items() if k != 'fc'}
  assert_same_variables(body(loaded), body(variables))
  assert_same_variables(loaded['batch_stats'], variables['batch_stats'])


def test_unknown_tag_names_the_registered_ones():
  with pytest.raises(ValueError) as e:
    flax_resnet.load_pretrained('resnet50', 'IMAGENET1K_V3')
  message = str(e.value)
  assert "Did you mean 'IMAGENET1K_V1'" in message or (
      "Did you mean 'IMAGENET1K_V2'" in message)
  assert 'IMAGENET1K_V2' in message and 'a1_in1k' in message


def test_init_from_accepts_a_registry_tag_and_a_url(server, registered,
                                                    tmp_path):
  config = fault_config_base()
  spec = config_check.validate_config(config)
  model = flax_resnet.ResNet(spec)
  variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, 8, 8, 3)),
                                           train=False))(jax.random.key(3))
  path = tmp_path / 'r20.safetensors'
  convert.save_safetensors(variables, spec, path)
  data = path.read_bytes()
  url = server.serve('/r20_small.safetensors', data)
  registered(Weights('resnet20', 'TEST_SMALL', url, sha256(data), None,
                     'user', num_classes=10))
  state = jax.tree.map(jnp.zeros_like, {'params': variables['params'],
                                        'batch_stats': variables[
                                            'batch_stats']})

  class State(dict):
    params = property(lambda self: self['params'])
    batch_stats = property(lambda self: self['batch_stats'])

    def replace(self, **kw):
      return State({**self, **kw})

  for source in ('TEST_SMALL', url):
    config.init_from = source
    new = init_from.load_init_weights(config, spec, State(state))
    assert_same_variables({'params': new.params,
                           'batch_stats': new.batch_stats},
                          {'params': variables['params'],
                           'batch_stats': variables['batch_stats']})
  config.init_from = 'NO_SUCH_TAG'
  with pytest.raises(config_check.ConfigError) as e:
    init_from.load_init_weights(config, spec, State(state))
  assert 'does not exist; give a torchvision .pth/.safetensors' in str(e.value)
  assert 'TEST_SMALL' in str(e.value)
  config.init_from = f'http://127.0.0.1:{free_port()}/gone.pth'
  with pytest.raises(config_check.ConfigError) as e:
    init_from.load_init_weights(config, spec, State(state))
  assert str(e.value).startswith(f'config.init_from: cannot download '
                                 f'{config.init_from}')


# ------------------------------------------------------------------ registry


def test_every_torchvision_preset_has_its_published_weights():
  torchvision = [n for n, s in PRESETS.items() if s.reference == 'torchvision']
  with_v2 = {'resnet50', 'resnet101', 'resnet152', 'resnext50_32x4d',
             'resnext101_32x8d', 'wide_resnet50_2', 'wide_resnet101_2'}
  for name in torchvision:
    tags = {w.tag: w for w in flax_resnet.list_pretrained(name)
            if w.publisher == 'torchvision'}
    assert set(tags) == ({'IMAGENET1K_V1', 'IMAGENET1K_V2'} if name in with_v2
                         else {'IMAGENET1K_V1'}), name
    for w in tags.values():
      file = w.url.rsplit('/', 1)[1]
      assert w.url == f'https://download.pytorch.org/models/{file}'
      assert file.startswith(name + '-')
      # torchvision's check_hash: the file name carries a sha256 prefix.
      assert w.checksum == 'sha256:' + file[len(name) + 1:-len('.pth')]
      assert 60 < w.top1 < 90
  assert flax_resnet.list_pretrained('resnet50', publisher='torchvision')[
      1].top1 == 80.858


def test_torchvision_entries_equal_torchvisions_own_weight_tables():
  """URL and acc@1 of every entry, read from torchvision's resnet.py."""
  try:
    resnet = torchvision_source.load_resnet_module()
  except FileNotFoundError as e:
    pytest.skip(f'no torchvision wheel: {e}')
  enums = {name[:-len('_Weights')].lower(): enum
           for name, enum in vars(resnet).items()
           if name.endswith('_Weights') and name != 'Weights'}
  published = {}
  for preset, enum in enums.items():
    for member in enum:
      published[(preset, member.name)] = (
          member.value.url, member.value.meta['_metrics']['ImageNet-1K'][
              'acc@1'])
  ours = {w.key: (w.url, w.top1)
          for w in flax_resnet.list_pretrained(publisher='torchvision')}
  assert ours == published


def test_timm_entries_point_at_the_hub():
  timm = flax_resnet.list_pretrained(publisher='timm')
  assert ('resnet50', 'a1_in1k') in {w.key for w in timm}
  for w in timm:
    assert w.preset in PRESETS
    assert w.url == (f'https://huggingface.co/timm/{w.preset}.{w.tag}/'
                     'resolve/main/model.safetensors')
    assert w.checksum is None and w.top1 is None  # timm publishes neither
  # timm's own name works as the tag too.
  assert pretrained._registry_entry('resnet50', 'resnet50.a1_in1k') is (  # pylint: disable=protected-access
      pretrained.REGISTRY[('resnet50', 'a1_in1k')])


def test_gluon_entries_as_model_store_names_them():
  gluon = flax_resnet.list_pretrained(publisher='gluon')
  assert {w.preset for w in gluon} == {
      f'gluon_resnet{d}_v{v}' for d in (18, 34, 50, 101, 152) for v in (1, 2)}
  for w in gluon:
    algorithm, sha1 = w.checksum.split(':')
    name = w.preset[len('gluon_'):]
    assert algorithm == 'sha1' and len(sha1) == 40
    assert w.url == ('https://apache-mxnet.s3-accelerate.dualstack.amazonaws'
                     f'.com/gluon/models/{name}-{sha1[:8]}.zip')
    assert w.member == f'{name}-{sha1[:8]}.params'


def test_keras_entries_match_the_installed_keras():
  spec = importlib.util.find_spec('keras')
  if spec is None:
    pytest.skip('keras is not installed')
  source = pathlib.Path(spec.origin).parent / 'src/applications/resnet.py'
  tree = ast.parse(source.read_text())
  hashes = next(ast.literal_eval(node.value) for node in ast.walk(tree)
                if isinstance(node, ast.Assign) and
                getattr(node.targets[0], 'id', '') == 'WEIGHTS_HASHES')
  keras = flax_resnet.list_pretrained(publisher='keras')
  assert len(keras) == 6
  for w in keras:
    keras_name = w.preset[len('keras_'):].replace('_v2', 'v2')
    assert w.checksum == 'md5:' + hashes[keras_name][0]
    assert w.url == ('https://storage.googleapis.com/tensorflow/'
                     f'keras-applications/resnet/{keras_name}_weights_tf_dim_'
                     'ordering_tf_kernels.h5')


def test_list_pretrained_prints_a_table():
  table = pretrained.format_table(flax_resnet.list_pretrained('resnet50'))
  lines = table.splitlines()
  assert lines[0].split() == ['preset', 'tag', 'top-1', 'checksum', 'url']
  assert any('IMAGENET1K_V2' in l and '80.858' in l and 'sha256:11ad3fa6' in l
             and l.endswith('resnet50-11ad3fa6.pth') for l in lines)


def test_a_malformed_checksum_is_refused_before_any_transfer(server):
  url = server.serve('/x.pth', b'x')
  with pytest.raises(ValueError, match='is not a hex digest'):
    pretrained.fetch(url, checksum='sha256:xyz', progress=False)
  assert server.requests == []


# ------------------------------------------- hostile servers and cache files
# Whatever a server sends that is not the weights file (an error page, a
# login form after a redirect, a cut-off body, an archive without the file)
# is refused with the URL and the cache path, and nothing is cached.

_LOGIN_PAGE = (b'<!DOCTYPE html>\n<html><head><title>Sign in - Example</title>'
               b'</head><body><form>password</form></body></html>')


@pytest.mark.parametrize('body, headers, described', [
    (_LOGIN_PAGE, {'Content-Type': 'text/html; charset=utf-8'},
     "an HTML page titled 'Sign in - Example' (text/html; charset=utf-8)"),
    (b'  <html><body>quota exceeded</body></html>', {}, 'an HTML page'),
    (b'{"error": "Repository not found"}', {'Content-Type': 'application/json'},
     'a JSON document (application/json)'),
    (b'<?xml version="1.0"?><Error><Code>AccessDenied</Code></Error>',
     {'Content-Type': 'application/xml'}, 'an XML document'),
    (b'Bad gateway, try later', {'Content-Type': 'text/plain'},
     'is not a weights file this reader knows'),
    (b'', {}, 'empty (0 bytes)'),
])
def test_a_page_served_as_200_without_a_checksum_is_refused_not_cached(
    server, cache, body, headers, described):
  url = server.serve('/models/r20.safetensors', body, headers=headers)
  for _ in range(2):  # the second try asks the server again: nothing cached
    with pytest.raises(DownloadError) as e:
      pretrained.fetch(url, progress=False)
    message = str(e.value)
    assert message.startswith(f"cannot download {url}: the server's answer is ")
    assert described in message, message
    assert 'nothing was kept' in message
    assert str(pretrained.cache_path(url)) in message
    assert files_under(cache) == []
  assert len(server.requests) == 2


def test_a_redirect_to_a_login_page_is_refused_and_named(server, cache):
  login = server.serve('/login', _LOGIN_PAGE,
                       headers={'Content-Type': 'text/html'})
  url = server.serve('/models/r20.pth', b'', status=302,
                     headers={'Location': '/login'})
  with pytest.raises(DownloadError) as e:
    flax_resnet.load_pretrained(PRESET, url, progress=False)
  assert f'(redirected to {login})' in str(e.value)
  assert "an HTML page titled 'Sign in - Example'" in str(e.value)
  assert files_under(cache) == []


@pytest.mark.parametrize('status', [403, 404, 500, 503])
def test_an_http_error_status_is_never_cached(server, cache, status):
  url = server.serve('/r20.pth', _LOGIN_PAGE, status=status,
                     headers={'Content-Type': 'text/html'})
  for checksum in (None, '0123abcd'):
    with pytest.raises(DownloadError, match=f'HTTP {status}'):
      pretrained.fetch(url, checksum=checksum, progress=False)
  assert files_under(cache) == []


def test_a_page_where_a_checksummed_file_should_be_is_named(server, cache):
  url = server.serve('/r20.pth', _LOGIN_PAGE,
                     headers={'Content-Type': 'text/html'})
  with pytest.raises(ChecksumMismatch) as e:
    pretrained.fetch(url, checksum='0123abcd', progress=False)
  assert ("the server's answer is an HTML page titled 'Sign in - Example'"
          in str(e.value))
  assert files_under(cache) == []


def test_a_body_cut_short_without_content_length_is_refused(server, cache,
                                                            weights_file):
  data, variables = weights_file
  url = server.serve('/r20.safetensors', data[:len(data) * 2 // 3],
                     how='no-length')
  with pytest.raises(DownloadError) as e:
    flax_resnet.load_pretrained(PRESET, url, progress=False)
  assert 'truncated' in str(e.value) and 'nothing was kept' in str(e.value)
  assert files_under(cache) == []
  server.serve('/r20.safetensors', data, how='no-length')  # whole: accepted
  _, loaded = flax_resnet.load_pretrained(PRESET, url, progress=False)
  assert_same_variables(loaded, variables)


def test_a_cached_page_names_its_path_and_deleting_it_recovers(
    server, cache, weights_file):
  """A page cached by hand or by an older version is refused at every use."""
  data, variables = weights_file
  url = server.serve('/r20.safetensors', data)
  dest = pretrained.cache_path(url)
  dest.parent.mkdir(parents=True)
  dest.write_bytes(_LOGIN_PAGE)
  with pytest.raises(pretrained.download.CachedFileDamaged) as e:
    flax_resnet.load_pretrained(PRESET, url, progress=False)
  message = str(e.value)
  assert message.startswith(f'the cached file {dest} (from {url}) is an HTML '
                            "page titled 'Sign in - Example'")
  assert ', not a weights file. ' in message
  assert message.endswith('Delete it to download again.')
  assert server.requests == []
  dest.unlink()  # as the message says
  _, loaded = flax_resnet.load_pretrained(PRESET, url, progress=False)
  assert_same_variables(loaded, variables)


def test_weights_of_another_preset_from_a_url_name_the_cached_file(
    server, weights_file):
  data, _ = weights_file
  url = server.serve('/models/r20.safetensors', data)
  with pytest.raises(convert.StateDictMismatch) as e:
    flax_resnet.load_pretrained('resnet32', url, progress=False)
  message = str(e.value)
  assert message.startswith(f'{pretrained.cache_path(url)}: 60 missing key(s)')
  assert ('depths (3, 3, 3), but the model has basic blocks with depths '
          '(5, 5, 5)') in message


def _zip_of(**members):
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, 'w') as zf:
    for name, body in members.items():
      zf.writestr(name, body)
  return buffer.getvalue()


_PARAMS = b'\x12\x01\x00\x00\x00\x00\x00\x00' + bytes(16)


@pytest.mark.parametrize('body, expected', [
    (_zip_of(**{'other-0123abcd.params': _PARAMS}),
     'the archive holds no resnet9_v1-0123abcd.params (it holds '
     'other-0123abcd.params)'),
    (_zip_of(), 'the archive holds no resnet9_v1-0123abcd.params (it holds '
     'no files)'),
    (_LOGIN_PAGE,
     "the server's answer is an HTML page titled 'Sign in - Example'"),
])
def test_a_zip_without_its_member_keeps_nothing(server, cache, body, expected):
  url = server.serve('/gluon/resnet9_v1-0123abcd.zip', body)
  for checksum in (None, 'sha1:' + hashlib.sha1(_PARAMS).hexdigest()):
    with pytest.raises(DownloadError) as e:
      pretrained.fetch(url, checksum=checksum,
                       member='resnet9_v1-0123abcd.params', progress=False)
    assert expected in str(e.value), str(e.value)
    assert 'nothing was kept' in str(e.value)
    assert 'checksum is wrong' not in str(e.value)
    assert files_under(cache) == []


def test_urls_differing_only_in_their_query_get_their_own_files(
    server, cache, weights_file):
  """?id=1 and ?id=2 are two files; one cache name for both served the first
  to every later request, whatever preset it held."""
  data, _ = weights_file
  other = bytearray(data)
  other[-1] ^= 1
  server.serve('/uc?id=1', data)
  server.serve('/uc?id=2', bytes(other))
  first = pretrained.fetch(server.url + '/uc?id=1', progress=False)
  second = pretrained.fetch(server.url + '/uc?id=2', progress=False)
  assert first != second and first.parent == second.parent
  assert (first.read_bytes(), second.read_bytes()) == (data, bytes(other))
  # Without a query the name stays what a user places by hand.
  assert pretrained.cache_path('https://h/m/r.pth').name == 'r.pth'


@pytest.mark.parametrize('url', ['https://example.com', 'https://example.com/',
                                 'https://example.com/./'])
def test_a_url_that_names_no_file(url, cache):
  with pytest.raises(ValueError) as e:
    pretrained.fetch(url, progress=False)
  assert str(e.value) == (
      f'url {url!r} names no file (its path is empty); give the URL of the '
      'weights file itself, e.g. https://host/models/resnet50.pth.')


def test_a_folder_at_the_cache_path_is_named(server, cache):
  url = server.serve('/r20.pth', b'x')
  pretrained.cache_path(url).mkdir(parents=True)
  with pytest.raises(DownloadError, match='exists and is not a file; move it'):
    pretrained.fetch(url, progress=False)
  assert server.requests == []


@pytest.mark.parametrize('checksum, field, problem', [
    ('4', "sha256='4'", 'has 1 hex digit, too few'),
    ('0123abc', "sha256='0123abc'", 'has 7 hex digits, too few'),
    ('md5:0123abc', "checksum 'md5:0123abc'", 'has 7 hex digits, too few'),
    ('sha256:' + '0' * 65, "checksum 'sha256:" + '0' * 65 + "'",
     'has 65 hex digits, more than a sha256 digest'),
    ('0123abcg', "sha256='0123abcg'", 'is not a hex digest'),
    ('sha512:0123abcd', "checksum 'sha512:0123abcd'", 'is not a hex digest'),
    ('', "sha256=''", 'is not a hex digest'),
])
def test_a_checksum_too_short_to_identify_a_file_is_refused(
    server, checksum, field, problem):
  url = server.serve('/x.pth', b'x')
  with pytest.raises(ValueError) as e:
    pretrained.fetch(url, checksum=checksum, progress=False)
  assert str(e.value).startswith(f'{field} {problem}'), str(e.value)
  assert '\n' not in str(e.value)
  with pytest.raises(ValueError, match='hex digit'):
    flax_resnet.load_pretrained(PRESET, url, sha256=checksum or '4',
                                progress=False)
  assert server.requests == []


def test_a_checksum_of_eight_digits_any_case_is_enough(server, weights_file):
  data, _ = weights_file
  url = server.serve('/r20.safetensors', data)
  path = pretrained.fetch(url, checksum='SHA256:' + sha256(data)[:8].upper(),
                          progress=False)
  assert path.read_bytes() == data
