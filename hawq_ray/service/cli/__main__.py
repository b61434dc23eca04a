import sys

from hawq_ray.service.cli import main

sys.exit(main())
