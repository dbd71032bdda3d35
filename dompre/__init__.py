"""dompre: semi-supervised (Noisy Student) domain pretraining for medical imaging.

Importing dompre registers its models (MAKNet variants) with timm, so ``timm.create_model('maknet')`` and
``timm.create_model('local-dir:EXPORT')`` of an exported MAKNet work after ``import dompre``. Nothing else is
imported here (no data or training modules).
"""
__version__ = "0.1.0"

from dompre import models as models  # noqa: E402  (registers the timm models)
