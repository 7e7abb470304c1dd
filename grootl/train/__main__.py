"""``python -m grootl.train RECIPE`` and ``accelerate launch -m grootl.train RECIPE``."""

import sys

from grootl.train import main

sys.exit(main())
