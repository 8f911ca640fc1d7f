"""Placement: how many instances of each candidate to run, and on which GPUs (CP-SAT).

Input: a cluster, the deployments sharing it (`Demand`: objective, load, `max_gpus`, allowed
`replicas`) and, per deployment, candidate instance types (`Candidate`: GPU type, TP, PP, role, the capacity one
instance sustains under the SLO, the KV bytes a request sends from prefill to decode).
Output: a `Placement` with the exact GPUs of every instance, or `PlacementInfeasible`.

Rules
-----
* A GPU hosts at most one instance. A TP group (one pipeline stage) lies inside one link
  domain of one node (`link_domain` consecutive GPU indices; the last block of a node may be
  smaller). Inside a domain every GPU reaches every other (NVSwitch), so a domain only has to
  hold the sum of its groups' sizes.
* The stages of one instance may sit in different domains or nodes; crossing nodes needs
  the cluster's `network`; without one every stage of an instance is on one node.
* The candidate's GPU type is the node group's GPU.
* Goodput of a deployment: the sum of its colocated instances' capacities, or for a
  disaggregated deployment min(prefill sum, decode sum). A deployment is one or the other
  (its plan has one mode): a boolean picks the mode when it has candidates of both kinds.
  Goodput >= load; GPUs <= `max_gpus`.
* Replicas: with `Demand.replicas` the deployment's number of instances, all candidates and
  roles together (prefill plus decode instances when disaggregated), is one of those values.
* KV traffic of a disaggregated deployment d (documented model, conservative, independent of
  how a router pairs requests): a prefill instance of capacity c sends at most
  kv * min(c, load) bytes/s, split evenly over its pp stages, so node v sends at most
  out(v, d) = min(kv * load, sum over prefill stages on v of kv * min(c, load) / pp);
  received traffic in(v, d) likewise from decode stages. If all of d sits on one node nothing
  crosses the network; otherwise every prefill stage's KV counts as leaving its node (even
  when a decode instance shares the node) and, per node and direction,
  sum over d of out(v, d) <= network.bandwidth * network_nics (and the same for in). Without a
  network the bandwidth is 0: a disaggregated deployment with KV traffic then lives on one
  node. Pipeline activations between stages on different nodes are not charged to the network.
* Cost: a GPU costs its node group's price / gpus_per_node when the group has a price, else
  the GPU's own price; only GPUs that host an instance are charged.

Scaling to integers
-------------------
Capacities and loads in 1/RPS_SCALE req/s (milli-req/s): capacities rounded to the nearest
unit, loads rounded up. Prices in 1/COST_SCALE usd/h (rounded to nearest). KV coefficients in
units of max(bandwidth, KV load)/1e6 bytes/s, traffic rounded up and bandwidth down (safe).

Model
-----
One integer n_c per candidate (instances of a candidate are interchangeable: counts, never
per-instance booleans) and, per deployment, K_d (GPUs), G_d (goodput), cost_d and, with
replicas, sum of its n_c in the allowed set (a linear expression in a domain over the counts
that every layer shares). Three placement layers, all exact for the rules above (checked
against brute force in the tests):

* aggregated: used when no KV row can bind (no disaggregated deployment, or the sum of
  kv * load of all of them fits every node's NIC) and stages may cross nodes (a network, or
  no pipelined candidate with more than one node of its type). Per (candidate, node group)
  stage counts x_cg with sum_g x_cg = pp_c * n_c: identical nodes of a group are one pool,
  so they carry no symmetry at all. Per class of equal-size domains of a group: when the TP
  sizes form a divisibility chain dividing the domain size (1, 2, 4, 8 in 8) one capacity row
  is exact (divisible sizes pack perfectly, first fit decreasing); otherwise integer counts
  of domains using each maximal pattern (multiset of TP sizes filling a domain); beyond
  PATTERN_LIMIT patterns, per-domain counts ordered by load.
* configs (node configurations, Gilmore-Gomory style): used otherwise when it fits.
  "Node-bound" candidates are those whose node matters: prefill/decode of a deployment with
  KV rows, and without a network the pipelined ones. Every filling of one node with
  node-bound TP groups that packs into its domains, forms whole instances where it must and
  obeys the node's KV rule is enumerated (per group, up to CONFIG_LIMIT); z_gQ counts the
  nodes of group g using configuration Q. A configuration also exists in "local" variants
  where some deployments live on this node only (KV free; a boolean per deployment allows at
  most one such node and then no other node of it); local variants that are worse in goodput
  for the same GPUs and the same other content (and instance count, where replicas restricts
  it) are dropped. The other ("pooled") candidates take the room the configurations leave:
  with TP sizes in a divisibility chain, one row per size s,
  sum_{tp >= s} tp * x_cg <= sum_Q z_gQ * sum_domains s * floor(free / s), is exact (the room
  at each size level does not depend on where the larger groups went). Its LP is the
  configuration LP, tight where the per-node model's is weak (bin packing of instances
  under per-node KV limits: 64 nodes near the limit solve in 0.1 s instead of timing out).
* per node (the fallback when configurations are too many or the pooled TP sizes are not a
  chain): node-bound TP groups per (node, domain, candidate), pooled slots per (node, domain,
  TP size), instance counts per node without a network, and linear KV rows per node and
  direction (the min with kv * load is kept only where it can matter) with the one-node
  boolean; a row's right-hand side is lowered to the largest sum its stages can reach. No
  explicit ordering of identical nodes: it hid the symmetry from CP-SAT's own detection,
  which with the "max_lp_sym" subsolver (added to the portfolio) closes bounds the default
  2-worker portfolio does not (measured: 20 s -> 0.04 s on a 64-node instance).

Objectives and several deployments
----------------------------------
Deployments are optimized lexicographically in the order of `demands` (the first has
priority). For each in turn, with the earlier ones' results locked as constraints:

* min_gpus: minimize K_d, then (tie-break) maximize G_d;
* min_cost: minimize cost_d, then maximize G_d;
* max_goodput_per_gpu: maximize G_d / K_d exactly by Dinkelbach's method: from a feasible
  ratio a/b, maximize b*G_d - a*K_d; a positive optimum gives a better ratio, zero proves
  a/b optimal (each step is an integer CP-SAT solve, so the ratio is exact in the scaled
  units; typically 2-3 steps); then (tie-break) minimize K_d at that ratio. The deployment
  needs >= 1 instance. With `ratio_tolerance` t > 0 the tie-break takes the fewest GPUs with
  ratio >= (1 - t) * best, then the most goodput at those GPUs;
* max_throughput (an offline batch, load 0): maximize G_d, the capacities of saturated
  instances, then (tie-break) minimize K_d. The deployment needs >= 1 instance.

Locks: K_d <= k*, G_d >= g*, cost_d <= c*, b*G_d >= a*K_d. Guarantee (when every solve is
OPTIMAL): the result is the lexicographic optimum over (deployment 1 objective, its
tie-break, deployment 2 objective, ...). It is Pareto-optimal, so no deployment can improve
its objective by moving only its own instances while the others keep theirs; a later
deployment's optimum is conditional on the earlier ones being optimal. When the time limit
cuts a solve, the best solution found is locked instead, status is "feasible" and the gap is
reported per deployment (for a ratio: from the last Dinkelbach step's bound,
ratio <= a/b + UB / (b * K_min), K_min >= load / best instance ratio). Time: each deployment
gets an equal share of what is left; the first feasible solution may use all of it.
Placement.objective/bound are the first deployment's; Placement.gap is the largest gap.

Exact GPUs: after solving, counts become GPUs deterministically: patterns or configurations
go to nodes in node order, TP groups are laid out largest first from the domain's first GPU,
an instance's stages stay on one node whenever a node has room for all of them. One CP-SAT
worker (the default) returns the same optimum every run; with workers > 1 a portfolio may
return another of equal value (chat-70b did, as two decode groups instead of one, under a
loaded CI machine), so compiles stay on one worker: the examples solve in the same time.

Binding constraints (`Placement.binding`) are tight constraints, not a sensitivity analysis:
a GPU type fully used, free GPUs that no candidate fits (link domains), max_gpus leaving no
room for another instance, a deployment at the most instances its replicas allow, a deployment
kept on one node by the KV rule, NICs >= 80% used.

Infeasible: PlacementInfeasible names the first deployment that cannot be served: one that
cannot reach its load alone on the cluster, else the first in priority order that cannot
reach it next to the ones before it (served at their loads); with its largest servable load
(max goodput, solved, at an allowed replica count) and the GPUs its load needs given enough
nodes (a knapsack over its candidates, ignoring the cluster size, max_gpus and KV rows; at an
allowed replica count when one serves the load, else without the restriction, and the message
says that the load takes more instances than replicas allows).

Modules
-------
types.py        the public inputs, result and errors (re-exported here)
problem.py      nodes, groups and link domains, placeable candidates, scaling, KV deployments
model.py        the CP-SAT model core (n_c, K_d, G_d, cost_d, mode, replicas) and the layer choice
aggregated.py   the aggregated layer (domain classes, patterns; PATTERN_LIMIT)
configs.py      the configuration layer (enumeration, local variants; CONFIG_LIMIT)
per_node.py     the per-node layer and its KV rows
objectives.py   the lexicographic solve, Dinkelbach's method, time shares
materialize.py  counts to exact GPUs, and the invariants every placement is checked against
binding.py      binding constraints and KV traffic per node
diagnose.py     infeasibility: the deployment to blame, its max goodput, the GPUs it needs
solve.py        solve_placement

The settings _LAYER (model.py), PATTERN_LIMIT (aggregated.py) and CONFIG_LIMIT (configs.py) are
read from the module that defines them: set them there.
"""

from flowc.compiler.optimize.placement.problem import COST_SCALE, RPS_SCALE
from flowc.compiler.optimize.placement.solve import solve_placement
from flowc.compiler.optimize.placement.types import (
                                                     Candidate,
                                                     Demand,
                                                     DeploymentPlacement,
                                                     Objective,
                                                     PlacedInstance,
                                                     Placement,
                                                     PlacementError,
                                                     PlacementInfeasible,
                                                     PlacementTimeout,
                                                     Role,
)

__all__ = ["COST_SCALE", "RPS_SCALE", "Candidate", "Demand", "DeploymentPlacement", "Objective", "PlacedInstance",
           "Placement", "PlacementError", "PlacementInfeasible", "PlacementTimeout", "Role", "solve_placement"]
