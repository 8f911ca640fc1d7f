"""What a model, a GPU and a workload imply, shared by every later room: geometry and memory,
parallelism validity, the search space, the cost model, the serving simulator and its results,
goodput, instances built from shapes or plans, a plan's traffic, `flowc.estimate` and
`flowc.simulate`. Nothing here parses text or solves an optimization."""
