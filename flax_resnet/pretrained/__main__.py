"""python -m flax_resnet.pretrained [PRESET]: prints the weights registry."""

import sys

from flax_resnet.pretrained import format_table, list_pretrained

if __name__ == '__main__':
  name = sys.argv[1] if len(sys.argv) > 1 else None
  print(format_table(list_pretrained(name)))
