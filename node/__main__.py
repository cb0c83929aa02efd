"""`python -m node`: the postroom command, gevent monkey-patched first."""

from gevent import monkey

monkey.patch_all()

import sys  # noqa: E402

from node.cli import main  # noqa: E402

sys.exit(main())
