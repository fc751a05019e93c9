# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Shortcuts and strides: why resnet50's first projection has stride 1
#
# Two questions come up again and again:
#
# 1. **Why does resnet50's first `downsample` have stride 1, while every
#    `downsample` of resnet18 has stride 2?**
# 2. **How does `downsample` work: zero-padding (option A) or a 1x1 conv
#    (option B)?**
#
# Short answers, each checked by an `assert` below:
#
# 1. A bottleneck stage 1 turns 64 channels into 64 x 4 = 256, so its first
#    block needs a 1x1 *projection* to make the shortcut 256 channels wide.
#    The spatial size is already 56x56, because the stem's 3x3/2 max-pool
#    has halved 112 to 56, and stage 1 keeps that size: the projection only
#    changes channels, so its stride is 1. resnet18/34 (basic blocks) keep
#    64 channels in stage 1, so the identity already fits and there is no
#    projection at all; the only projections are the first blocks of stages
#    2-4, which halve the size, so all of them have stride 2.
# 2. torchvision uses option **B**: a 1x1 conv with the block's stride
#    followed by BatchNorm, only where the shape changes. Option **A**
#    (the CIFAR nets of the paper) subsamples `x[::2, ::2]` and appends zero
#    channels, with no parameters. Option **C** projects in every block and
#    option **D** (ResNet-D, timm `resnet50d`) average-pools 2x2 before a
#    stride-1 projection. All four are one field, `shortcut`, of the spec.
#
# Every table here is *derived* by tracing the Flax module
# (`flax_resnet.layout`), and the reference tables were extracted from the
# reference libraries' own models (`flax_resnet/references/*.json`).

# %%
import pathlib
import sys

# Before JAX starts its CPU backend (jax.devices() below), so that its malloc
# settings apply (README, "Performance").
import flax_resnet

import jax

REPO = next(p for p in [pathlib.Path.cwd(), *pathlib.Path.cwd().parents]
            if (p / 'configs' / 'quickstart.py').is_file())
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))
# Compile everything afresh: nothing is read from or written to a persistent
# compilation cache.
jax.config.update('jax_enable_compilation_cache', False)
print(f'{sys.executable}: jax {jax.__version__} on '
      f'{jax.devices()[0].platform}; repo {REPO}')

# %%
import zipfile

import flax.linen as nn
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import torch

from flax_resnet import convert
from flax_resnet import layers
from flax_resnet import layout
from flax_resnet import layout_check
from flax_resnet import layout_report
from flax_resnet import references
from flax_resnet.references import torchvision_source


def block_row(table: layout.Layout, stage: int, index: int):
  return next(b for b in table.blocks
              if (b.stage, b.index) == (stage, index))


def shortcut_words(row: dict) -> str:
  """A reference row's shortcut in the words of layout_report.format_table."""
  kind, stride = row['shortcut'], row['shortcut_stride']
  norm = ' + BN' if row['shortcut_norm'] else ''
  if kind == 'identity':
    return 'identity'
  if kind == 'zero-pad':
    return f'A: x[::{stride}, ::{stride}] + zero channels'
  if kind == 'avgpool+projection':
    return f'avgpool 2x2/{stride} -> 1x1 conv s1{norm}'
  return f'1x1 conv s{stride}{norm}'


