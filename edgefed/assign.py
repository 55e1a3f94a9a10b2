"""Per-device plans on a broadcast plan: which devices train this round, and with what.

The round plan is one retained message for the whole fleet, so per-device choices travel as
rules every device evaluates on itself and the server evaluates again when it admits the
update (a device cannot grant itself more):

- `select_fraction` (0 < f <= 1): a device trains in round r when a hash of (run seed, r,
  device id) falls below f. A uniform, seeded sample of about f of the fleet per round, with no
  device list on the wire; the server refuses updates from devices outside it.
- `assign`: a JSON object mapping a device class (the `device_class` a device announces in its
  Status, e.g. "raspberry-pi-4", "jetson-orin-nano", "gpu-host") or "*" to overrides of plan
  fields (local_steps, batch_size, lr) and method params (e.g. HetLoRA's "rank"):
  `{"raspberry-pi-4": {"local_steps": 2, "rank": 2}, "*": {"rank": 8}}`. A class entry wins
  over "*".

This is Flower's configure_fit, compiled to rules because the plan is broadcast. Device-side
module: no torch.
"""
from __future__ import annotations

import dataclasses
import json
import zlib
from typing import Any, Mapping, Optional

from . import protocol as P

__all__ = ["selected", "plan_for", "parse_assign", "device_rules", "PLAN_FIELDS", "ASSIGN_KEY", "SELECT_KEY"]

ASSIGN_KEY = "assign"
SELECT_KEY = "select_fraction"
PLAN_FIELDS = {"local_steps": int, "batch_size": int, "lr": float}  # RoundPlan fields an assignment may set


def parse_assign(text: Any) -> dict[str, dict[str, Any]]:
    """The `assign` rule as {class: {key: value}}; ValueError says what is wrong."""
    if text in (None, ""):
        return {}
    try:
        rules = json.loads(text) if isinstance(text, str) else text
    except json.JSONDecodeError as e:
        raise ValueError(f"assign={text!r} is not JSON ({e}); write e.g. "
                         '\'{"raspberry-pi-4": {"local_steps": 2}, "*": {"rank": 8}}\'') from None
    if not isinstance(rules, dict):
        raise ValueError("assign must be a JSON object: device class (or \"*\") -> {setting: value}")
    for cls, over in rules.items():
        if not isinstance(over, dict):
            raise ValueError(f"assign[{cls!r}] must be an object of settings, got {type(over).__name__}")
        for k, v in over.items():
            if k in PLAN_FIELDS:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                    raise ValueError(f"assign[{cls!r}][{k!r}]={v!r} must be a positive number")
                if PLAN_FIELDS[k] is int and int(v) != v:
                    raise ValueError(f"assign[{cls!r}][{k!r}]={v!r} must be an integer")
            elif not isinstance(v, (int, float, str)) or isinstance(v, bool):
                raise ValueError(f"assign[{cls!r}][{k!r}] must be a number or a string")
    return rules


def _fraction(params: Mapping[str, Any]) -> float:
    f = float(params.get(SELECT_KEY, 1.0))
    if not 0.0 < f <= 1.0:
        raise ValueError(f"{SELECT_KEY}={f} must be in (0, 1]")
    return f


def selected(plan: P.RoundPlan, device: str, job: str = "") -> bool:
    """Does `device` train in this plan's round?"""
    f = _fraction(plan.params)
    if f >= 1.0:
        return True
    run = plan.params.get("run_seed", job or plan.job)
    h = zlib.crc32(f"select/{run}/{plan.round}/{device}".encode())
    return h < f * 2 ** 32


def plan_for(plan: P.RoundPlan, device: str, device_class: str = "") -> Optional[P.RoundPlan]:
    """The plan as `device` (of `device_class`) runs it: None when it is not selected this round,
    else the plan with its class's overrides (plan fields and params) applied."""
    if not selected(plan, device):
        return None
    rules = parse_assign(plan.params.get(ASSIGN_KEY))
    over = {**rules.get("*", {}), **rules.get(device_class, {})}
    if not over:
        return plan
    fields = {k: PLAN_FIELDS[k](v) for k, v in over.items() if k in PLAN_FIELDS}
    params = {**plan.params, **{k: v for k, v in over.items() if k not in PLAN_FIELDS}}
    return dataclasses.replace(plan, params=params, **fields)


def device_rules(job) -> dict:
    """The per-device rules a job's plans carry (from its params: select_fraction, assign),
    checked here so that a bad rule fails when the job starts, not at the first update."""
    rules = {k: job.params[k] for k in (SELECT_KEY, ASSIGN_KEY) if k in job.params}
    _fraction(rules)
    parse_assign(rules.get(ASSIGN_KEY))
    return rules
