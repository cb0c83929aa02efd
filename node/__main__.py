"""`python -m node`: the postroom command (node/launch.py patches gevent first)."""

import sys

from node.launch import main

sys.exit(main())