def reference_table(name: str, model: str) -> str:
  """A reference entry as text, in the columns of layout_report.format_table."""
  entry = references.load(name)['models'][model]
  head = ('stage', 'block', 'channels', 'size', 'stride on', 'shortcut',
          'params', f'{name} module')
  stem = entry['stem']
  rows = [head, ('stem', '', f'3->{stem["out_channels"]}',
                 f'{entry["input_size"]}->{stem["out_size"][0]}',
                 ' -> '.join(stem['layers']), '',
                 f'{stem["params"]:,}' if stem['params'] else 'n/a', '')]
  for b in entry['blocks']:
    stride = (f'{b["library_stride_layer"]} {b["stride_at"]} '
              f's{b["in_size"][0] // b["out_size"][0]}'
              if b['stride_at'] != 'none' else '-')
    rows.append((str(b['stage']), str(b['index']),
                 f'{b["in_channels"]}->{b["out_channels"]}',
                 f'{b["in_size"][0]}->{b["out_size"][0]}', stride,
                 shortcut_words(b),
                 f'{b["params"]:,}' if b['params'] is not None else 'n/a',
                 b['library_block']))
  total = entry.get('total_params')
  rows.append(('total', '', '', '', '', '',
               f'{total:,}' if total else 'n/a', ''))
  widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
  lines = ['  '.join(c.rjust(w) if i == 6 else c.ljust(w)
                     for i, (c, w) in enumerate(zip(r, widths))).rstrip()
           for r in rows]
  lines.insert(1, '-' * max(len(line) for line in lines))
  return '\n'.join(lines)


# %% [markdown]
# ## 1. resnet18 and resnet50: the derived layout next to torchvision's
#
# `layout.derive_layout` runs `model.init` under `jax.eval_shape` and
# records every submodule call, so each row below is what the module
# actually does. Under it, the same rows extracted from torchvision's own
# `models/resnet.py` (run on CPU PyTorch). `layout_check.check` raises
# `LayoutMismatch` on any difference in channels, sizes, the strided conv,
# the shortcut or the parameter count.

# %%
resnet18 = flax_resnet.create_model('resnet18')
resnet50 = flax_resnet.create_model('resnet50')
layout18 = layout.derive_layout(resnet18, (1, 224, 224, 3), 'resnet18')
layout50 = layout.derive_layout(resnet50, (1, 224, 224, 3), 'resnet50')

for table in (layout18, layout50):
  print(f'== {table.model}: derived from the Flax module, input 224x224')
  print(layout_report.format_table(table))
  print(f'\n== {table.model}: torchvision reference')
  print(reference_table('torchvision', table.model))
  # Raises LayoutMismatch on a difference.
  layout_check.check(table, 'torchvision')
  print(f'\nlayout_check.check({table.model!r}, torchvision): MATCH\n')

# %% [markdown]
# `layout_report.notes` puts the first block of each stage into words. Read
# resnet50's stage 1 against resnet18's:

# %%
for table in (layout18, layout50):
  print(table.model)
  for line in layout_report.notes(table):
    print('  *', line)

# %% [markdown]
# ### Where the 56x56 comes from
#
# The stem's submodule calls, from the same trace: the 7x7/2 conv takes 224
# to 112, and the 3x3/2 max-pool takes 112 to 56. Stage 1 therefore starts
# at 56x56 and keeps it (`strides=(1, 2, 2, 2)`), so its projection has
# nothing to subsample.

# %%
calls, _ = layout.trace(resnet50, (1, 224, 224, 3))
stem_calls = {c.path[-1]: c for c in calls
              if len(c.path) == 2 and c.path[0] == 'stem'}
for name, call in stem_calls.items():
  print(f'stem/{name:6s} {type(call.module).__name__:10s} '
        f'{call.in_shape} -> {call.out_shape}')

assert stem_calls['conv1'].out_shape[1:3] == (112, 112)
assert stem_calls['pool'].in_shape[1:3] == (112, 112)
assert stem_calls['pool'].out_shape[1:3] == (56, 56)
assert layout50.stem_out_size == (56, 56)
assert flax_resnet.get_spec('resnet50').stage_strides == (1, 2, 2, 2)

# %% [markdown]
# ### torchvision's own rule
#
# The `downsample` condition in torchvision's `ResNet._make_layer`, read
# from the torchvision wheel, and the modules it builds:

# %%
with zipfile.ZipFile(torchvision_source.find_wheel()) as wheel:
  source = wheel.read('torchvision/models/resnet.py').decode()
