"""keras.applications ResNets, probed in a child process on the JAX backend."""

from __future__ import annotations

import re
from typing import Any, Optional, Sequence

from flax_resnet.references.events import square as _square

def probe_in_process(models: Sequence[str], input_size: int):
  """keras.applications.<name>(weights=None) walked as a functional graph.

  Blocks are the layers named conv{S}_block{B}_*; the block's Add layer
  joins the shortcut and the main path, and each input of the Add is traced
  back through the graph to the block's input. The branch holding the
  block's `_1_conv` is the main path; what only the other branch holds is
  the shortcut (Keras V2 feeds both from the pre-activation, which counts as
  main path, as bn1 does here). Shapes come from one forward pass of the
  whole model traced with jax.eval_shape.
  """
  import jax
  import keras
  import numpy as np
  if keras.backend.backend() != 'jax':
    raise RuntimeError(f'Keras runs on {keras.backend.backend()}, not jax; '
                       'set KERAS_BACKEND=jax before importing keras.')
  block_name = re.compile(r'^conv(\d+)_block(\d+)_')

  def describe(layer) -> Optional[dict[str, Any]]:
    if isinstance(layer, keras.layers.Conv2D):
      return {'kind': 'conv', 'kernel': _square(layer.kernel_size, 'kernel'),
              'stride': _square(layer.strides, 'stride'),
              'groups': int(layer.groups), 'bias': bool(layer.use_bias)}
    if isinstance(layer, keras.layers.BatchNormalization):
      return {'kind': 'bn'}
    if isinstance(layer, (keras.layers.MaxPooling2D,
                          keras.layers.AveragePooling2D)):
      return {'kind': 'maxpool' if isinstance(layer, keras.layers.MaxPooling2D)
                      else 'avgpool',
              'kernel': _square(layer.pool_size, 'kernel'),
              'stride': _square(layer.strides, 'stride')}
    if isinstance(layer, (keras.layers.ZeroPadding2D, keras.layers.Activation,
                          keras.layers.Add, keras.layers.InputLayer)):
      return None  # padding belongs to the next conv/pool; no data moves
    return {'kind': 'other', 'type': type(layer).__name__}

  def trainable(layers) -> int:
    return int(sum(np.prod(w.shape) for layer in layers
                   for w in layer.trainable_weights))

  probes = []
  for name in models:
    # Keras' own model, with its initialisers attached but not run: only the
    # variables' shapes matter, and materialising 25M random numbers costs
    # tens of seconds of XLA compiles on CPU.
    with keras.StatelessScope(initialize_variables=False):
      model = getattr(keras.applications, name)(
          weights=None, input_shape=(input_size, input_size, 3))
      layers = model.layers[1:]
      probe_model = keras.Model(model.inputs, [l.output for l in layers])
    # The forward pass: Keras' stateless_call of every layer, traced with
    # jax.eval_shape (shapes without arithmetic, as layout.py traces ours).
    def spec(variable):
      return jax.ShapeDtypeStruct(tuple(variable.shape), variable.dtype)

    values = jax.eval_shape(
        lambda trainable, frozen, x: probe_model.stateless_call(
            trainable, frozen, x, training=False)[0],
        [spec(v) for v in probe_model.trainable_variables],
        [spec(v) for v in probe_model.non_trainable_variables],
        jax.ShapeDtypeStruct((1, input_size, input_size, 3), 'float32'))
    # NHWC -> [C, H, W] like the other libraries.
    shape_of = {l.name: [int(v.shape[3]), int(v.shape[1]), int(v.shape[2])]
                if len(v.shape) == 4 else [int(d) for d in v.shape[1:]]
                for l, v in zip(layers, values)}
    shape_of[model.layers[0].name] = [3, input_size, input_size]

    def producer(tensor):
      return tensor._keras_history.operation

    def ancestry(tensor, stop) -> list[Any]:
      """Layers between tensor `stop` (excluded) and `tensor` (included)."""
      seen, stack = {}, [tensor]
      while stack:
        t = stack.pop()
        if t is stop:
          continue
        layer = producer(t)
        if layer.name in seen or isinstance(layer, keras.layers.InputLayer):
          continue
        seen[layer.name] = layer
        stack.extend(layer._inbound_nodes[0].input_tensors)
      return [l for l in model.layers if l.name in seen]

    def leaf(layer, role=None):
      op = describe(layer)
      if op is None:
        return None
      inputs = layer._inbound_nodes[0].input_tensors
      event = {'event': 'leaf', 'path': layer.name, **op,
               'in_shape': shape_of[producer(inputs[0]).name],
               'out_shape': shape_of[layer.name],
               'params': trainable([layer])}
      if role:
        event['role'] = role
      return event

    prefixes = list(dict.fromkeys(block_name.match(l.name).group(0)[:-1]
                                  for l in layers if block_name.match(l.name)))
    events = []
    for number, prefix in enumerate(prefixes):
      members = [l for l in layers if l.name.startswith(prefix + '_')]
      block_in = members[0].input
      if number == 0:
        events.extend(filter(None, (leaf(l) for l in ancestry(block_in,
                                                              None))))
      add = next(l for l in members if isinstance(l, keras.layers.Add))
      branches = [ancestry(t, block_in)
                  for t in add._inbound_nodes[0].input_tensors]
      main = next(b for b in branches
                  if any(l.name == f'{prefix}_1_conv' for l in b))
      main_names = {l.name for l in main}
      skip = [l for b in branches if b is not main for l in b
              if l.name not in main_names]
      output = model.get_layer(f'{prefix}_out')
      owned = main + skip + [add] + ([output] if output is not add else [])
      stray = {l.name for l in members} - {l.name for l in owned}
      if stray:
        raise ValueError(f'{prefix}: layers {sorted(stray)} are on neither '
                         'path of the block')
      stage, index = (int(g) for g in block_name.match(members[0].name)
                      .groups())
      events.append({'event': 'start', 'path': prefix, 'stage': stage - 1,
                     'index': index - 1, 'type': 'keras block',
                     'in_shape': shape_of[producer(block_in).name],
                     'params': trainable(owned)})
      roles = {l.name: 'main' for l in main}
      roles.update({l.name: 'shortcut' for l in skip})
      events.extend(filter(None, (leaf(l, roles[l.name])
                                  for l in model.layers if l.name in roles)))
      events.append({'event': 'end', 'path': prefix,
                     'out_shape': shape_of[output.name]})
    probes.append({'reference_model': name, 'input_size': input_size,
                   'events': events,
                   'total_params': trainable(model.layers),
                   'library_total_params': int(model.count_params()),
                   # count_params() counts BN moving statistics: compared
                   # with our params + batch_stats.
                   'total_variables': int(model.count_params())})
  source = (f'keras {keras.__version__} (backend jax, jax {jax.__version__}) '
            'keras.applications.<name>(weights=None), built in keras.'
            'StatelessScope(initialize_variables=False) so the random '
            'initialisers are attached but not run; layers read from the '
            'functional graph, shapes from one forward pass (stateless_call '
            f'returning every layer\'s output) of a 1x{input_size}x{input_size}'
            'x3 input traced with jax.eval_shape')
  return source, probes

