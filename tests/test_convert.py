"""torch <-> Flax conversion: names, numeric parity, round trips and errors.

References: torchvision's own resnet.py (run from its wheel on CPU torch) and,
independently, Hugging Face transformers' ResNet. Relative error is
max|ours - reference| / max|reference|, in float32 with 'highest' matmul
precision.
"""

import collections
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flax_resnet import convert
from flax_resnet import create_model
from flax_resnet.references import torchvision_source

pytestmark = pytest.mark.torch

TOLERANCE = 1e-5
# Our sown features vs the torch modules whose outputs are the same tensors.
FEATURES = {'stem_out': 'maxpool', 'stage1': 'layer1', 'stage2': 'layer2',
            'stage3': 'layer3', 'stage4': 'layer4'}
TORCHVISION_PRESETS = ('resnet18', 'resnet34', 'resnet50', 'resnet101',
                       'resnet152', 'resnext50_32x4d', 'resnext101_32x8d',
                       'resnext101_64x4d', 'wide_resnet50_2',
                       'wide_resnet101_2')


def rel_err(ours, reference) -> float:
  ours, reference = np.asarray(ours, np.float64), np.asarray(reference,
                                                             np.float64)
  return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))


@functools.lru_cache(maxsize=None)
def torchvision_model(name: str) -> torch.nn.Module:
  torch.manual_seed(0)
  model = torchvision_source.build(name).eval()
  torchvision_source.randomize_batch_norms(model, seed=1)
  return model


def images(size: int, seed: int = 0, batch: int = 2) -> np.ndarray:
  return np.random.RandomState(seed).randn(batch, size, size, 3).astype(
      np.float32)


