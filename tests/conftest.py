"""Test-wide environment: nothing phones out, nothing is fetched from a hub."""

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# One torch thread: the suite runs tiny models, where thread start-up costs more
# than it saves, and a busy 2-core machine makes multi-threaded torch crawl.
import torch  # noqa: E402

torch.set_num_threads(1)
