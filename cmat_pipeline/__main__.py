"""`python -m cmat_pipeline ...` is the `cmat` command."""

import sys

from cmat_pipeline.cli import main

sys.exit(main())
