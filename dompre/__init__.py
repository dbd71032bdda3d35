"""dompre: semi-supervised (Noisy Student) domain pretraining for medical imaging.

Importing dompre registers its models (MAKNet variants) with timm.
"""
__version__ = "0.1.0"
