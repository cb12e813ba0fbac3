"""Reads a safetensors header with the reference library (safetensors.safe_open): its time to compare with adapter inspect."""
import sys, time
from safetensors import safe_open
t = time.time()
with safe_open(sys.argv[1], framework="np") as f:
    k = f.keys()
    m = f.metadata()
print(len(k), f"{time.time() - t:.2f} s")
