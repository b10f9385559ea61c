import os
import sys

# Set before mindspore is imported anywhere: synchronous launches give correct error
# attribution and are the fast PyNative path on CPU; the compile cache keeps the suite short.
os.environ.setdefault("MS_DEV_LAUNCH_BLOCKING", "1")
os.environ.setdefault("GLOG_v", "3")
os.environ.setdefault("MS_COMPILER_CACHE_ENABLE", "0")
os.environ.setdefault(
    "MS_COMPILER_CACHE_PATH",
    os.path.join(os.path.expanduser("~"), ".cache", "mindcpm", "ms_compile_cache"),
)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
