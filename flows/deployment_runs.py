"""Flow runs of a Prefect deployment, for what submits runs from outside a flow (the gallery's run submissions):
start one, read its state, cancel it. Kept here so that review/ reaches Prefect only through flows/."""

from __future__ import annotations

from typing import Any

__all__ = ["cancel_flow_run", "flow_run_state", "start_flow_run"]


def start_flow_run(deployment: str, parameters: dict[str, Any]) -> str:
    """A new flow run of ``deployment`` ("flow-name/deployment-name") with ``parameters``, not waited for; its id."""
    from prefect.deployments import run_deployment

    return str(run_deployment(deployment, timeout=0, parameters=parameters).id)


def flow_run_state(flow_run_id: str) -> str | None:
    """The flow run's state type (COMPLETED, RUNNING, ...), None when it has none yet."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        state = client.read_flow_run(flow_run_id).state
    return state.type.value if state is not None else None


def cancel_flow_run(flow_run_id: str) -> None:
    """Ask Prefect to cancel the flow run (its worker stops the process)."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, Cancelling(), force=True)
