"""The training pipeline: reader samples -> augmented, letterboxed items -> batches.

``dataset.TransformedDataset`` runs the albumentations pipelines of ``transforms`` (with ``mosaic``),
over readers or the RAM ``cache``; ``samplers`` fix the order and the randomness; ``collate`` stacks
batches into the ``detector.structures.Target`` contract.
"""
