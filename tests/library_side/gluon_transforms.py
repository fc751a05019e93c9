"""Library side of the Gluon preprocessing parity test; MXNet's virtualenv.

    $FLAX_RESNET_MXNET_PYTHON gluon_transforms.py IN.npz OUT.npz

For every uint8 (H, W, 3) RGB array in IN.npz, writes under the same name the
float32 (224, 224, 3) that the Gluon model zoo's ImageNet evaluation gives
(GluonCV's scripts/classification/imagenet: Resize(256, keep_ratio=True),
CenterCrop(224), ToTensor, Normalize with the ImageNet mean and std; from
mxnet.gluon.data.vision.transforms), transposed back to HWC. The arrays are
decoded by the caller, so that only the preprocessing is compared. Imports
only mxnet and numpy.
"""

import sys

import mxnet as mx
import numpy as np
from mxnet.gluon.data.vision import transforms


def main(in_path, out_path):
  transform = transforms.Compose([
      transforms.Resize(256, keep_ratio=True),
      transforms.CenterCrop(224),
      transforms.ToTensor(),
      transforms.Normalize(mean=(0.485, 0.456, 0.406),
                           std=(0.229, 0.224, 0.225)),
  ])
  images = np.load(in_path)
  np.savez(out_path, **{
      name: transform(mx.nd.array(images[name], dtype=np.uint8))
            .asnumpy().transpose(1, 2, 0)
      for name in images.files})


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2])
