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
# # Using torchvision's pretrained weights
#
# `flax_resnet.convert` turns a torchvision `state_dict` (a `.pth` file, a
# `.safetensors` file, or an in-memory mapping) into Flax variables for the
# preset of the same name. Nothing can be downloaded where CI runs this
# notebook, so it makes its own `resnet50` weights with torchvision's real
# model code, saves them in both formats, converts them, and checks that
# the Flax net computes the same logits as PyTorch. The last section says
# how to do the same with the real ImageNet file.

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
import functools
import tempfile

import numpy as np
import orbax.checkpoint as ocp
import safetensors.torch
import torch

from flax_resnet import convert
from flax_resnet.references import torchvision_source

folder = pathlib.Path(tempfile.mkdtemp(prefix='weights_'))

# %% [markdown]
# ## 1. A torchvision resnet50 and its state_dict, saved as .pth and .safetensors
#
# `torchvision_source.build('resnet50')` executes torchvision's own
# `models/resnet.py` (read from the torchvision wheel) on CPU PyTorch. A
# freshly initialised BatchNorm is the identity in eval mode, which would
# hide a wrong mapping of its statistics, so they are randomised first.

# %%
torch.manual_seed(0)
torch_model = torchvision_source.build('resnet50').eval()
torchvision_source.randomize_batch_norms(torch_model, seed=1)

state_dict = torch_model.state_dict()
pth_path = folder / 'resnet50-local.pth'
safetensors_path = folder / 'resnet50-local.safetensors'
torch.save(state_dict, pth_path)
safetensors.torch.save_file(state_dict, str(safetensors_path))
for path in (pth_path, safetensors_path):
  print(f'{path.name:28s} {path.stat().st_size / 2**20:6.1f} MiB')
print(len(state_dict), 'tensors, e.g.', list(state_dict)[:3])

# %% [markdown]
# ## 2. Convert
#
# `convert.torch_to_flax(source, 'resnet50')` accepts either file (or the
# mapping) and returns `{'params': ..., 'batch_stats': ...}`. The name map
# is derived by tracing the Flax module, so it is the same for every preset;
# `convert.key_map` shows it.

# %%
variables = convert.torch_to_flax(pth_path, 'resnet50')
from_safetensors = convert.torch_to_flax(safetensors_path, 'resnet50')

for entry in convert.key_map('resnet50'):
  if entry.torch_name.startswith(('conv1.', 'bn1.', 'layer1.0.downsample.',
                                  'fc.')):
    target = ('(not needed: Flax keeps no step counter)'
              if entry.kind == 'counter' else
              f'{entry.collection}/{"/".join(entry.path)}  '
              f'{entry.torch_shape} -> {entry.shape}')
    print(f'{entry.torch_name:42s} -> {target}')

leaves = jax.tree.leaves(variables)
assert jax.tree.structure(variables) == jax.tree.structure(from_safetensors)
assert all(np.array_equal(a, b) for a, b in
           zip(leaves, jax.tree.leaves(from_safetensors)))
params = sum(x.size for x in jax.tree.leaves(variables['params']))
torch_params = sum(p.numel() for p in torch_model.parameters())
print(f'\n{params:,} parameters (PyTorch: {torch_params:,}); .pth and '
      '.safetensors give identical variables')
assert params == torch_params == 25_557_032

# %% [markdown]
# ## 3. Inference: the same logits as PyTorch
#
# Flax takes NHWC images and PyTorch NCHW, so the one batch is transposed
# for PyTorch. `'highest'` matmul precision keeps XLA's float32 convolutions
# exact enough to compare at a relative error of 1e-5.

# %%
images = np.random.RandomState(0).randn(2, 224, 224, 3).astype(np.float32)
with torch.no_grad():
  torch_logits = torch_model(
      torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()

model = flax_resnet.create_model('resnet50')
apply = jax.jit(functools.partial(model.apply, train=False))
with jax.default_matmul_precision('highest'):
  flax_logits = np.asarray(apply(variables, images))


def rel_err(ours, reference):
  ours, reference = np.float64(ours), np.float64(reference)
  return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))


error = rel_err(flax_logits, torch_logits)
top5_flax = np.argsort(-flax_logits, -1)[:, :5]
top5_torch = np.argsort(-torch_logits, -1)[:, :5]
print('logits, first image:  flax ', np.round(flax_logits[0, :5], 4))
print('                      torch', np.round(torch_logits[0, :5], 4))
print(f'max |flax - torch| / max |torch| = {error:.2e}')
print('top-5 classes  flax', top5_flax.tolist(), ' torch', top5_torch.tolist())
assert error <= 1e-5, error
np.testing.assert_array_equal(top5_flax, top5_torch)

# %% [markdown]
# ## 4. Back to PyTorch, and to an orbax checkpoint
#
# `convert.flax_to_torch` (or `save_torch` / `save_safetensors`) writes the
# variables under torchvision's names, in torchvision's order, so a fresh
# torchvision model loads them with `strict=True`. The command line tool
# writes an orbax checkpoint of the converted variables:
# `python -m flax_resnet.convert resnet50 IN.pth OUT_DIR`.

# %%
exported = convert.flax_to_torch(variables, 'resnet50')
assert list(exported) == list(state_dict)  # same names, same order
fresh = torchvision_source.build('resnet50').eval()
fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()},
                      strict=True)