start = source.index('        if stride != 1 or self.inplanes')
print(source[start:source.index('\n\n', start)])

with torch.device('meta'):  # module structure only, no weights
  tv18 = torchvision_source.build('resnet18')
  tv50 = torchvision_source.build('resnet50')
print('\nresnet18 layer1[0].downsample:', tv18.layer1[0].downsample)
print('resnet18 layer2[0].downsample:', tv18.layer2[0].downsample)
print('resnet50 layer1[0].downsample:', tv50.layer1[0].downsample)

assert 'if stride != 1 or self.inplanes != planes * block.expansion:' in source
assert tv18.layer1[0].downsample is None
assert tv18.layer2[0].downsample[0].stride == (2, 2)
assert tv50.layer1[0].downsample[0].stride == (1, 1)
assert (tv50.layer1[0].downsample[0].in_channels,
        tv50.layer1[0].downsample[0].out_channels) == (64, 256)

# %% [markdown]
# ### Question 1, asserted
#
# From our derived tables *and* from torchvision's table:
#
# * resnet50 stage 1 block 0: projection, stride 1, 64 -> 256 channels,
#   input already 56x56 (the stem's output), no strided conv in the block.
# * resnet18: stage 1 has no projection (64 -> 64, identity); its only
#   projections are stages 2-4 block 0, all stride 2, halving the size.

# %%
torchvision18 = references.lookup('torchvision', 'resnet18', 224)
torchvision50 = references.lookup('torchvision', 'resnet50', 224)
ref_row = lambda entry, s, i: next(
    b for b in entry['blocks'] if (b['stage'], b['index']) == (s, i))

first50 = block_row(layout50, 1, 0)
assert first50.shortcut == 'projection' and first50.shortcut_stride == 1
assert (first50.in_channels, first50.out_channels) == (64, 256)
assert first50.in_size == first50.out_size == layout50.stem_out_size == (56, 56)
assert first50.stride_at == 'none'
ref50 = ref_row(torchvision50, 1, 0)
assert (ref50['shortcut'], ref50['shortcut_stride'], ref50['in_channels'],
        ref50['out_channels'], ref50['in_size']) == (
            'projection', 1, 64, 256, [56, 56])

# (stage, block, stride) of every projection, here and in torchvision.
expected = {'resnet18': [(2, 0, 2), (3, 0, 2), (4, 0, 2)],
            'resnet50': [(1, 0, 1), (2, 0, 2), (3, 0, 2), (4, 0, 2)]}
for table, entry in ((layout18, torchvision18), (layout50, torchvision50)):
  ours = [(b.stage, b.index, b.shortcut_stride) for b in table.blocks
          if b.shortcut == 'projection']
  theirs = [(b['stage'], b['index'], b['shortcut_stride'])
            for b in entry['blocks'] if b['shortcut'] == 'projection']
  assert ours == theirs == expected[table.model], (ours, theirs)
  assert all(b.in_size[0] == 2 * b.out_size[0] for b in table.blocks
             if b.shortcut == 'projection' and b.stage > 1)

stage1_18 = [b for b in layout18.blocks if b.stage == 1]
assert all(b.shortcut == 'identity' and b.in_channels == b.out_channels == 64
           for b in stage1_18)
print('Question 1: resnet50 stage-1 projection is 1x1/1 64->256 at 56x56; '
      'resnet18 has no stage-1 projection and all its projections are '
      'stride 2.')


# %% [markdown]
# ## 2. Shortcut options A, B, C and D on one net
#
# The same resnet18 with `shortcut=` overridden. Only the skip paths differ;
# the main paths, and therefore every output shape, are identical:
#
# | option | skip path where the shape changes | elsewhere | where the skip path's stride sits |
# |---|---|---|---|
# | A | `x[::2, ::2]` + zero channels (0 params) | identity | slicing: keeps 1 pixel of every 2x2 |
# | B | 1x1 conv, stride 2, + BN | identity | on the 1x1 conv (also keeps 1 of 4 pixels) |
# | C | 1x1 conv, stride 2, + BN | 1x1 conv stride 1 + BN | on the 1x1 conv |
# | D | 2x2 avg-pool stride 2, then 1x1 conv stride 1 + BN | identity | on the avg-pool (every pixel counts) |

