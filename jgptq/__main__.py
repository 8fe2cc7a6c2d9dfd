import sys

from jgptq.cli import main

sys.exit(main())
