"""The service front: the main job (`pipeline`), the command line (`cli`), the Ray Tune driver (`tune`), the
budget sweep as Ray tasks (`sweep`), the latency stage on profiler actors (`profile`), the report (`report`)
and the Ray session (`session`, the one place that initializes or joins Ray)."""
