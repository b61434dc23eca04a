"""The contract every part of hawq-ray shares and may import, `solver/` included: the layer table's schema and
its validation (`table`), bit configurations (`bits`), the cost formulas (`cost`) and the user-facing errors
(`errors`). It imports nothing else of the project, so it is the bottom floor of every dependency."""
from hawq_ray.contract.errors import BitConfigError, HawqError, TableError  # noqa: F401
