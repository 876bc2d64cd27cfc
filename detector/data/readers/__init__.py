"""Dataset readers: COCO JSON, YOLO txt, Pascal VOC and plain image folders -> checked raw samples.

``formats.open_dataset`` picks the reader; ``base.DetectionSource`` is the contract they share;
``checks`` holds the bad-input checks and their report. Nothing here knows about augmentation or models.
"""
