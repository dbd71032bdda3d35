"""dompre models; importing this package registers ``maknet``, ``maknet_small``, ``maknet_tiny``, ``small_cnn`` and
``vgg19_sepconv`` with timm."""
from dompre.models.baselines import SmallCNN, VGG19SepConv
from dompre.models.heads import ScorePropagation
from dompre.models.maknet import MAKConv, MAKNet, MixPool

__all__ = ["MAKConv", "MAKNet", "MixPool", "ScorePropagation", "SmallCNN", "VGG19SepConv"]