def torch_forward(model: torch.nn.Module, x: np.ndarray):
  """Logits and NHWC outputs of maxpool and layer1..4."""
  features = {}
  hooks = [getattr(model, name).register_forward_hook(
      lambda m, i, out, name=name: features.__setitem__(
          name, out.detach().numpy().transpose(0, 2, 3, 1)))
           for name in FEATURES.values()]
  try:
    with torch.no_grad():
      logits = model(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
  finally:
    for hook in hooks:
      hook.remove()
  return logits, features


def flax_forward(model, variables, x: np.ndarray):
  """Eval-mode logits and the sown per-stage features."""
  apply = jax.jit(functools.partial(model.apply, train=False,
                                    mutable=['intermediates']))
  with jax.default_matmul_precision('highest'):
    logits, state = apply(variables, x)
  features = {k: np.asarray(v[0]) for k, v in state['intermediates'].items()}
  return np.asarray(logits), features


def assert_parity(name, model, variables, x, ref_logits, ref_features):
  logits, features = flax_forward(model, variables, x)
  errors = {'logits': rel_err(logits, ref_logits)}
  for ours, theirs in FEATURES.items():
    chex.assert_equal_shape([features[ours], ref_features[theirs]])
    errors[ours] = rel_err(features[ours], ref_features[theirs])
  print(f'\n{name} {x.shape[1]}x{x.shape[2]}: max rel err '
        f'{max(errors.values()):.2e} ' +
        ' '.join(f'{k}={v:.1e}' for k, v in errors.items()))
  bad = {k: v for k, v in errors.items() if not v <= TOLERANCE}
  assert not bad, f'{name}: relative error above {TOLERANCE}: {bad}'


def random_state_dict(name: str, seed: int = 0, **overrides):
  """numpy arrays under every torch name of the preset, with random values."""
  rng = np.random.RandomState(seed)
  return collections.OrderedDict(
      (e.torch_name, np.array(0, np.int64) if e.kind == 'counter' else
       rng.randn(*e.torch_shape).astype(np.float32))
      for e in convert.key_map(name, **overrides))


# ---------------------------------------------------------------- name maps


@pytest.mark.parametrize('name', TORCHVISION_PRESETS)
def test_names_and_shapes_match_torchvision(name):
  with torch.device('meta'):  # shapes only: no memory, no init time
    reference = torchvision_source.build(name).state_dict()
  entries = convert.key_map(name)
  assert [e.torch_name for e in entries] == list(reference)
  for entry in entries:
    assert entry.torch_shape == tuple(reference[entry.torch_name].shape), (
        entry.torch_name)


def test_timm_deep_stem_and_avg_down_names():
  names = {e.torch_name: e.torch_shape for e in convert.key_map('resnet50d')}
  assert names['conv1.0.weight'] == (32, 3, 3, 3)
  assert names['conv1.1.running_var'] == (32,)
  assert names['conv1.3.weight'] == (32, 32, 3, 3)
  assert names['conv1.4.weight'] == (32,)
  assert names['conv1.6.weight'] == (64, 32, 3, 3)
  assert names['bn1.weight'] == (64,)
  # timm's downsample is Sequential(pool or Identity, conv, bn) in every
  # projecting block, including layer1.0 whose pool is an Identity.
  for stage in (1, 2, 3, 4):
    assert f'layer{stage}.0.downsample.1.weight' in names
    assert f'layer{stage}.0.downsample.2.running_mean' in names
  assert names['layer1.0.downsample.1.weight'] == (256, 64, 1, 1)
  assert not any('downsample.0' in k or k.startswith('conv1.2') for k in names)


# ------------------------------------------------------- numerical parity


@pytest.mark.parametrize('name,sizes', [
    ('resnet18', (224, 97)),
    ('resnet50', (128, 97)),
    ('resnext50_32x4d', (128, 97)),
    ('wide_resnet50_2', (128, 97)),
])
def test_parity_with_torchvision(name, sizes):
  torch_model = torchvision_model(name)
  variables = convert.torch_to_flax(torch_model.state_dict(), name)
  model = create_model(name)
  for size in sizes:
    x = images(size, seed=size)
    logits, features = torch_forward(torch_model, x)
    assert_parity(name, model, variables, x, logits, features)


def hf_model(layer_type: str, depths, hidden_sizes, **config):
  from transformers import ResNetConfig, ResNetForImageClassification

  torch.manual_seed(0)
  model = ResNetForImageClassification(ResNetConfig(
      embedding_size=64, hidden_sizes=list(hidden_sizes), depths=list(depths),
      layer_type=layer_type, hidden_act='relu', num_labels=1000,
      downsample_in_first_stage=False, **config)).eval()
  torchvision_source.randomize_batch_norms(model, seed=2)
  return model


@pytest.mark.parametrize('name,layer_type,depths,hidden_sizes,config', [
    ('resnet18', 'basic', (2, 2, 2, 2), (64, 128, 256, 512), {}),
    # HF's downsample_in_bottleneck=True strides the first 1x1: true v1.
    ('resnet50_v1', 'bottleneck', (3, 4, 6, 3), (256, 512, 1024, 2048),
     {'downsample_in_bottleneck': True}),
])
def test_parity_with_hugging_face(name, layer_type, depths, hidden_sizes,
                                  config):
  hf = hf_model(layer_type, depths, hidden_sizes, **config)
  variables = convert.torch_to_flax(
      convert.hf_to_torchvision_keys(hf.state_dict()), name)
  model = create_model(name)
  for size in (128, 97):
    x = images(size, seed=size + 1)
    with torch.no_grad():
      out = hf(torch.from_numpy(x.transpose(0, 3, 1, 2)),
               output_hidden_states=True)
    # hidden_states: the embedder's output (after the max-pool), then stages.
    features = {theirs: h.numpy().transpose(0, 2, 3, 1) for theirs, h in
                zip(FEATURES.values(), out.hidden_states)}
    assert_parity(f'{name} (HF)', model, variables, x, out.logits.numpy(),
                  features)
  if name == 'resnet50_v1':
    # The same weights in the v1.5 layout are a different function: the
    # parity above really checks where the stride sits.
    logits, _ = flax_forward(create_model('resnet50'), variables, x)
    assert rel_err(logits, out.logits.numpy()) > 1e-3


def test_same_padding_breaks_parity():
  """XLA's SAME pads (2, 3) for the 7x7/2 stem and (0, 1) for 3x3/2 layers on
  even inputs; torch pads symmetrically. Same weights, shifted windows."""
  torch_model = torchvision_model('resnet18')
  x = images(64, seed=5)  # even: SAME is asymmetric here
  reference, _ = torch_forward(torch_model, x)
  variables = convert.torch_to_flax(torch_model.state_dict(), 'resnet18')
  torch_padded, _ = flax_forward(create_model('resnet18'), variables, x)
  same_padded, _ = flax_forward(create_model('resnet18', padding='same'),
                                variables, x)
  error_torch = rel_err(torch_padded, reference)
  error_same = rel_err(same_padded, reference)
  print(f"\nresnet18 64x64: padding='torch' {error_torch:.1e}, "
        f"padding='same' {error_same:.1e}")
  assert error_torch <= TOLERANCE
  assert error_same > 1e-3


def test_batchnorm_train_step_convention():
  """One train-mode step from the same stats in torch (momentum 0.1) and Flax
  (bn_momentum 0.9). Both normalise with the biased batch variance, and both
  move the running mean identically; torch's running_var takes the unbiased
  variance, so its batch term is n / (n - 1) times Flax's."""
  torch_model = torchvision_source.build('resnet18')
  torchvision_source.randomize_batch_norms(torch_model, seed=3)
  before = {k: v.detach().numpy().astype(np.float64).copy()
            for k, v in torch_model.state_dict().items()}
  variables = convert.torch_to_flax(torch_model.state_dict(), 'resnet18')
  model = create_model('resnet18')
  assert model.spec.bn_momentum == 0.9

  counts = {}  # BN name -> elements per channel in its batch statistics
  hooks = [m.register_forward_hook(
      lambda m, i, o, name=name: counts.__setitem__(
          name, i[0].shape[0] * i[0].shape[2] * i[0].shape[3]))
           for name, m in torch_model.named_modules()
           if isinstance(m, torch.nn.BatchNorm2d)]
  x = images(64, seed=7)
  torch_model.train()
  with torch.no_grad():
    torch_logits = torch_model(torch.from_numpy(x.transpose(0, 3, 1, 2)))
  for hook in hooks:
    hook.remove()
  with jax.default_matmul_precision('highest'):
    flax_logits, state = jax.jit(functools.partial(
        model.apply, train=True, mutable=['batch_stats']))(variables, x)
  assert rel_err(flax_logits, torch_logits.numpy()) <= TOLERANCE

  after_torch = torch_model.state_dict()
  after_flax = convert.flax_to_torch(
      {'params': variables['params'], 'batch_stats': state['batch_stats']},
      'resnet18')
  assert len(counts) == 20
  distinguishable = 0
  for name, n in counts.items():
    mean_t = after_torch[f'{name}.running_mean'].numpy()
    mean_f = after_flax[f'{name}.running_mean']
    assert rel_err(mean_f, mean_t) <= TOLERANCE, name
    old = before[f'{name}.running_var']
    # running = 0.9 * old + 0.1 * batch_var: isolate 0.1 * batch_var.
    term_t = after_torch[f'{name}.running_var'].numpy() - 0.9 * old
    term_f = after_flax[f'{name}.running_var'].astype(np.float64) - 0.9 * old
    bessel = n / (n - 1)
    assert rel_err(term_f * bessel, term_t) <= 1e-4, (name, n)
    if bessel - 1 > 1e-2:  # layer3/4 at 64x64: n = 32 and 8
      distinguishable += 1
      assert rel_err(term_f, term_t) > 1e-3, (name, n)
  assert distinguishable >= 5


# ------------------------------------------------------------ round trips


def test_round_trip_is_exact_and_loads_strictly():
  torch_model = torchvision_model('resnet50')
  state_dict = torch_model.state_dict()
  variables = convert.torch_to_flax(state_dict, 'resnet50')
  assert {x.dtype for x in jax.tree.leaves(variables)} == {np.dtype('float32')}
  back = convert.flax_to_torch(variables, 'resnet50')
  assert list(back) == list(state_dict)
  for key, value in state_dict.items():
    if key.endswith('num_batches_tracked'):
      assert back[key].dtype == np.int64 and back[key] == 0
    else:
      assert back[key].dtype == np.float32
      assert np.array_equal(back[key], value.numpy()), key

  fresh = torchvision_source.build('resnet50').eval()
  result = fresh.load_state_dict(
      {k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
  assert not result.missing_keys and not result.unexpected_keys
  x = torch.from_numpy(images(64, seed=9).transpose(0, 3, 1, 2))
  with torch.no_grad():
    assert torch.equal(fresh(x), torch_model(x))


@pytest.mark.parametrize('name', ['resnet50d', 'resnet34_v2', 'resnet20',
                                  'preact_resnet164'])
def test_round_trip_other_presets(name):
  state_dict = random_state_dict(name)
  back = convert.flax_to_torch(convert.torch_to_flax(state_dict, name), name)
  assert list(back) == list(state_dict)
  for key, value in state_dict.items():
    assert np.array_equal(back[key], value), key


def test_bfloat16_round_trip_keeps_bits():
  state_dict = {k: v.to(torch.bfloat16) if v.is_floating_point() else v
                for k, v in torchvision_model('resnet18').state_dict().items()}
  variables = convert.torch_to_flax(state_dict, 'resnet18',
                                    param_dtype='bfloat16', dtype='bfloat16')
  assert variables['params']['fc']['kernel'].dtype == jnp.bfloat16
  back = convert.flax_to_torch(variables, 'resnet18', param_dtype='bfloat16',
                               dtype='bfloat16')
  for key, value in state_dict.items():
    if value.dtype == torch.bfloat16 and key in back:
      got = back[key].astype(np.float32)
      assert np.array_equal(got, value.float().numpy()), key


# ------------------------------------------------------------------- files


def test_load_from_pth_and_safetensors(tmp_path):
  import safetensors.torch

  torch_model = torchvision_model('resnet18')
  state_dict = torch_model.state_dict()
  expected = convert.torch_to_flax(state_dict, 'resnet18')
  paths = {
      'plain.pth': tmp_path / 'plain.pth',
      'nested.pt': tmp_path / 'nested.pt',
      'model.pth': tmp_path / 'model.pth',
      'ddp.pth': tmp_path / 'ddp.pth',
      'weights.safetensors': tmp_path / 'weights.safetensors',
  }
  torch.save(state_dict, paths['plain.pth'])
  torch.save({'state_dict': state_dict, 'epoch': 3}, paths['nested.pt'])
  torch.save({'model': state_dict, 'optimizer': {}}, paths['model.pth'])
  torch.save({f'module.{k}': v for k, v in state_dict.items()},
             paths['ddp.pth'])
  safetensors.torch.save_file(dict(state_dict),
                              str(paths['weights.safetensors']))
  for label, path in paths.items():
    for source in (path, str(path)):
      chex.assert_trees_all_equal(convert.torch_to_flax(source, 'resnet18'),
                                  expected, custom_message=label)


def test_save_torch_and_safetensors(tmp_path):
  torch_model = torchvision_model('resnet18')
  variables = convert.torch_to_flax(torch_model.state_dict(), 'resnet18')
  convert.save_torch(variables, 'resnet18', tmp_path / 'out.pth')
  convert.save_safetensors(variables, 'resnet18', tmp_path / 'out.safetensors')
  fresh = torchvision_source.build('resnet18')
  fresh.load_state_dict(torch.load(tmp_path / 'out.pth', weights_only=True),
                        strict=True)
  for key, value in torch_model.state_dict().items():
    if not key.endswith('num_batches_tracked'):
      assert torch.equal(fresh.state_dict()[key], value), key
  chex.assert_trees_all_equal(
      convert.torch_to_flax(tmp_path / 'out.safetensors', 'resnet18'),
      variables)


def test_cli_writes_an_orbax_checkpoint(tmp_path, capsys):
  import orbax.checkpoint as ocp

  torch_model = torchvision_model('resnet18')
  torch.save(torch_model.state_dict(), tmp_path / 'in.pth')
  out = tmp_path / 'ckpt'
  assert convert.main(['resnet18', str(tmp_path / 'in.pth'), str(out)]) == 0
  assert 'wrote' in capsys.readouterr().out
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(out.absolute())
  chex.assert_trees_all_equal(
      restored, convert.torch_to_flax(torch_model.state_dict(), 'resnet18'))
  # Bad requests are reported, not raised.
  assert convert.main(['resnet18', str(tmp_path / 'in.pth'), str(out)]) == 2
  assert '--force' in capsys.readouterr().err
  assert convert.main(['resnet18', str(tmp_path / 'in.pth'),
                       str(tmp_path / 'other'), 'num_classes=10']) == 2
  assert 'skip_head=True' in capsys.readouterr().err


# ------------------------------------------------------------- error paths


def test_missing_keys_are_listed():
  state_dict = random_state_dict('resnet18')
  del state_dict['layer1.0.bn1.running_var']
  del state_dict['fc.bias']
  with pytest.raises(convert.StateDictMismatch) as info:
    convert.torch_to_flax(state_dict, 'resnet18')
  assert isinstance(info.value, ValueError)
  message = str(info.value)
  assert '2 missing key(s)' in message
  assert 'layer1.0.bn1.running_var' in message and 'fc.bias' in message
  assert info.value.missing == ['layer1.0.bn1.running_var', 'fc.bias']
  assert not info.value.unexpected and not info.value.mismatched


def test_unexpected_keys_are_listed():
  state_dict = random_state_dict('resnet18')
  state_dict['layer5.0.conv1.weight'] = np.zeros((3, 3, 1, 1), np.float32)
  state_dict['head.weight'] = np.zeros((3,), np.float32)
  with pytest.raises(convert.StateDictMismatch) as info:
    convert.torch_to_flax(state_dict, 'resnet18')
  message = str(info.value)
  assert '2 unexpected key(s)' in message
  assert 'layer5.0.conv1.weight' in message and 'head.weight' in message
  assert info.value.unexpected == ['head.weight', 'layer5.0.conv1.weight']
  assert 'strict=False' in message

  # strict=False ignores them and loads everything else.
  variables = convert.torch_to_flax(state_dict, 'resnet18', strict=False)
  np.testing.assert_array_equal(variables['params']['fc']['bias'],
                                state_dict['fc.bias'])


def test_missing_keys_with_strict_false_keep_base_values():
  state_dict = random_state_dict('resnet18')
  del state_dict['layer4.1.bn2.weight']
  base = convert.torch_to_flax(random_state_dict('resnet18', seed=1),
                               'resnet18')
  with pytest.warns(UserWarning, match='layer4.1.bn2.weight'):
    variables = convert.torch_to_flax(state_dict, 'resnet18', strict=False,
                                      base=base)
  np.testing.assert_array_equal(
      variables['params']['stage4_block1']['bn2']['scale'],
      base['params']['stage4_block1']['bn2']['scale'])
  np.testing.assert_array_equal(
      variables['params']['stage4_block1']['bn1']['scale'],
      state_dict['layer4.1.bn1.weight'])


def test_resnet50_weights_into_resnet18_explains_the_mismatch():
  with pytest.raises(convert.StateDictMismatch) as info:
    convert.torch_to_flax(random_state_dict('resnet50'), 'resnet18')
  message = str(info.value)
  assert 'layer1.0.conv3.weight' in message  # unexpected
  assert 'layer3.5.bn2.running_mean' in message  # unexpected
  assert ('layer1.0.conv1.weight: got (64, 64, 1, 1), expected (64, 64, 3, 3)'
          in message)
  assert 'fc.weight: got (1000, 2048), expected (1000, 512)' in message
  assert 'bottleneck blocks with depths (3, 4, 6, 3)' in message
  fix = message.split('Fix:')[1]
  assert 'presets that match the state_dict: resnet50,' in fix
  assert 'num_classes' not in fix  # both heads have 1000 outputs
  # Every problem is listed, not just the first.
  assert len(info.value.unexpected) == len(
      set(convert.torch_names('resnet50')) - set(
          convert.torch_names('resnet18')) - {
              k for k in convert.torch_names('resnet50')
              if k.endswith('num_batches_tracked')})
  # Shape mismatches raise even with strict=False.
  with pytest.raises(convert.StateDictMismatch):
    convert.torch_to_flax(random_state_dict('resnet50'), 'resnet18',
                          strict=False)


def test_num_classes_mismatch_and_skip_head():
  state_dict = random_state_dict('resnet18')
  with pytest.raises(convert.StateDictMismatch) as info:
    convert.torch_to_flax(state_dict, 'resnet18', num_classes=10)
  message = str(info.value)
  assert 'fc.weight: got (1000, 512), expected (10, 512)' in message
  assert 'fc.bias: got (1000,), expected (10,)' in message
  assert 'pass num_classes=1000' in message and 'skip_head=True' in message
  assert info.value.mismatched == [('fc.weight', (1000, 512), (10, 512)),
                                   ('fc.bias', (1000,), (10,))]

  variables = convert.torch_to_flax(state_dict, 'resnet18', num_classes=10,
                                    skip_head=True, rng=jax.random.key(4))
  chex.assert_shape(variables['params']['fc']['kernel'], (512, 10))
  assert np.any(np.asarray(variables['params']['fc']['kernel']) != 0)
  np.testing.assert_array_equal(
      variables['params']['stem']['conv1']['kernel'],
      state_dict['conv1.weight'].transpose(2, 3, 1, 0))
  logits, _ = flax_forward(create_model('resnet18', num_classes=10),
                           variables, images(32))
  chex.assert_shape(logits, (2, 10))


def test_unloaded_layers_are_initialised_from_rng():
  # A tiny net: each filled layer compiles its own initialiser.
  spec = create_model('resnet20', depths=(1, 1), widths=(4, 8), stem_width=4,
                      num_classes=3).spec
  state_dict = random_state_dict(spec)
  del state_dict['layer2.0.conv1.weight']

  def load(seed):
    with pytest.warns(UserWarning, match='layer2.0.conv1.weight'):
      variables = convert.torch_to_flax(state_dict, spec, strict=False,
                                        rng=jax.random.key(seed))
    return variables['params']

  first, again, other = load(11), load(11), load(12)
  chex.assert_trees_all_equal(first, again)
  filled = first['stage2_block0']['conv1']['kernel']
  chex.assert_shape(filled, (3, 3, 4, 8))
  assert np.all(np.asarray(filled) != 0)
  assert not np.array_equal(filled, other['stage2_block0']['conv1']['kernel'])
  np.testing.assert_array_equal(
      first['fc']['kernel'], state_dict['fc.weight'].T)
  np.testing.assert_array_equal(
      first['stage2_block0']['conv2']['kernel'],
      state_dict['layer2.0.conv2.weight'].transpose(2, 3, 1, 0))


def test_hugging_face_names_are_pointed_at_the_renamer():
  hf_names = {'resnet.embedder.embedder.convolution.weight':
              np.zeros((64, 3, 7, 7), np.float32)}
  with pytest.raises(convert.StateDictMismatch,
                     match='hf_to_torchvision_keys'):
    convert.torch_to_flax(hf_names, 'resnet18')
  with pytest.raises(convert.StateDictMismatch, match='encoder.pooler.weight'):
    convert.hf_to_torchvision_keys({'encoder.pooler.weight': np.zeros(1)})


def test_flax_to_torch_rejects_variables_of_another_model():
  variables = convert.torch_to_flax(random_state_dict('resnet18'), 'resnet18')
  with pytest.raises(ValueError, match='params/stage1_block0/conv3/kernel'):
    convert.flax_to_torch(variables, 'resnet50')
