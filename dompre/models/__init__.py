"""dompre models; importing this package registers ``maknet``, ``maknet_small`` and ``maknet_tiny`` with timm."""
from dompre.models.heads import ScorePropagation
from dompre.models.maknet import MAKConv, MAKNet, MixPool

__all__ = ["MAKConv", "MAKNet", "MixPool", "ScorePropagation"]
