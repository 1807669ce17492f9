import sys

from nephele.cli.main import main

sys.exit(main())