# %%
def shortcut_param_count(variables) -> int:
  return sum(int(np.prod(leaf.shape))
             for name, block in variables['params'].items()
             if name.startswith('stage') and 'shortcut' in block
             for leaf in jax.tree.leaves(block['shortcut']))


image = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
options = {}
for option in 'ABCD':
  model = flax_resnet.create_model('resnet18', shortcut=option)
  table = layout.derive_layout(model, image.shape, f'resnet18 {option}')
  variables = jax.eval_shape(
      lambda m=model: m.init(jax.random.key(0), jnp.zeros(image.shape)))
  logits, features = jax.eval_shape(
      lambda v, x, m=model: m.apply(v, x, mutable=['intermediates']),
      variables, image)
  shapes = {k: v[0].shape for k, v in features['intermediates'].items()}
  options[option] = dict(model=model, table=table,
                         shortcut_params=shortcut_param_count(variables),
                         shapes=shapes, logits=logits.shape)

print(f'{"option":6s} {"total params":>13s} {"shortcut params":>16s} '
      f'{"blocks with a skip module":>26s}  stage-2 block-0 shortcut')
for option, o in options.items():
  with_module = sum(b.shortcut != 'identity' for b in o['table'].blocks)
  print(f'{option:6s} {o["table"].total_params:13,d} '
        f'{o["shortcut_params"]:16,d} {with_module:26d}  '
        f'{block_row(o["table"], 2, 0).shortcut_text()}')
print('\nthe same (2, 224, 224, 3) input through each:')
for option, o in options.items():
  print(f'  {option}:', ' '.join(f'{k}={o["shapes"][k][1:]}' for k in
                                 ('stem_out', 'stage1', 'stage2', 'stage3',
                                  'stage4')), f'logits={o["logits"]}')

# %% [markdown]
# The counts are checked against arithmetic done by hand: a stride-2
# projection from `c_in` to `c_out` channels holds `c_in * c_out` conv
# weights plus `2 * c_out` BN parameters.

# %%
transitions = [(64, 128), (128, 256), (256, 512)]
projection_params = sum(cin * cout + 2 * cout for cin, cout in transitions)
every_block = projection_params + sum(  # option C: stride-1 1x1 elsewhere
    c * c + 2 * c for c in (64, 64, 128, 256, 512))
assert options['A']['shortcut_params'] == 0
assert options['B']['shortcut_params'] == projection_params == 173_824
assert options['D']['shortcut_params'] == projection_params  # pool: no params
assert options['C']['shortcut_params'] == every_block
assert options['B']['table'].total_params == 11_689_512  # torchvision resnet18
assert (options['B']['table'].total_params - options['A']['table'].total_params
        == projection_params)
assert all(o['shapes'] == options['B']['shapes'] and o['logits'] == (2, 1000)
           for o in options.values())
assert sum(b.shortcut != 'identity' for b in options['C']['table'].blocks) == 8
print('parameter counts agree with the hand count; all shapes identical')

# %%
stages = [1, 2, 3, 4]
fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6))
for offset, (option, o) in enumerate(options.items()):
  per_stage = [sum(b.params for b in o['table'].blocks if b.stage == s)
               for s in stages]
  baseline = [sum(b.params for b in options['A']['table'].blocks
                  if b.stage == s) for s in stages]
  left.bar(np.arange(4) + (offset - 1.5) * 0.2,
           np.subtract(per_stage, baseline) / 1e3, width=0.2,
           label=f'option {option}')
  right.bar(option, o['table'].total_params / 1e6)
