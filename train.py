"""Train, validate, test or predict with a YOLOv3 detector: ``python train.py --config configs/default.yaml``.

See ``detector/cli.py``; ``python train.py --help`` lists every option.
"""

from detector.cli import main

if __name__ == "__main__":
    main()
