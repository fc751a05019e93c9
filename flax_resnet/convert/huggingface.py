"""Hugging Face transformers ResNet names -> torchvision names.

ResNetForImageClassification ('resnet.' prefix, 'classifier.1') and
ResNetModel state_dicts are renamed, then loaded as torch weights.
"""

from __future__ import annotations

import re
from typing import Optional

import numpy as np

from flax_resnet.convert.keymap import StateDictMismatch
from flax_resnet.convert.pytorch import StateDictLike, load_state_dict

PREFIXES = ('resnet.', 'embedder.', 'encoder.')


def matches(keys) -> bool:
  """Whether these are Hugging Face ResNet names."""
  return any(k.startswith(PREFIXES) for k in keys)


_HF_BN_LEAVES = ('weight', 'bias', 'running_mean', 'running_var',
                 'num_batches_tracked')
_HF_PATTERNS = (
    (re.compile(r'^embedder\.embedder\.convolution\.(weight)$'), 'conv1.{0}'),
    (re.compile(r'^embedder\.embedder\.normalization\.(\w+)$'), 'bn1.{0}'),
    (re.compile(r'^encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.'
                r'convolution\.(weight)$'), 'layer{0+}.{1}.downsample.0.{2}'),
    (re.compile(r'^encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.'
                r'normalization\.(\w+)$'), 'layer{0+}.{1}.downsample.1.{2}'),
    (re.compile(r'^encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.'
                r'convolution\.(weight)$'), 'layer{0+}.{1}.conv{2+}.{3}'),
    (re.compile(r'^encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.'
                r'normalization\.(\w+)$'), 'layer{0+}.{1}.bn{2+}.{3}'),
    (re.compile(r'^classifier\.1\.(weight|bias)$'), 'fc.{0}'),
)


def _hf_name(key: str) -> Optional[str]:
  name = key[len('resnet.'):] if key.startswith('resnet.') else key
  for pattern, template in _HF_PATTERNS:
    match = pattern.match(name)
    if match:
      groups = match.groups()
      if '.normalization.' in name and groups[-1] not in _HF_BN_LEAVES:
        return None
      # '{i+}': HF counts stages and convs from 0, torchvision from 1.
      return re.sub(
          r'\{(\d)(\+?)\}',
          lambda m: str(int(groups[int(m.group(1))]) + 1) if m.group(2)
          else groups[int(m.group(1))], template)
  return None


def hf_to_torchvision_keys(state_dict: StateDictLike) -> dict[str, np.ndarray]:
  """Renames a Hugging Face `transformers` ResNet state_dict to torchvision's.

  Covers ResNetForImageClassification ('resnet.' prefix, 'classifier.1') and
  ResNetModel. HF's `downsample_in_bottleneck=True` puts the stride on the
  first 1x1 (our `stride_in='1x1'`, e.g. 'resnet50_v1'); the default is v1.5.
  """
  arrays = load_state_dict(state_dict)
  renamed, unknown = {}, []
  for key, value in arrays.items():
    name = _hf_name(key)
    if name is None:
      unknown.append(key)
    else:
      renamed[name] = value
  if unknown:
    raise StateDictMismatch(
        f'{len(unknown)} key(s) are not Hugging Face ResNet names: '
        f'{", ".join(unknown)}. Only ResNetModel / ResNetForImageClassification '
        'state_dicts can be renamed.', unexpected=unknown)
  return renamed

