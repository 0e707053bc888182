"""``python workers [OPTIONS]`` starts an RQ worker: the same as ``patchd worker [OPTIONS]``.

This folder is the worker side's entry point only. The code is the package ``patchd.workers``
(``patchd/workers/``): job functions, stages, artifacts. See README.md beside this file.
"""

import sys

from patchd.cli import main

if __name__ == "__main__":
    main(["worker", *sys.argv[1:]])
