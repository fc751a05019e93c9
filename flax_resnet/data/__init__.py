"""Input pipelines: TFDS array_record sources read by grain, no TensorFlow.

    info = data.dataset_info(config)       # sizes/classes; checks the config
    train = data.make_train_iterator(config, process_index=i, process_count=n)
    batch = next(train)                    # {'image', 'label'}
    state = train.get_state()              # JSON-able; train.set_state(state)
    for batch in data.make_eval_iterator(config, ...):  # + 'mask'
      ...

Importing this package registers the offline `sklearn_digits` TFDS dataset.
Preparing datasets (CIFAR, ImageNet, your own image folder):
`python -m flax_resnet.data.prepare NAME --data_dir DIR [--source PATH]`, or
`flax_resnet.data.prepare.prepare(name, data_dir, source)`.
"""

from flax_resnet.data.digits import SklearnDigits
from flax_resnet.data.pipeline import (InputWorkerError, TrainIterator,
                                       check_config, make_eval_iterator,
                                       make_train_iterator)
from flax_resnet.data.sources import (SYNTHETIC, DatasetInfo,
                                      DatasetNotFoundError, dataset_info)

__all__ = [
    'SYNTHETIC', 'DatasetInfo', 'DatasetNotFoundError', 'InputWorkerError',
    'SklearnDigits',
    'TrainIterator', 'check_config', 'dataset_info', 'make_eval_iterator',
    'make_train_iterator', 'prepare',
]


def __getattr__(name):
  # `python -m flax_resnet.data.prepare` must find the module not yet
  # imported (runpy warns otherwise), so it is loaded on first use here.
  if name == 'prepare':
    import importlib  # pylint: disable=g-import-not-at-top
    return importlib.import_module('flax_resnet.data.prepare')
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
