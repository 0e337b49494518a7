import sys

from fusedlis.cli import main

sys.exit(main())
