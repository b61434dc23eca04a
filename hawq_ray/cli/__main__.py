import sys

from hawq_ray.cli import main

sys.exit(main())
