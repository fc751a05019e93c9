"""`python -m flax_resnet.cpu`: builds the native extensions now (CI, images).

The oneDNN convolutions (flax_resnet/cpu/onednn.py), and the JPEG crop decoder
and pixel normaliser of the input pipeline (flax_resnet/data/jpeg.py,
flax_resnet/data/pixels.py).
"""

from flax_resnet.cpu import onednn
from flax_resnet.data import jpeg
from flax_resnet.data import pixels

# The pipeline runs without these two (PIL, numpy): a failure only warns.
jpeg.extension.build_now()
pixels.extension.build_now()
onednn.main()
