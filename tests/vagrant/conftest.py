"""The vagrant tier drives the lab's guests with vagrant/guests.py (shared with bench/lab.py)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "vagrant"))
