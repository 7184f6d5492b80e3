"""The bottom-up-attention region detector (Faster R-CNN, ResNet-101 C4) in Flax.

`model`: the modules, box ops, selection and preprocessing; `weights`: import of
HF's `unc-nlp/frcnn-vg-finetuned` state dict and of detectron2's `.pkl` files;
`extractor`: `RegionExtractor`, one image's pixels -> its regions.
"""
from vlpjax.detector.model import DetectorConfig, FasterRCNN, preprocess

__all__ = ['DetectorConfig', 'FasterRCNN', 'preprocess']
