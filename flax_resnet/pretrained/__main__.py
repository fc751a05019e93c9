"""python -m flax_resnet.pretrained [PRESET]: prints the weights registry."""

import difflib
import sys
from typing import Optional, Sequence

from flax_resnet import command_line
from flax_resnet.pretrained import format_table, list_pretrained
from flax_resnet.zoo import PRESETS

PUBLISHERS = ('torchvision', 'timm', 'gluon', 'keras')


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = command_line.ArgumentParser(
      prog='python -m flax_resnet.pretrained',
      description='List the published weights flax_resnet.load_pretrained '
      'knows: tag, top-1, checksum, URL and, on the line below each, the '
      'evaluation preprocessing its publisher measured it with.')
  parser.add_argument('preset', nargs='?',
                      help='only this preset, e.g. resnet50')
  parser.add_argument('--publisher', choices=PUBLISHERS,
                      help='only this publisher')
  args = parser.parse_args(argv)
  entries = list_pretrained(args.preset, publisher=args.publisher)
  if not entries:
    known = sorted({w.preset for w in list_pretrained(
        publisher=args.publisher)})
    source = f' from {args.publisher}' if args.publisher else ''
    if args.preset in PRESETS:
      problem = (f'preset {args.preset!r} has no registered weights{source}'
                 f' (load your own with load_pretrained({args.preset!r}, '
                 'PATH_OR_URL)).')
    else:
      close = difflib.get_close_matches(str(args.preset), known, n=1)
      hint = f' Did you mean {close[0]!r}?' if close else ''
      problem = (f'no weights are registered for preset {args.preset!r}'
                 f'{source}.{hint}')
    print(f'error: {problem} Presets with weights{source}: '
          f'{", ".join(known)}.', file=sys.stderr)
    return 2
  print(format_table(entries))
  return 0


if __name__ == '__main__':
  sys.exit(main())
