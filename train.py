"""Train, validate, test or predict with a YOLOv3 detector: ``python train.py --config configs/default.yaml``.

See ``detector/cli.py``. ``python train.py --help`` lists the options of ``fit`` (the default
subcommand); ``python train.py predict --help`` those of another subcommand. Exit status: 0 on
success, 2 for a mistake in the arguments, 1 for any other failure.
"""

import sys

from detector.cli import console_main

if __name__ == "__main__":
    sys.exit(console_main())
