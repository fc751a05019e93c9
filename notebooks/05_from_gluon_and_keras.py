# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Coming from Gluon or Keras
#
# MXNet moved to the Apache Attic in 2023; Keras users want Flax modules. This
# notebook shows that the `gluon_*` and `keras_*` presets are the libraries'
# *exact* networks — same layout, same parameter counts, same logits — and how
# to load their weight files with one call.
#
# 1. The Gluon question — why does `resnet50_v1`'s first projection have
#    stride 1 while `resnet18_v1`'s all have stride 2? — answered from the
#    Gluon-exact reference table (extracted from MXNet 1.9.1's own model zoo).
# 2. `convert.load_weights`, which reads Gluon `.params`, Keras `.weights.h5`
#    and `.h5`, torch and safetensors files by their content.
# 3. Logits that agree with Keras (always run here) and with MXNet (when an
#    MXNet interpreter is configured in `FLAX_RESNET_MXNET_PYTHON`).
#
# Every cell asserts what it claims.

# %%
import os

os.environ.setdefault('KERAS_BACKEND', 'jax')  # before Keras is imported

import contextlib
import io
import pathlib
import subprocess
import tempfile

# Before JAX starts its CPU backend (jax.devices() below), so that its malloc
# settings apply (README, "Performance").
import flax_resnet  # pylint: disable=unused-import

import jax
import numpy as np

from flax_resnet import convert, create_model, layout, references
from flax_resnet import layout_compare, layout_report

# %% [markdown]
# ## 1. The Gluon question, from the Gluon-exact table
#
# `flax_resnet/references/gluon_v1.json` was extracted by building
# `mxnet.gluon.model_zoo.vision.resnet50_v1()` and `resnet18_v1()` and
# recording every block's strides, shortcut and parameter count. Our
# `gluon_resnet50_v1` / `gluon_resnet18_v1` are traced the same way and must
# match row for row, parameter counts included.

# %%
for preset in ('gluon_resnet50_v1', 'gluon_resnet18_v1'):
  entry = references.lookup('gluon_v1', preset, 224)
  print(f'Gluon {entry["reference_model"]}: trainable parameters '
        f'{entry["total_params"]:,}')
  for row in entry['blocks']:
    if row['shortcut'] != 'identity':
      print(f'  stage {row["stage"]} block {row["index"]}: '
            f'{row["in_channels"]}->{row["out_channels"]} channels, '
            f'{row["in_size"][0]}->{row["out_size"][0]} px, projection with '
            f'stride {row["shortcut_stride"]} (Gluon layer '
            f'{row["library_block"]})')
  ours = layout.layout_of(preset)
  # Counts included.
  assert layout_compare.compare(ours, entry, 'gluon_v1') == []
  assert ours.total_params == entry['total_params']

r50 = references.lookup('gluon_v1', 'gluon_resnet50_v1', 224)['blocks']
r18 = references.lookup('gluon_v1', 'gluon_resnet18_v1', 224)['blocks']
first = r50[0]
assert (first['shortcut'], first['shortcut_stride']) == ('projection', 1)
assert first['in_size'] == first['out_size'] == [56, 56]
assert first['in_channels'] == 64 and first['out_channels'] == 256
assert [r['shortcut_stride'] for r in r18 if r['shortcut'] == 'projection'] \
    == [2, 2, 2]
assert r18[0]['shortcut'] == 'identity'

# %% [markdown]
# **Answer.** A projection exists only where the channels change (Gluon builds
# `downsample` when `channels != in_channels`). resnet50's bottleneck widens
# stage 1 from 64 to 256 channels, so stage 1 needs a projection — but the
# stem's stride-2 conv and stride-2 max-pool have already brought the image to
# 56x56, and stage 1 does not downsample, so that projection has stride 1.
# resnet18's basic blocks keep 64 channels in stage 1 (identity, no
# projection); its only projections are where stages 2–4 halve the size, so
# all of them have stride 2. The layout CLI says the same in words:

# %%
printed = io.StringIO()
with contextlib.redirect_stdout(printed):  # python -m flax_resnet.layout ...
  status = layout_report.main(['gluon_resnet50_v1'])
print(printed.getvalue())
assert status == 0
assert 'the projection is a 1x1 with stride 1 (64->256)' in printed.getvalue()
assert 'reference gluon_v1: MATCH' in printed.getvalue()
assert 'parameter counts agree' in printed.getvalue()

# %% [markdown]
# What else makes Gluon's nets differ from torchvision's, beyond the stride
# placement (v1 strides on the first 1x1): Gluon's BottleneckV1 gives its two
# 1x1 convs a bias, and Gluon V2 starts with a BatchNorm that has no scale and
# no shift. Those are spec fields, not subclasses:

# %%
for preset in ('gluon_resnet50_v1', 'gluon_resnet50_v2', 'keras_resnet50',
               'keras_resnet50_v2'):
  spec = create_model(preset).spec
  print(preset)
  for line in layout_report.spec_notes(spec):
    print('  *', line)
assert create_model('gluon_resnet50_v1').spec.conv_bias == ('conv1', 'conv3')
assert create_model('gluon_resnet50_v2').spec.input_norm

