import os
import sys
from pathlib import Path

# Tests run on 2 shared cores: keep intra-op threads low so parallel work does not thrash.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
