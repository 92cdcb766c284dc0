"""Iterative PPO in JAX (README.md).

transformers is used for tokenizers, configs and chat templates only, never for its PyTorch models, so its
"PyTorch was not found" notice at import is advice this package's users must not learn to ignore: it is off
unless the user sets TRANSFORMERS_NO_ADVISORY_WARNINGS themselves.
"""

import os

os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