# %% [markdown]
# ## 2. Loading Keras weights, and logits that agree with Keras
#
# Keras builds its own ResNet50; we give it random weights and random,
# non-trivial BatchNorm moving statistics, save them with Keras' own
# `save_weights`, and load the file with one call. No Keras is needed for the
# loading itself (h5py reads the file).

# %%
import keras  # noqa: E402  (after KERAS_BACKEND)

assert keras.backend.backend() == 'jax'
rng = np.random.default_rng(0)
keras_model = keras.applications.ResNet50(
    weights=None, input_shape=(224, 224, 3), classifier_activation=None)
for keras_layer in keras_model.layers:
  new_weights = []
  for variable in keras_layer.weights:
    shape, leaf = tuple(variable.shape), variable.path.split('/')[-1]
    if leaf == 'kernel':
      value = rng.normal(0, np.sqrt(2 / np.prod(shape[:-1])), shape)
    elif leaf in ('gamma', 'moving_variance'):
      value = rng.uniform(0.5, 1.5, shape)
    else:
      value = rng.normal(0, 0.2, shape)
    new_weights.append(value.astype(np.float32))
  if new_weights:
    keras_layer.set_weights(new_weights)

workdir = pathlib.Path(tempfile.mkdtemp())
keras_model.save_weights(workdir / 'resnet50.weights.h5')

# %%
variables = convert.load_weights(workdir / 'resnet50.weights.h5',
                                 'keras_resnet50')
model = create_model('keras_resnet50')

images = rng.normal(0, 1, (2, 224, 224, 3)).astype(np.float32)
theirs = np.asarray(keras_model(images, training=False))
ours = np.asarray(jax.jit(model.apply)(variables, images))
error = np.abs(ours - theirs).max() / np.abs(theirs).max()
print(f'max |logits| {np.abs(theirs).max():.1f}, max relative error {error:.1e}')
assert error < 1e-5

count = sum(x.size for x in jax.tree.leaves(variables['params']))
print(f'parameters: ours {count:,}, Keras trainable '
      f'{sum(int(np.prod(w.shape)) for w in keras_model.trainable_weights):,}')
assert count == sum(int(np.prod(w.shape))
                    for w in keras_model.trainable_weights)
everything = sum(x.size for x in jax.tree.leaves(variables))
assert everything == keras_model.count_params()  # BN moving stats included

# %% [markdown]
# ## 3. Gluon `.params`, with MXNet when it is installed
#
# The `.params` file is read with numpy; MXNet is not needed to load it. To
# compare logits with MXNet itself, point `FLAX_RESNET_MXNET_PYTHON` at a
# Python that has `mxnet==1.9.1` (CI creates one). Without it, the cell still
# checks the file round trip: our variables written as Gluon `.params`
# (`convert.save_gluon`) and read back are bit-identical.

# %%
gluon_preset = 'gluon_resnet18_v2'
gluon_model = create_model(gluon_preset)
gluon_variables = gluon_model.init(jax.random.key(0),
                                   np.zeros((1, 64, 64, 3), np.float32))
convert.save_gluon(gluon_variables, gluon_preset, workdir / 'resnet18.params')
reloaded = convert.load_weights(workdir / 'resnet18.params', gluon_preset)
jax.tree.map(np.testing.assert_array_equal, reloaded, gluon_variables)

mxnet_python = os.environ.get('FLAX_RESNET_MXNET_PYTHON')
if mxnet_python and pathlib.Path(mxnet_python).exists():
  np.save(workdir / 'images.npy', images.transpose(0, 3, 1, 2))
  script = (
      'import mxnet as mx, numpy as np\n'
      'from mxnet.gluon.model_zoo import vision\n'
      f'd = {str(workdir)!r}\n'
      'net = vision.resnet18_v2()\n'
      'net.load_parameters(d + "/resnet18.params", ctx=mx.cpu())\n'
      'x = mx.nd.array(np.load(d + "/images.npy"))\n'
      'np.save(d + "/gluon_logits.npy", net(x).asnumpy())\n')
  subprocess.run([mxnet_python, '-c', script], check=True)
  theirs = np.load(workdir / 'gluon_logits.npy')
  ours = np.asarray(jax.jit(gluon_model.apply)(gluon_variables, images))
  error = np.abs(ours - theirs).max() / np.abs(theirs).max()
  print(f'MXNet {gluon_preset}: max relative error {error:.1e}')
  assert error < 1e-5
else:
  print('FLAX_RESNET_MXNET_PYTHON is not set: MXNet logits not computed '
        '(tests/test_convert_parity.py runs them in CI).')

# %% [markdown]
# ## The load call, for your own files
#
# ```python
# from flax_resnet import convert, create_model
# variables = convert.load_weights('resnet50_v1-c940b1a0.params', 'gluon_resnet50_v1')
# variables = convert.load_weights('resnet50v2.h5', 'keras_resnet50_v2')
# logits = create_model('gluon_resnet50_v1').apply(variables, images)  # NHWC
# ```
#
# Gluon model-zoo nets take images normalised with the ImageNet mean and std;
# Keras' `resnet.preprocess_input` is "caffe" style (BGR, mean subtracted, no
# scaling) and `resnet_v2.preprocess_input` scales to [-1, 1]. The networks
# here are the same; the preprocessing is yours to match.
