import os
import sys
from pathlib import Path

import torch

# Deterministic, and fair to a 2-core machine.
torch.set_num_threads(int(os.environ.get("MOERAY_TEST_THREADS", "1")))
torch.manual_seed(0)
sys.path.insert(0, str(Path(__file__).resolve().parent))
