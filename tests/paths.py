"""Where the tests find the repository's files, wherever the test module sits under tests/."""
import os

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
