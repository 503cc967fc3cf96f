import os
import sys

# tests import helpers from this folder (tiny.py) by plain name
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach the network
