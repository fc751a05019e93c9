import sys

from flax_resnet.convert.cli import main

sys.exit(main())
