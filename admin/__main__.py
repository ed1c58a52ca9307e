"""`python -m admin`: the same as the `geventpop3-admin` console script."""

import sys

from admin.shell import main

sys.exit(main())