left.set_xticks(range(4), [f'stage {s}' for s in stages])
left.set_ylabel('skip-path params (thousands)')
left.set_title('resnet18: parameters the shortcut adds, per stage')
left.legend()
right.set_ylabel('millions')
right.set_ylim(11.3, 12.1)
right.set_title('total parameters')
plt.tight_layout()
plt.show()

# %% [markdown]
# ### Option A numerically, through `flax_resnet.layers.Shortcut`
#
# The skip module on its own, 64 -> 128 channels with stride 2 on one
# 8x8 input. Option A's output *is* the subsampled input with 32 zero
# channels on each side (`zero_pad='both'`, akamaster's CIFAR code) or 64
# after it (`zero_pad='after'`, fb.resnet.torch); option D's pool is the
# mean of each 2x2 window.

# %%
x = jax.random.normal(jax.random.key(0), (1, 8, 8, 64))
conv = layers.make_conv('torch', jnp.float32, jnp.float32)
norm = layers.make_norm(False, 0.9, 1e-5, jnp.float32, jnp.float32)

outputs = {}
for mode, zero_pad in (('A', 'both'), ('A', 'after'), ('conv', 'both'),
                       ('avgpool_conv', 'both')):
  shortcut = layers.Shortcut(mode, 128, 2, conv,
                             None if mode == 'A' else norm, zero_pad)
  variables = shortcut.init(jax.random.key(1), x)
  y = shortcut.apply(variables, x)
  count = sum(leaf.size for leaf in jax.tree.leaves(variables.get('params', {})))
  outputs[mode, zero_pad] = y
  print(f'{mode:13s} zero_pad={zero_pad:5s} {x.shape} -> {y.shape}, '
        f'{count:,} params')

subsampled = x[:, ::2, ::2, :]
both, after = outputs['A', 'both'], outputs['A', 'after']
np.testing.assert_array_equal(both[..., 32:96], subsampled)
np.testing.assert_array_equal(both[..., :32], 0)
np.testing.assert_array_equal(both[..., 96:], 0)
np.testing.assert_array_equal(after[..., :64], subsampled)
np.testing.assert_array_equal(after[..., 64:], 0)
assert all(y.shape == (1, 4, 4, 128) for y in outputs.values())

pooled = layers.AvgPool(2, 2).apply({}, x)
np.testing.assert_allclose(pooled, x.reshape(1, 4, 2, 4, 2, 64).mean((2, 4)),
                           rtol=1e-6)
print('\noption A = x[:, ::2, ::2] plus zero channels, exactly; option D pool '
      '= mean of each 2x2 window')

# %% [markdown]
# ### resnet20: the paper's option A against option B
#
# He et al. (2015, section 4.2) train the CIFAR nets with option A, so
# `resnet20` is option A and its layout is checked against the paper's
# table. Overriding `shortcut='B'` adds two projections, and the check
# says exactly where it no longer is the paper's net.

# %%
layout20_a = layout.layout_of('resnet20')
layout20_b = layout.layout_of('resnet20', shortcut='B')
for option, table in (('A', layout20_a), ('B', layout20_b)):
  print(f'resnet20 shortcut={option!r}: {table.total_params:,} params')
  for b in table.blocks:
    if b.index == 0 and b.stage > 1:
      print(f'   stage {b.stage} block 0: {b.shortcut_text()}, {b.params:,} params')

layout_check.check(layout20_a, 'paper')
try:
  layout_check.check(layout20_b, 'paper')
except layout_check.LayoutMismatch as mismatch:
  problems = mismatch.problems
print('\nresnet20 shortcut=B against the paper:')
print('\n'.join('  - ' + p for p in problems))

