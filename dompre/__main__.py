import sys

from dompre.cli import main

sys.exit(main())
