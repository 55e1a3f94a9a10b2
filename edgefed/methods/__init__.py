"""The method registry: name -> (client algorithm, server strategy). Adding a method is one
module and one line here; the engine, agent and CLI look methods up by name only."""
from __future__ import annotations

from .base import (ClientAlgorithm, ClientResult, JobConfig, Method, MethodState, PlanFields,
                   ServerStrategy)
from .fedavg import FedAvgClient, FedAvgServer
from .fedkseed import FedKSeedClient, FedKSeedServer
from .flora import FLoRAClient, FLoRAServer
from .hetlora import HetLoRAClient, HetLoRAServer
from .fedmezo import FedMeZOClient, FedMeZOServer

__all__ = ["METHODS", "get_method", "ClientAlgorithm", "ClientResult", "JobConfig", "Method",
           "MethodState", "PlanFields", "ServerStrategy"]

METHODS: dict[str, Method] = {m.name: m for m in [
    Method("fedkseed", FedKSeedClient, FedKSeedServer,
           "ZO on any trainables; (seed index, scalar) pairs each way; add pro=1 for FedKSeed-Pro"),
    Method("fedmezo", FedMeZOClient, FedMeZOServer,
           "ZO on LoRA / prompt trainables; averaged parameter deltas each way"),
    Method("fedavg", FedAvgClient, FedAvgServer,
           "backprop on torch hosts (full / LoRA / prompt, any task); prox_mu=FedProx, "
           "server_opt=avgm|adagrad|adam|yogi"),
    Method("flora", FLoRAClient, FLoRAServer,
           "backprop LoRA, stacked (exact sum of B_i A_i for any mix of ranks), merged into the frozen "
           "weights on every host"),
    Method("hetlora", HetLoRAClient, HetLoRAServer,
           "backprop LoRA with per-host ranks (assign by device class), self-pruning, sparsity-weighted "
           "per-component aggregation"),
]}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}") from None
