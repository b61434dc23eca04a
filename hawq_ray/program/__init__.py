"""The integer program: `program` (Op, IntegerProgram, saving and loading), `dyadic` (the integer
requantization every back end computes), `executor` (the PyTorch reference that runs it), `ranges` (sound
value ranges), `integer` (arithmetic the ops share), `random` (random programs for checking back ends)."""