with torch.no_grad():
  round_trip = fresh(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
np.testing.assert_array_equal(round_trip, torch_logits)
print('Flax -> torch round trip: identical logits')

checkpoint_dir = folder / 'resnet50_orbax'
assert convert.main(['resnet50', str(safetensors_path), str(checkpoint_dir)]) == 0
with ocp.StandardCheckpointer() as checkpointer:
  restored = checkpointer.restore(checkpoint_dir)
assert jax.tree.structure(restored) == jax.tree.structure(variables)
assert all(np.array_equal(a, b) for a, b in
           zip(jax.tree.leaves(restored), leaves))
print('orbax checkpoint restores the same variables')

# %% [markdown]
# ## 5. Fine-tuning on another number of classes
#
# `skip_head=True` loads everything except `fc`, whose new shape comes from
# `num_classes`; the head keeps the model's fresh initialisation.

# %%
ten_classes = convert.torch_to_flax(pth_path, 'resnet50', num_classes=10,
                                    skip_head=True)
assert ten_classes['params']['fc']['kernel'].shape == (2048, 10)
np.testing.assert_array_equal(
    ten_classes['params']['stage4_block2']['conv3']['kernel'],
    variables['params']['stage4_block2']['conv3']['kernel'])
print('backbone loaded, fc is', ten_classes['params']['fc']['kernel'].shape)

# %% [markdown]
# ## 6. The real ImageNet weights
#
# The URLs below are read from torchvision's own weight tables (in the
# same `resnet.py`):

# %%
weights = torchvision_source.load_resnet_module().ResNet50_Weights
for name in ('IMAGENET1K_V1', 'IMAGENET1K_V2'):
  w = getattr(weights, name).value
  print(f'{name}: {w.url}\n    top-1 '
        f'{w.meta["_metrics"]["ImageNet-1K"]["acc@1"]}%, eval transform '
        f'{w.transforms.keywords} (resize_size defaults to 256)')
assert weights.IMAGENET1K_V1.value.url.endswith('/resnet50-0676ba61.pth')
assert weights.IMAGENET1K_V2.value.url.endswith('/resnet50-11ad3fa6.pth')
assert weights.DEFAULT == weights.IMAGENET1K_V2
assert weights.IMAGENET1K_V2.value.transforms.keywords == {
    'crop_size': 224, 'resize_size': 232}

# %% [markdown]
# `flax_resnet.load_pretrained` knows these files: its registry holds the
# same URLs and top-1 figures, and the sha256 prefix each file name carries
# (which torchvision checks, and so does the download here).

# %%
for entry in flax_resnet.list_pretrained('resnet50', publisher='torchvision'):
  published = getattr(weights, entry.tag).value
  assert entry.url == published.url
  assert entry.top1 == published.meta['_metrics']['ImageNet-1K']['acc@1']
  print(f'{entry.tag}: {entry.checksum}  {entry.top1}%  {entry.url}')

# %% [markdown]
# With network, one call downloads (once, into `~/.cache/flax_resnet`),
# checks and converts:
#
# ```python
# model, variables = flax_resnet.load_pretrained('resnet50', 'IMAGENET1K_V2')
# ```
#
# Without network on the training machine, fetch the file elsewhere and
# place it where the error message says (or pass its path instead of the
# tag). To fetch it with PyTorch instead:
#
# ```python
# import torch, torchvision
# # (a) torchvision: V2 is the current DEFAULT (80.9% top-1); V1 is 76.1%.
# model = torchvision.models.resnet50(weights='IMAGENET1K_V2')
# torch.save(model.state_dict(), 'resnet50-11ad3fa6.pth')
# # (b) or just the file, into ~/.cache/torch/hub/checkpoints/:
# torch.hub.load_state_dict_from_url(
#     'https://download.pytorch.org/models/resnet50-11ad3fa6.pth')
# ```
#
# (`resnet50-0676ba61.pth` is the older `IMAGENET1K_V1`.) Copy the file to
# the machine you train on, then:
#
# ```python
# from flax_resnet import convert, create_model
#
# variables = convert.torch_to_flax('resnet50-11ad3fa6.pth', 'resnet50')
# logits = create_model('resnet50').apply(variables, images, train=False)
# ```
#
# `images` are NHWC float32, normalised like torchvision's:
# `(pixels / 255 - (0.485, 0.456, 0.406)) / (0.229, 0.224, 0.225)`, which
# is what the training configs' default `mean_rgb` / `std_rgb` do; the V2
# weights were evaluated after resizing to 232 and centre-cropping 224
# (V1: 256 and 224). Keep the default `padding='torch'` (section 4 of
# `01_shortcuts_and_strides.py` shows what `'same'` does to these
# weights). The same works for every torchvision preset (`resnet18` ...
# `wide_resnet101_2`) and for timm's `resnet50d`; `.safetensors` files load
# the same way, and Hugging Face `transformers` ResNet files after
# `convert.hf_to_torchvision_keys`.
#
# To **fine-tune** with the training loop, point the config at the file
# (or at an earlier training workdir); with a different number of classes,
# skip the head:
#
# ```python
# config.init_from = '/path/to/resnet50-11ad3fa6.pth'
# config.init_from_skip_head = True   # keep a fresh fc for config.num_classes
# ```
#
# or on the command line:
#
# ```bash
# python train.py --config configs/resnet50.py --workdir runs/finetune \
#   --config.init_from=/path/to/resnet50-11ad3fa6.pth --config.init_from_skip_head=True
# ```
#
# The weights are loaded only when the workdir holds no checkpoint yet; a
# restarted run resumes from its own checkpoint instead.

# %%
import shutil

shutil.rmtree(folder)  # the weight files and checkpoint written above
