"""Explanations people can look at: integrated gradients, Grad-CAM, occlusion and the perturbation study.

``dompre explain MODEL INPUTS... --method ig|gradcam|occlusion|perturb --out DIR`` writes one PNG per input
(windowed slice, attribution overlay, top-5 labels with TP/FP marks), a montage, and for ``perturb`` a table of
how the top-5 confidences change. :func:`explain_montage` gives a model card its figure.
"""
from dompre.explain.attribution import (PixelModel, attribution_map, default_cam_layer, grad_cam,
                                        integrated_gradients, occlusion, predict, to_pixels, wrap_model)
from dompre.explain.figures import Panel, Ranked, rank_labels, save_explanation_png, save_montage
from dompre.explain.inputs import InputItem, LoadedModel, load_model, parse_inputs, prep_config
from dompre.explain.perturb import box_mask, confidence_table, fill, inpaint, make_variants, peak_box, top_pixel_mask
from dompre.explain.run import METHODS, Explained, explain_items, explain_montage, explain_one

__all__ = [
    "METHODS", "Explained", "InputItem", "LoadedModel", "Panel", "PixelModel", "Ranked", "attribution_map",
    "box_mask", "confidence_table", "default_cam_layer", "explain_items", "explain_montage", "explain_one", "fill",
    "grad_cam", "inpaint", "integrated_gradients", "load_model", "make_variants", "occlusion", "parse_inputs",
    "peak_box", "predict", "prep_config", "rank_labels", "save_explanation_png", "save_montage", "to_pixels", "top_pixel_mask",
    "wrap_model",
]
