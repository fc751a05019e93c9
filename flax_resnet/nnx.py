"""The NNX face: any preset as a stateful `flax.nnx` module.

    model = flax_resnet.nnx.create_model('resnet50', rngs=nnx.Rngs(0))
    logits = model(images)                    # eval: running BN statistics
    logits = model(images, train=True)        # batch statistics; updates them
    optimizer = nnx.Optimizer(model, optax.sgd(0.1, 0.9), wrt=nnx.Param)

The Linen module runs inside `flax.nnx.bridge.ToNNX`, so the NNX model
computes exactly what `ResNet.apply` computes: its `params` become
`nnx.Param`s and its `batch_stats` `nnx.BatchStat`s, and Linen variables
(from `init`, `convert.load_weights` or `load_pretrained`) go in unchanged.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import bridge
from flax.nnx.bridge import variables as bridge_variables

from flax_resnet import zoo
from flax_resnet.model import ResNet as LinenResNet


def _example_shape(spec) -> tuple[int, int, int, int]:
  size = 32 if spec.stem == 'cifar' else 224
  return (1, size, size, 3)


@functools.lru_cache(maxsize=16)
def _jitted_init(module: LinenResNet):
  """One compiled init per net, instead of an eager op per initialiser."""
  example = jnp.zeros(_example_shape(module.spec), jnp.float32)
  return jax.jit(lambda key: module.init(key, example, train=False))


class ResNet(nnx.Module):
  """A flax_resnet.ResNet (Linen) held as NNX state.

  Attributes:
    linen: the bridged Linen module; its variables live on it as nnx.Param /
      nnx.BatchStat (`nnx.state(model, nnx.Param)`).
    spec: the ResNetSpec (static).
  """

  def __init__(self, module: LinenResNet, *, rngs: nnx.Rngs,
               variables: Optional[Mapping[str, Any]] = None):
    self.spec = module.spec
    self.linen = bridge.ToNNX(module, rngs=rngs)
    if variables is None:
      variables = _jitted_init(module)(rngs.params())
    self.load_variables(variables)

  def load_variables(self, variables: Mapping[str, Any]) -> None:
    """Replaces all state with Linen-style {'params', 'batch_stats'}."""
    attrs = bridge_variables.linen_vars_to_nnx_attrs(
        {k: v for k, v in variables.items() if k in ('params', 'batch_stats')})
    for name, value in attrs.items():
      setattr(self.linen, name, nnx.data(value))

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """Logits. train=True normalises with batch statistics and updates the
    running ones (each nnx.BatchStat), as `apply(..., mutable=['batch_stats'])`
    does in Linen."""
    return self.linen(x, train=train,
                      mutable=['batch_stats'] if train else False)

  def linen_variables(self) -> dict[str, Any]:
    """The state as Linen variables, for `ResNet.apply` or checkpoints."""
    return bridge_variables.nnx_attrs_to_linen_vars({
        name: value for name, value in vars(self.linen).items()
        if not name.startswith(('to_nnx__', '_pytree__'))})


def create_model(name: str, *, rngs: nnx.Rngs,
                 variables: Optional[Mapping[str, Any]] = None,
                 **overrides: Any) -> ResNet:
  """Preset `name` as an NNX module (overrides as in flax_resnet.create_model).

  Args:
    name: any preset, e.g. 'resnet50', 'resnet20'.
    rngs: initialises the variables when none are given.
    variables: Linen variables to start from (load_weights, load_pretrained,
      model.init); they must fit the preset with its overrides.
  """
  return ResNet(zoo.create_model(name, **overrides), rngs=rngs,
                variables=variables)
