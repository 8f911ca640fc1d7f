"""The flowc compiler, in rooms that follow the data flow (each imports only the rooms before it;
tests/test_layering.py pins it):

base       diagnostics, source, units, version
ir         spec (the checked spec), plan (the contract with the runtime), plan_io
model/     what a model, a GPU and a workload imply: geometry, parallelism, memory, cost,
           simulator, goodput, instances, traffic, estimates
frontend/  .flow text -> AST -> checked spec (parser, imports, checker, formatter)
verify/    an independent re-check of a plan
optimize/  candidates, placement (CP-SAT), arena, offload, compile
render/    a plan as text, diagrams, an HTML report, engine launch scripts
"""
