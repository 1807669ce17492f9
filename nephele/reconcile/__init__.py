"""nephele.reconcile: observe the nodes, desired x observed x inventory -> Plan, and execute it.

actions.py   the plan as a value: Action, Precondition, Diagnostic, Plan (JSON format_version "1")
plan.py      plan(desired, observed, inventory, options) -> Plan; PURE, deterministic
estimate.py  the handoff / copy cost model (a model, documented in docs/plan.md)
render.py    Terraform-style text and JSON output
planfile.py  saved plans (-out), manifest hash check, stale_preconditions(plan, observed)
observe.py   observe(desired, transports, timeout) -> Observed: all nodes in parallel, dark = unreachable
execute.py   apply(plan, desired, transports, options) -> ApplyResult: the graph walk (docs/apply.md)
controller.py  one manifest on the controller: read it, its state dir, transports, revision
statedir.py  inventory.py  journal.py  locks.py  status.py   the state directory's files, and status
"""
