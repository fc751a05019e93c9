"""Library side of the timm parity test; runs in a child interpreter.

    python timm_net.py resnet50d OUT_DIR SIZE [SIZE ...]

Builds timm's resnet50d (pretrained=False; imported as the reference probe
does, with a stand-in only if torchvision is unusable), gives it random
weights and random BatchNorm statistics, saves its state_dict as .pth and
.safetensors, and writes timm's logits for random images of each SIZE.
"""

import os
import sys

import numpy as np
import torch

from flax_resnet.references import probe_timm


def main(name, out, sizes):
  resnet, _ = probe_timm.import_timm_resnet()
  torch.manual_seed(0)
  model = getattr(resnet, name)(pretrained=False).eval()
  generator = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        for tensor, low, high in ((module.weight, 0.5, 1.5),
                                  (module.running_var, 0.5, 2.0)):
          tensor.copy_(torch.rand(tensor.shape, generator=generator)
                       * (high - low) + low)
        for tensor in (module.bias, module.running_mean):
          tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.2)
  state_dict = model.state_dict()
  torch.save(state_dict, os.path.join(out, 'timm.pth'))
  import safetensors.torch
  safetensors.torch.save_file({k: v.contiguous() for k, v in
                               state_dict.items()},
                              os.path.join(out, 'timm.safetensors'))
  rng = np.random.default_rng(0)
  results = {'library_trainable': np.array(sum(
      p.numel() for p in model.parameters() if p.requires_grad))}
  for size in sizes:
    images = rng.normal(0, 1, (2, 3, size, size)).astype(np.float32)
    with torch.no_grad():
      logits = model(torch.from_numpy(images)).numpy()
    results[f'images_{size}'] = images
    results[f'logits_{size}'] = logits
  np.savez(os.path.join(out, 'timm.npz'), **results)


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2], [int(s) for s in sys.argv[3:]])
