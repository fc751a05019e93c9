"""Training: config schema and checks, optax, orbax checkpoints, the loop."""

from flax_resnet import lazy_exports

# Names load on first use (PEP 562): `from flax_resnet.train import steps`
# needs jax, flax and optax only, not the loop's grain, TFDS and orbax (the
# benchmarks' jitted steps, a GPU image without the data packages).
_EXPORTS = {
    'default_config': 'flax_resnet.train.config',
    'ConfigError': 'flax_resnet.train.config_check',
    'validate_config': 'flax_resnet.train.config_check',
    'NonFiniteLossError': 'flax_resnet.train.loop',
    'RunResult': 'flax_resnet.train.loop',
    'train_and_evaluate': 'flax_resnet.train.loop',
}
__all__ = list(_EXPORTS)


__getattr__, __dir__ = lazy_exports.attach(__name__, globals(), _EXPORTS)
