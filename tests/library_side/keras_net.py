"""Library side of the Keras parity test; runs in a child interpreter.

    KERAS_BACKEND=jax python keras_net.py ResNet50 OUT_DIR SIZE [SIZE ...]

Builds keras.applications.<name>(weights=None, classifier_activation=None)
at each SIZE, gives it random weights with random, non-trivial BatchNorm
moving statistics, saves them as Keras 3 `.weights.h5` and as a legacy
whole-model `.h5`, and writes the logits Keras computes for random images.
A child process, so that the Keras backend is jax whatever the parent
imported.
"""

import os
import sys

os.environ['KERAS_BACKEND'] = 'jax'

import keras  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top


def random_weights(model, rng):
  for layer in model.layers:
    weights = []
    for variable in layer.weights:
      shape, leaf = tuple(variable.shape), variable.path.split('/')[-1]
      if leaf == 'kernel':
        fan_in = int(np.prod(shape[:-1]))
        value = rng.normal(0, np.sqrt(2.0 / fan_in), shape)
      elif leaf == 'gamma':
        value = rng.uniform(0.5, 1.5, shape)
      elif leaf == 'moving_variance':
        value = rng.uniform(0.5, 2.0, shape)
      else:  # bias, beta, moving_mean
        value = rng.normal(0, 0.2, shape)
      weights.append(value.astype(np.float32))
    if weights:
      layer.set_weights(weights)


def main(name, out, sizes):
  if keras.backend.backend() != 'jax':
    raise SystemExit(f'Keras backend is {keras.backend.backend()}, not jax')
  rng = np.random.default_rng(0)
  build = getattr(keras.applications, name)
  results, weights = {}, None
  for size in sizes:
    model = build(weights=None, input_shape=(size, size, 3),
                  classifier_activation=None)
    if weights is None:
      random_weights(model, rng)
      weights = model.get_weights()
      model.save_weights(os.path.join(out, 'model.weights.h5'))
      model.save(os.path.join(out, 'legacy.h5'))
      results['library_params'] = np.array(model.count_params())
      results['library_trainable'] = np.array(sum(
          int(np.prod(v.shape)) for v in model.trainable_weights))
    else:
      model.set_weights(weights)
    images = rng.normal(0, 1, (2, size, size, 3)).astype(np.float32)
    results[f'images_{size}'] = images
    results[f'logits_{size}'] = np.asarray(model(images, training=False))
  np.savez(os.path.join(out, 'keras.npz'), **results)


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2], [int(s) for s in sys.argv[3:]])
