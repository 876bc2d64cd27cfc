"""YOLOv3 training template for studying sample imbalance through the loss."""
