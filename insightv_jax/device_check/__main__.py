"""`python -m insightv_jax.device_check`: the check, or (`--worker`) its sections."""

import sys

from insightv_jax.device_check.guard import main

sys.exit(main())
