"""Measurements of a model and its configs: the layer table (`layers`), Hessian traces (`sensitivity`), kernel
latencies (`latency`) and the checks of simulation, executor and compiled module against each other (`verify`)."""