assert layout20_a.total_params == 269_722  # the paper's "0.27M"
assert layout20_b.total_params - layout20_a.total_params == (
    16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
assert any('shortcut is' in p for p in problems)

# %% [markdown]
# ## 3. v1 against v1.5: which conv of a bottleneck carries the stride
#
# The original ResNet (Caffe, Keras `ResNet50`, Gluon `resnet50_v1`) puts
# the stride on the **first 1x1** conv of the block; torchvision and NVIDIA
# ("ResNet v1.5") put it on the **3x3**. The parameters are identical, but
# a 1x1 stride-2 conv reads only one pixel of every 2x2 window: three
# quarters of the block's input never reach its main path. NVIDIA reports
# v1.5 about 0.5% more accurate (top-1) and a few percent slower.
#
# In this project that is `stride_in='1x1'` (preset `resnet50_v1`) against
# `stride_in='3x3'` (preset `resnet50`).

# %%
layout50_v1 = layout.layout_of('resnet50_v1')
print(layout_report.format_table(layout50_v1))

libraries = [
    ('resnet50_v1 (here)', layout50_v1, None, None),
    ('resnet50 (here)', layout50, None, None),
    ('Gluon resnet50_v1', None, 'gluon_v1', 'resnet50_v1'),
    ('Keras ResNet50', None, 'keras', 'resnet50_v1'),
    ('torchvision resnet50', None, 'torchvision', 'resnet50'),
]
print(f'\n{"":22s} strided conv of stages 2, 3, 4 (block 0)')
for label, table, ref, model in libraries:
  if table is not None:
    cells = [f'{b.stride_conv} ({b.stride_at})' for b in table.blocks
             if b.index == 0 and b.stage > 1]
  else:
    entry = references.load(ref)['models'][model]
    cells = [f'{b["library_stride_layer"]} ({b["stride_at"]})'
             for b in entry['blocks'] if b['index'] == 0 and b['stage'] > 1]
  print(f'{label:22s} ' + ', '.join(cells))

# %%
for table, conv_name, kernel in ((layout50_v1, 'conv1', '1x1'),
                                 (layout50, 'conv2', '3x3')):
  strided = [b for b in table.blocks if b.stride_conv]
  assert [(b.stage, b.index) for b in strided] == [(2, 0), (3, 0), (4, 0)]
  assert all(b.stride_conv == conv_name and b.stride_at == kernel
             for b in strided)
assert layout50_v1.total_params == layout50.total_params == 25_557_032

layout_check.check(layout50_v1, 'gluon_v1')  # true v1 ...
layout_check.check(layout50_v1, 'keras')     # ... and Keras agree with it
try:
  layout_check.check(layout50_v1, 'torchvision', 'resnet50')
  raise AssertionError('v1 must not match torchvision (v1.5)')
except layout_check.LayoutMismatch as mismatch:
  print('resnet50_v1 against torchvision resnet50:')
  print('\n'.join('  - ' + p for p in mismatch.problems))
  assert all('strided conv' in p for p in mismatch.problems)
  assert len(mismatch.problems) == 3

# %% [markdown]
# How much of its input a strided conv reads: the gradient of the output
# with respect to an 8x8 input is non-zero exactly at the pixels it uses.

# %%
probe = jnp.ones((1, 8, 8, 4))
for kernel in (1, 3):
  strided_conv = nn.Conv(4, (kernel, kernel), strides=2,
                         padding=layers.torch_padding(kernel))
  params = strided_conv.init(jax.random.key(0), probe)
  grad = jax.grad(lambda x: strided_conv.apply(params, x).sum())(probe)
  read = float(jnp.mean(jnp.any(grad != 0, axis=-1)))
  print(f'{kernel}x{kernel} stride 2 reads {read:.0%} of the input pixels')
  assert read == (0.25 if kernel == 1 else 1.0)

# %% [markdown]
# ## 4. Why `padding='same'` breaks parity with torchvision weights
#
# PyTorch pads every conv symmetrically by `k // 2`. XLA's `'SAME'` pads
# the *total* `(out - 1) * stride + k - in`, and puts the odd pixel at the
# end. For stride 1 both give `(1, 1)` on a 3x3. For stride 2 on an even
# input, `'SAME'` pads `(0, 1)` on a 3x3 (and `(2, 3)` on the 7x7 stem, and
# `(0, 1)` on the max-pool): the output shape is the same, but every window
# is shifted by one pixel. The pads below are computed by JAX itself:

# %%
print(f'{"layer":26s} {"input":>5s}  {"torch":>7s}  {"SAME":>7s}')
rows = [('stem conv 7x7/2', 7, 2, 224), ('stem max-pool 3x3/2', 3, 2, 112),
        ('block conv 3x3/2', 3, 2, 56), ('projection 1x1/2', 1, 2, 56),
        ('block conv 3x3/1', 3, 1, 56), ('odd input: conv 3x3/2', 3, 2, 57)]
pads = {}
for name, kernel, stride, size in rows:
  same = tuple(jax.lax.padtype_to_pads((size,), (kernel,), (stride,),
                                       'SAME')[0])
  torch_pad = layers.torch_padding(kernel)[0]
  pads[name] = (torch_pad, same)
  print(f'{name:26s} {size:5d}  {str(torch_pad):>7s}  {str(same):>7s}')
assert pads['block conv 3x3/2'] == ((1, 1), (0, 1))
assert pads['stem conv 7x7/2'] == ((3, 3), (2, 3))
assert pads['block conv 3x3/1'] == ((1, 1), (1, 1))
assert pads['odd input: conv 3x3/2'] == ((1, 1), (1, 1))


# %% [markdown]
# The windows of a 3x3 stride-2 conv on an 8-pixel row, found by feeding
# each pixel alone through the real conv (`jax.lax.conv_general_dilated`)
# and seeing which outputs it reaches:

# %%
def windows(padding, width=8, kernel=3, stride=2):
  """windows[i] = the input pixels that output i reads."""
  one_hot = jnp.eye(width)[:, None, :]  # (pixel, channel, width)
  reach = jax.lax.conv_general_dilated(
      one_hot, jnp.ones((1, 1, kernel)), (stride,), [padding])[:, 0, :]
  return [[int(j) for j in np.flatnonzero(reach[:, i])]
          for i in range(reach.shape[1])]

torch_windows = windows(layers.torch_padding(3)[0])
same_windows = windows(tuple(jax.lax.padtype_to_pads((8,), (3,), (2,),
                                                     'SAME')[0]))
print('torch (1, 1):', torch_windows)
print('SAME  (0, 1):', same_windows)
assert torch_windows == [[0, 1], [1, 2, 3], [3, 4, 5], [5, 6, 7]]
assert same_windows == [[0, 1, 2], [2, 3, 4], [4, 5, 6], [6, 7]]

fig, axes = plt.subplots(2, 1, figsize=(8, 3.4), sharex=True)
for ax, title, pad, found in ((axes[0], 'torch padding (1, 1)', (1, 1),
                               torch_windows),
                              (axes[1], "XLA 'SAME' padding (0, 1)", (0, 1),
                               same_windows)):
  for column in range(-pad[0], 8 + pad[1]):
    ax.add_patch(plt.Rectangle((column, -0.5), 1, 0.9, fill=column in range(8),
                               facecolor='0.85', edgecolor='k',
                               hatch=None if column in range(8) else '//'))
  for i, pixels in enumerate(found):
    start = 2 * i - pad[0]  # the window also covers padding pixels
    ax.add_patch(plt.Rectangle((start + 0.1, 0.6 + 0.6 * i), 2.8, 0.45,
                               color=f'C{i}', alpha=0.8))
    ax.text(start + 1.5, 0.82 + 0.6 * i, f'out {i} reads {pixels}',
            ha='center', va='center', fontsize=8)
  ax.set_xlim(-1.3, 9.3)
  ax.set_ylim(-0.7, 3.2)
  ax.set_yticks([])
  ax.set_title(title, fontsize=10)
axes[1].set_xticks(np.arange(-1, 9) + 0.5, [str(i) for i in range(-1, 9)])
axes[1].set_xlabel('input pixel (hatched: padding)')
plt.tight_layout()
plt.show()

# %% [markdown]
# ### The same torchvision weights under both paddings
#
# torchvision's resnet18 (its own `resnet.py` on CPU PyTorch), randomly
# initialised, with random BatchNorm statistics so that no BN is the
# identity. Its `state_dict` is converted with `flax_resnet.convert` into
# the default net (`padding='torch'`) and into one with `padding='same'`;
# the parameters are identical, only the padding differs.

# %%
import functools

STAGES = {'stem_out': 'maxpool', 'stage1': 'layer1', 'stage2': 'layer2',
          'stage3': 'layer3', 'stage4': 'layer4'}

torch.manual_seed(0)
torch_net = torchvision_source.build('resnet18').eval()
torchvision_source.randomize_batch_norms(torch_net, seed=1)

images = np.random.RandomState(0).randn(2, 64, 64, 3).astype(np.float32)
torch_features = {}
hooks = [getattr(torch_net, name).register_forward_hook(
    lambda m, i, out, ours=ours: torch_features.__setitem__(
        ours, out.numpy().transpose(0, 2, 3, 1)))
         for ours, name in STAGES.items()]
with torch.no_grad():
  torch_logits = torch_net(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
for hook in hooks:
  hook.remove()


def rel_err(ours, reference):
  ours, reference = np.float64(ours), np.float64(reference)
  return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))


