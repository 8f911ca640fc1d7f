"""Plans for runtime tests: one instance with small pools (to force preemption) and small token
budgets (to force chunked prefill); see `flowc.compiler.plan.instance_plan`."""

from flowc.compiler.plan import instance_plan

__all__ = ["instance_plan"]
