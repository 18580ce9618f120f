"""`python -m fedopal`: the same as the `fedopal` console command."""

import sys

from fedopal.cli import main

sys.exit(main())
