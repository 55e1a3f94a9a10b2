"""The devices the server knows of in one job: what each last said in its Status (state,
round, class, first and last seen), and which have had an update accepted ("proven", so
they count toward a round's target, round_policy.countable). The engine decides what a
Status means for the open round; this file only holds and lists."""
from __future__ import annotations

from typing import Dict, Iterable, List, Set

__all__ = ["DeviceRegistry"]


def device_info(state: str, rnd: int, device_class: str, first_seen: float, last_seen: float,
                text: str) -> dict:
    return {"state": state, "online": state != "offline", "round": rnd,
            "device_class": device_class, "first_seen": first_seen, "last_seen": last_seen,
            "text": text}


class DeviceRegistry:
    def __init__(self, status_devices: int, max_devices: int):
        self.status_devices = int(status_devices)  # how many a status page lists
        self.max_devices = int(max_devices)
        self.devices: Dict[str, dict] = {}  # device -> device_info(...)
        self.proven: Set[str] = set()       # devices with an accepted update in this job

    def restore(self, rows: Iterable[dict], proven: Iterable[str] = ()) -> None:
        """The store's device rows (Store.devices) and accepted devices, after a restart."""
        for d in rows:
            self.devices[d["device"]] = device_info(d["state"], d["round"], d["device_class"], d["first_seen"],
                                                    d["last_seen"], d["status"].get("text", ""))
        self.proven = set(proven)

    def clear(self) -> None:
        self.devices.clear()
        self.proven.clear()

    def record_status(self, device: str, state: str, rnd: int, device_class: str, now: float,
                      text: str) -> tuple[dict, bool]:
        """Record a device's Status; (its info now, whether the device is new)."""
        prev = self.devices.get(device)
        info = device_info(state, rnd, device_class, prev["first_seen"] if prev else now, now, text)
        self.devices[device] = info
        return info, prev is None

    def prove(self, device: str, rnd: int, now: float) -> None:
        """An update of `device` was accepted (a device that never sent a Status is listed as
        "unknown": allow_unknown_devices)."""
        self.proven.add(device)
        if device not in self.devices:
            self.devices[device] = device_info("unknown", rnd, "", now, now, "")

    def device_class(self, device: str) -> str:
        return str(self.devices.get(device, {}).get("device_class", ""))

    def online(self) -> Set[str]:
        return {d for d, i in self.devices.items() if i["online"]}

    def listed(self) -> List[dict]:
        """At most status_devices devices: active ones (not finished/offline) first, by id."""
        order = sorted(self.devices.items(), key=lambda kv: (kv[1]["state"] in ("finished", "offline"), kv[0]))
        return [{"device": d, **i} for d, i in order[:self.status_devices]]

    def summary(self, refused: int) -> dict:
        states: Dict[str, int] = {}
        for i in self.devices.values():  # at most 32 state names: a device picks its own
            k = i["state"] if len(states) < 32 or i["state"] in states else "other"
            states[k] = states.get(k, 0) + 1
        return {"registered": len(self.devices), "listed": min(len(self.devices), self.status_devices),
                "online": len(self.online()), "proven": len(self.proven),
                "max_devices": self.max_devices, "refused": refused, "by_state": states}
