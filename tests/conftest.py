import os
import sys

# Set before mindspore is imported anywhere: synchronous launches give correct error
# attribution and are the fast PyNative path on CPU. MindSpore 2.10's compile cache keys graphs
# by compile order, not by shapes or model, and silently loads wrong graphs: keep it off.
os.environ.setdefault("MS_DEV_LAUNCH_BLOCKING", "1")
os.environ.setdefault("GLOG_v", "3")
os.environ.setdefault("MS_COMPILER_CACHE_ENABLE", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
