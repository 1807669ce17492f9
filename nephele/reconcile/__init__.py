"""nephele.reconcile: desired x observed x inventory -> Plan, and (later) executing it.

actions.py   the plan as a value: Action, Precondition, Diagnostic, Plan (JSON format_version "1")
plan.py      plan(desired, observed, inventory, options) -> Plan; PURE, deterministic
estimate.py  the handoff / copy cost model (a model, documented in docs/plan.md)
render.py    Terraform-style text and JSON output
planfile.py  saved plans (-out), manifest hash check, stale_preconditions(plan, observed)
"""
