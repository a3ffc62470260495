"""python -m data.synthetic: generate a synthetic dataset or a preview (see data/synthetic/__init__.py)."""
import sys

from data.synthetic import main

sys.exit(main())
