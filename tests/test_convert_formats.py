"""load_weights: formats told from content, readers, and bad files.

Everything here is synthesised in the exact upstream byte formats (no MXNet or
Keras needed); test_convert_parity.py runs the real libraries.
"""

from __future__ import annotations

import pathlib
import pickle
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_resnet import convert
from flax_resnet import zoo
from flax_resnet.convert import files

torch = pytest.importorskip('torch')


def _random_variables(preset: str, seed: int = 0):
  """Variables of `preset` with every tensor random, in the model's shapes."""
  rng = np.random.default_rng(seed)
  out = {}
  for entry in convert.key_map(preset):
    if entry.kind == 'counter':
      continue
    value = rng.normal(0, 0.1, entry.shape).astype(np.float32)
    if entry.path[-1] == 'var':
      value = np.abs(value) + 0.5
    node = out.setdefault(entry.collection, {})
    for part in entry.path[:-1]:
      node = node.setdefault(part, {})
    node[entry.path[-1]] = value
  return out


def _same(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def _cli_error(capsys, argv) -> str:
  assert convert.main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: ') and 'Traceback' not in err, err
  return err


# ---------------------------------------------------- formats by content


def test_gluon_params_round_trip_both_name_styles(tmp_path):
  preset = 'gluon_resnet18_v2'
  variables = _random_variables(preset)
  convert.save_gluon(variables, preset, tmp_path / 'net.params')
  _same(convert.load_weights(tmp_path / 'net.params', preset), variables)
  # Old model-zoo files: prefixed names, with the net's prefix.
  prefixed = convert.flax_to_gluon(variables, preset, prefixed=True)
  assert list(prefixed)[:5] == [
      'batchnorm0_gamma', 'batchnorm0_beta', 'batchnorm0_running_mean',
      'batchnorm0_running_var', 'conv0_weight']
  convert.write_params({f'resnetv20_{k}': v for k, v in prefixed.items()},
                       tmp_path / 'old.params')
  _same(convert.load_weights(tmp_path / 'old.params', preset), variables)


def test_gluon_structural_names_follow_the_model_zoo():
  names = [e.name for e in convert.gluon_key_map('gluon_resnet50_v1')]
  assert names[:6] == ['features.0.weight', 'features.1.gamma',
                       'features.1.beta', 'features.1.running_mean',
                       'features.1.running_var', 'features.4.0.body.0.weight']
  assert 'features.4.0.body.0.bias' in names  # BottleneckV1's 1x1 bias
  assert 'features.4.0.body.6.bias' in names
  assert 'features.4.0.body.3.bias' not in names  # the 3x3 has none
  assert 'features.4.0.downsample.0.weight' in names
  assert names[-2:] == ['output.weight', 'output.bias']
  v2 = [e.name for e in convert.gluon_key_map('gluon_resnet50_v2')]
  assert v2[:2] == ['features.0.gamma', 'features.0.beta']  # the data BN
  assert 'features.5.0.downsample.weight' in v2
  assert 'features.9.gamma' in v2  # BN before the pool


def test_mxnet_reader_knows_the_v1_array_layout(tmp_path):
  # 0xF993FAC8 arrays have no storage type and a u32 ndim.
  data = np.arange(6, dtype=np.float32).reshape(2, 3)
  blob = struct.pack('<QQQ', 0x112, 0, 1)
  blob += struct.pack('<II', 0xF993FAC8, 2) + struct.pack('<2q', 2, 3)
  blob += struct.pack('<iii', 1, 0, 0) + data.tobytes()
  blob += struct.pack('<Q', 1) + struct.pack('<Q', 7) + b'arg:w_0'
  (tmp_path / 'v1.params').write_bytes(blob)
  arrays = convert.read_params(tmp_path / 'v1.params')
  assert list(arrays) == ['w_0']
  np.testing.assert_array_equal(arrays['w_0'], data)


def test_truncated_params_file_is_reported(tmp_path, capsys):
  variables = _random_variables('gluon_resnet18_v1')
  convert.save_gluon(variables, 'gluon_resnet18_v1', tmp_path / 'net.params')
  blob = (tmp_path / 'net.params').read_bytes()
  (tmp_path / 'cut.params').write_bytes(blob[:len(blob) // 2])
  err = _cli_error(capsys, ['gluon_resnet18_v1', str(tmp_path / 'cut.params'),
                            str(tmp_path / 'out')])
  assert 'truncated' in err


def test_format_is_read_from_content_not_extension(tmp_path):
  preset = 'resnet18'
  variables = _random_variables(preset)
  convert.save_safetensors(variables, preset, tmp_path / 'weights.pth')
  assert files.sniff(tmp_path / 'weights.pth') == 'safetensors'
  _same(convert.load_weights(tmp_path / 'weights.pth', preset), variables)
  convert.save_torch(variables, preset, tmp_path / 'weights.safetensors')
  assert files.sniff(tmp_path / 'weights.safetensors') == 'torch-zip'
  _same(convert.load_weights(tmp_path / 'weights.safetensors', preset),
        variables)
  gluon = 'gluon_resnet18_v1'
  convert.save_gluon(_random_variables(gluon), gluon, tmp_path / 'model.bin')
  assert files.sniff(tmp_path / 'model.bin') == 'mxnet'
  _same(convert.load_weights(tmp_path / 'model.bin', gluon),
        _random_variables(gluon))


def test_legacy_pickle_state_dict_loads(tmp_path):
  preset = 'resnet18'
  variables = _random_variables(preset)
  state_dict = {k: torch.from_numpy(v) for k, v in
                convert.flax_to_torch(variables, preset).items()}
  torch.save(state_dict, tmp_path / 'old.pt',
             _use_new_zipfile_serialization=False)
  assert files.sniff(tmp_path / 'old.pt') == 'torch-pickle'
  _same(convert.load_weights(tmp_path / 'old.pt', preset), variables)


def test_dicts_of_arrays_and_hugging_face_names():
  preset = 'resnet18'
  variables = _random_variables(preset)
  state_dict = convert.flax_to_torch(variables, preset)
  _same(convert.load_weights(dict(state_dict), preset), variables)
  jax_arrays = {k: jnp.asarray(v) for k, v in state_dict.items()}
  _same(convert.load_weights(jax_arrays, preset), variables)
  # transformers ResNetForImageClassification names are renamed on the way.
  hf = {}
  for name, value in state_dict.items():
    if name.startswith('conv1.'):
      hf['resnet.embedder.embedder.convolution.' + name[6:]] = value
    elif name.startswith('bn1.'):
      hf['resnet.embedder.embedder.normalization.' + name[4:]] = value
    elif name.startswith('fc.'):
      hf['classifier.1.' + name[3:]] = value
    else:
      stage, block, layer, leaf = name.split('.', 3)
      prefix = (f'resnet.encoder.stages.{int(stage[5:]) - 1}.layers.{block}.')
      if layer == 'downsample':
        index, leaf = leaf.split('.', 1)
        part = 'convolution' if index == '0' else 'normalization'
        hf[f'{prefix}shortcut.{part}.{leaf}'] = value
      else:
        number = int(layer[-1]) - 1
        part = 'convolution' if layer.startswith('conv') else 'normalization'
        hf[f'{prefix}layer.{number}.{part}.{leaf}'] = value
  _same(convert.load_weights(hf, preset), variables)


# ------------------------------------------------ bad files: one error line


def test_pickled_module_is_refused_not_executed(tmp_path, capsys):
  torch.save(torch.nn.Linear(2, 2), tmp_path / 'module.pth')
  err = _cli_error(capsys, ['resnet18', str(tmp_path / 'module.pth'),
                            str(tmp_path / 'out')])
  assert 'state_dict' in err and 'not executed' in err


class _Payload:
  """Unpickling this creates a file: proof that code would have run."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_arbitrary_pickle_is_refused_and_never_runs(tmp_path, capsys):
  marker = tmp_path / 'executed'
  with open(tmp_path / 'evil.pth', 'wb') as f:
    pickle.dump({'conv1.weight': _Payload(str(marker))}, f, protocol=2)
  err = _cli_error(capsys, ['resnet18', str(tmp_path / 'evil.pth'),
                            str(tmp_path / 'out')])
  assert 'not executed' in err
  assert not marker.exists()


def test_empty_file(tmp_path, capsys):
  (tmp_path / 'empty.pth').write_bytes(b'')
  err = _cli_error(capsys, ['resnet18', str(tmp_path / 'empty.pth'),
                            str(tmp_path / 'out')])
  assert 'is empty (0 bytes)' in err


def test_bad_safetensors_header(tmp_path, capsys):
  (tmp_path / 'bad.safetensors').write_bytes(
      struct.pack('<Q', 40) + b'{"conv1.weight": {"dtype": "F32", "sh')
  err = _cli_error(capsys, ['resnet18', str(tmp_path / 'bad.safetensors'),
                            str(tmp_path / 'out')])
  assert 'safetensors' in err and 'bad.safetensors' in err


def test_directory_given_as_file(tmp_path, capsys):
  (tmp_path / 'ckpt').mkdir()
  err = _cli_error(capsys, ['resnet18', str(tmp_path / 'ckpt'),
                            str(tmp_path / 'out')])
  assert 'is a directory, not a file' in err
  assert 'does not exist' not in err


def test_none_value_is_named():
  state_dict = dict(convert.flax_to_torch(_random_variables('resnet18'),
                                          'resnet18'))
  state_dict['layer1.0.bn1.running_var'] = None
  with pytest.raises(convert.StateDictMismatch) as info:
    convert.load_weights(state_dict, 'resnet18')
  message = str(info.value)
  assert 'layer1.0.bn1.running_var is None' in message
  assert 'shape mismatch' not in message


def test_transposed_fc_weight_suggests_transposing():
  state_dict = dict(convert.flax_to_torch(_random_variables('resnet18'),
                                          'resnet18'))
  state_dict['fc.weight'] = state_dict['fc.weight'].T
  with pytest.raises(convert.StateDictMismatch) as info:
    convert.load_weights(state_dict, 'resnet18')
  message = str(info.value)
  assert 'fc.weight: got (512, 1000), expected (1000, 512)' in message
  assert 'transpose' in message
  assert 'num_classes=' not in message


def test_integer_weights_are_refused():
  state_dict = dict(convert.flax_to_torch(_random_variables('resnet18'),
                                          'resnet18'))
  state_dict['conv1.weight'] = (state_dict['conv1.weight'] * 100).astype(
      np.int8)
  with pytest.raises(convert.StateDictMismatch) as info:
    convert.load_weights(state_dict, 'resnet18')
  assert 'conv1.weight has dtype int8' in str(info.value)


def test_cli_output_below_a_file_fails_at_once(tmp_path):
  convert.save_safetensors(_random_variables('resnet18'), 'resnet18',
                           tmp_path / 'w.safetensors')
  (tmp_path / 'afile').write_text('not a folder')
  result = subprocess.run(
      [sys.executable, '-m', 'flax_resnet.convert', 'resnet18',
       str(tmp_path / 'w.safetensors'), str(tmp_path / 'afile' / 'ckpt')],
      capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 2
  assert result.stderr.startswith('error: ')
  assert 'is a file, not a directory' in result.stderr
  assert 'Traceback' not in result.stderr


def test_cli_converts_a_gluon_file(tmp_path, capsys):
  preset = 'gluon_resnet18_v1'
  convert.save_gluon(_random_variables(preset), preset,
                     tmp_path / 'net.params')
  assert convert.main([preset, str(tmp_path / 'net.params'),
                       str(tmp_path / 'ckpt')]) == 0
  assert 'wrote' in capsys.readouterr().out
  assert (tmp_path / 'ckpt').is_dir()


def test_gluon_file_into_a_torchvision_preset_names_the_problem():
  gluon = convert.flax_to_gluon(_random_variables('gluon_resnet50_v1'),
                                'gluon_resnet50_v1')
  with pytest.raises(convert.StateDictMismatch) as info:
    convert.load_weights(dict(gluon), 'resnet50_v1')
  assert 'features.4.0.body.0.bias' in str(info.value)  # unexpected here


def test_exact_presets_are_not_torchvision_shaped():
  # The Gluon/Keras presets add their conventions; existing presets keep
  # torchvision's counts.
  spec = zoo.get_spec('keras_resnet50')
  assert spec.bn_eps == 1.001e-5 and 'stem' in spec.conv_bias
  assert zoo.get_spec('resnet50').conv_bias == ()


def test_hugging_face_save_pretrained_file_loads_as_is(tmp_path):
  # A transformers checkpoint folder's model.safetensors, loaded with no
  # renaming step: load_weights recognises the names.
  transformers = pytest.importorskip('transformers')
  config = transformers.ResNetConfig(
      embedding_size=64, hidden_sizes=(64, 128, 256, 512),
      depths=(2, 2, 2, 2), layer_type='basic', hidden_act='relu',
      num_labels=1000, downsample_in_first_stage=False)
  hf = transformers.ResNetForImageClassification(config).eval()
  hf.save_pretrained(tmp_path)
  variables = convert.load_weights(tmp_path / 'model.safetensors', 'resnet18')
  x = np.random.default_rng(0).normal(size=(1, 64, 64, 3)).astype(np.float32)
  with torch.no_grad():
    theirs = hf(torch.from_numpy(x.transpose(0, 3, 1, 2))).logits.numpy()
  ours = np.asarray(zoo.create_model('resnet18').apply(variables, x))
  assert np.abs(ours - theirs).max() / np.abs(theirs).max() < 1e-5
