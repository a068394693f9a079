"""`python -m emo_jax.accelcheck`: see `emo_jax.accelcheck.runner`."""

import sys

from emo_jax.accelcheck.runner import main

sys.exit(main())
