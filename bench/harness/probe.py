"""Where the work runs: which models and reference sets each node of an attached Ray cluster has.

On a cluster the driver may sit on a login node with neither weights nor data, so availability is asked of the
nodes: one zero-CPU task per alive node (pinned with NodeAffinitySchedulingStrategy) runs the same offline checks the
driver runs locally (bench.harness.plan.model_status and reference_status) after importing the grid's plugins.
A model (or a reference set) counts as available when at least one node has it; the dry run prints the answer per
node. The local default (a laptop, CI) needs no probe: the driver's disk is the node's.
"""

from __future__ import annotations

import socket

PROBE_TIMEOUT_S = 120


def _check(models: list[str], cells: list[dict], imports: list[str]) -> dict:
    """Runs on one node: its host, node id and the offline checks."""
    import ray

    from bench.harness.grid import Cell
    from bench.harness.plan import import_plugins, model_status, reference_status

    import_plugins(imports)
    return {"node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
            "models": {m: list(model_status(m)) for m in models},
            "refs": [list(reference_status(Cell.from_dict(c))) for c in cells]}


def probe_nodes(models: list[str], cells: list, imports: list[str]) -> list[dict]:
    """One answer per alive node: {"node_id", "host", "models": {name: [ok, why]}, "refs": [[ok, why] per cell]},
    or {"node_id", "host", "error"} for a node that did not answer within PROBE_TIMEOUT_S."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, max_retries=0)(_check)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    refs = {task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
        models, [c.to_dict() for c in cells], imports): n for n in nodes}
    out = []
    ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=PROBE_TIMEOUT_S)
    for ref, n in refs.items():
        host = n.get("NodeManagerHostname") or n.get("NodeManagerAddress") or "?"
        if ref not in ready:
            out.append({"node_id": n["NodeID"], "host": host, "error": f"no answer in {PROBE_TIMEOUT_S}s"})
            continue
        try:
            out.append(ray.get(ref))
        except ray.exceptions.RayError as e:
            out.append({"node_id": n["NodeID"], "host": host,
                        "error": f"probe failed: {str(e).strip().splitlines()[-1][:200]}"})
    return out


def _where(probes: list[dict], ok_of) -> tuple[bool, str]:
    answered = [p for p in probes if "error" not in p]
    have = [p for p in answered if ok_of(p)[0]]
    if have:
        hosts = ", ".join(sorted({p["host"] for p in have}))
        return True, f"on {len(have)} of {len(probes)} node(s) ({hosts})"
    if not answered:
        return False, "no node of the cluster answered the availability probe"
    return False, f"on none of the {len(probes)} node(s): {ok_of(answered[0])[1]}"


def merge_models(probes: list[dict], models: list[str]) -> dict[str, tuple[bool, str]]:
    """model -> (available on some node, where or why not)."""
    return {m: _where(probes, lambda p, m=m: p["models"][m]) for m in models}


def merge_refs(probes: list[dict], n_cells: int) -> list[tuple[bool, str]]:
    """Per probed cell: (its reference data is on some node, where or why not)."""
    return [_where(probes, lambda p, i=i: p["refs"][i]) for i in range(n_cells)]


def placement(probes: list[dict], keys: list[tuple]) -> dict[tuple, frozenset[str]]:
    """(model, metrics) -> the ids of the nodes that have both the model and the reference data of those metrics:
    where the dispatcher may run such a cell. `keys[i]` is the probed cell i's (model, metrics)."""
    out = {}
    for i, key in enumerate(keys):
        out[key] = frozenset(p["node_id"] for p in probes if "error" not in p and p["models"][key[0]][0]
                             and p["refs"][i][0])
    return out


def node_lines(probes: list[dict], models: list[str]) -> list[str]:
    """The dry run's per-node availability."""
    lines = []
    for p in sorted(probes, key=lambda p: (p["host"], p["node_id"])):
        head = f"  node {p['host']} ({p['node_id'][:8]})"
        if "error" in p:
            lines.append(f"{head}: {p['error']}")
            continue
        have = [m for m in models if p["models"][m][0]]
        miss = [f"{m} ({p['models'][m][1]})" for m in models if not p["models"][m][0]]
        lines.append(f"{head}: available {', '.join(have) or '-'}" + (f"; missing {'; '.join(miss)}" if miss else ""))
    return lines