errors = {}
state_dict = torch_net.state_dict()
for padding in ('torch', 'same'):
  model = flax_resnet.create_model('resnet18', padding=padding)
  variables = convert.torch_to_flax(state_dict, model)
  apply = jax.jit(functools.partial(model.apply, train=False,
                                    mutable=['intermediates']))
  with jax.default_matmul_precision('highest'):
    logits, state = apply(variables, images)
  features = {k: v[0] for k, v in state['intermediates'].items()}
  errors[padding] = {k: rel_err(features[k], torch_features[k]) for k in STAGES}
  errors[padding]['logits'] = rel_err(logits, torch_logits)
  print(f'padding={padding!r:7s} max|flax - torch| / max|torch|: ' +
        ', '.join(f'{k}={v:.1e}' for k, v in errors[padding].items()))

assert errors['torch']['logits'] <= 1e-5, errors['torch']
assert max(errors['torch'].values()) <= 1e-5
assert errors['same']['logits'] > 1e-2, errors['same']
assert errors['same']['stem_out'] > 1e-2  # already wrong after the stem

# %%
names = list(errors['torch'])
fig, ax = plt.subplots(figsize=(8, 3))
for offset, padding in enumerate(('torch', 'same')):
  ax.bar(np.arange(len(names)) + (offset - 0.5) * 0.38,
         [errors[padding][n] for n in names], width=0.38,
         label=f"padding='{padding}'")
ax.axhline(1e-5, color='k', linestyle='--', linewidth=1)
ax.text(len(names) - 0.5, 1.4e-5, 'tolerance 1e-5', ha='right', fontsize=8)
ax.set_yscale('log')
ax.set_xticks(range(len(names)), names)
ax.set_ylabel('relative error vs PyTorch')
ax.set_title('resnet18, the same torchvision weights')
ax.legend(loc='upper left', bbox_to_anchor=(1.01, 1))
plt.tight_layout()
plt.show()

# %% [markdown]
# With `padding='torch'` (the default) every stage agrees with PyTorch to
# float32 rounding; with `padding='same'` the stem is already off and the
# error only grows. Load torchvision (or timm) weights only into nets with
# the default padding; `'same'` exists in the spec to show this.
