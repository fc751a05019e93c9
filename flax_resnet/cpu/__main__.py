"""`python -m flax_resnet.cpu`: builds the oneDNN extension now (CI, images)."""

from flax_resnet.cpu import onednn

onednn.main()
