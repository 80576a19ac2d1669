"""Server-side alerts for ``stylize_manifest``: Prefect automations that call a webhook.

The worker-side hook (``flows.hooks.notify_failure``) runs only where the flow runs: a lost node,
a worker that never picks the run up or a run that hangs sends nothing. These automations live
on the Prefect server, so they fire whatever happened to the worker:

``nst: stylize_manifest run failed``
    reactive: any run of the flow (every deployment, and runs started in-process against this
    server) that enters a ``Failed``, ``Crashed`` or ``TimedOut`` state.
``nst: stylize_manifest/scheduled run overdue``
    proactive: a run of the scheduled deployment that went ``Pending`` (a worker took it) or
    ``Late`` (nobody took it) and reached no final state (``Completed``, ``Failed``, ``Crashed``,
    ``Cancelled``, ``TimedOut``) within the deadline. Failed and cancelled runs do not fire it
    again (the failure alert covers the first; the second is the concurrency limit's
    ``CANCEL_NEW`` skipping a night while the overrunning run, which fires this, still goes).

Both call the webhook held in the Prefect Webhook block ``nst-failure-webhook`` (its URL is a
``SecretStr``: the UI shows it masked, the automations hold only the block's id; nothing carries
it in parameters, events or logs). Their JSON has the shape of ``notify_failure``'s: ``text``
(a valid Slack / Mattermost / Teams-workflow message), ``event``, ``flow``, ``deployment``,
``flow_run`` (``id``, ``name``, ``state``, ``message``, ``url``) and the run's
``manifest_uri`` / ``output_uri`` without query strings.

:func:`ensure_alerts` creates (or replaces, by name) the block and the automations; ``nst serve``
calls it (``--failure-webhook`` / ``NST_FAILURE_WEBHOOK``; ``--alerts-only`` after ``prefect
deploy``), ``make up`` through ``nst serve --alerts-only``.
"""

from __future__ import annotations

import os
import urllib.parse
from typing import Any

FLOW_NAME = "stylize_manifest"
WEBHOOK_BLOCK = "nst-failure-webhook"
FAILED_AUTOMATION = f"nst: {FLOW_NAME} run failed"
OVERDUE_AUTOMATION = f"nst: {FLOW_NAME}/scheduled run overdue"
FAILED_STATES = ("Failed", "Crashed", "TimedOut")
FINAL_STATES = ("Completed", "Failed", "Crashed", "Cancelled", "TimedOut")
STARTED_STATES = ("Pending", "Late")  # a worker took the run / nobody took it in time
DEFAULT_DEADLINE_HOURS = 8.0  # the nightly run (02:00 UTC) should be done by 10:00

# Jinja, rendered by the server with the failed run (https://docs.prefect.io/v3/automate/events/automations-triggers).
# tojson quotes and escapes every value; URIs lose their query strings (presigned URLs).
FAILED_PAYLOAD = (
    "{%- set uri_m = (flow_run.parameters.get('manifest_uri') or '')|string -%}"
    "{%- set uri_o = (flow_run.parameters.get('output_uri') or '')|string -%}"
    "{%- set dep = (flow.name ~ '/' ~ deployment.name) if deployment else none -%}"
    '{"text": {{ (flow.name ~ " run \'" ~ flow_run.name ~ "\'" ~ ((" (" ~ dep ~ ")") if dep else "") ~ " ended "'
    ' ~ flow_run.state.name ~ ": " ~ ((flow_run.state.message or "")|truncate(500, True, "...", 0)) ~ " " ~ ((flow_run|ui_url) or ""))|tojson }},'
    ' "event": {{ ("nst.flow_run." ~ flow_run.state.name|lower)|tojson }},'
    ' "source": "prefect-automation",'
    ' "flow": {{ flow.name|tojson }},'
    ' "deployment": {{ dep|tojson }},'
    ' "flow_run": {"id": {{ flow_run.id|string|tojson }}, "name": {{ flow_run.name|tojson }},'
    ' "state": {{ flow_run.state.name|tojson }}, "message": {{ ((flow_run.state.message or "")|truncate(500, True, "...", 0))|tojson }},'
    ' "url": {{ (flow_run|ui_url)|tojson }}},'
    ' "parameters": {"manifest_uri": {{ uri_m.split("?")[0]|tojson }}, "output_uri": {{ uri_o.split("?")[0]|tojson }}}}'
)


def overdue_payload(deadline_s: float, ui_url: str | None) -> str:
    """The overdue alert's JSON template: a proactive trigger has no event, only the run's id (its label)."""
    run_id = "(labels.prefect.resource.id|string).replace('prefect.flow-run.', '')"
    url = f"{ui_url.rstrip('/')}/runs/flow-run/" if ui_url else ""
    hours = f"{deadline_s / 3600:g} h" if deadline_s >= 3600 else f"{deadline_s:g} s"
    return (
        f"{{%- set run_id = {run_id} -%}}"
        f'{{"text": {{{{ ("{FLOW_NAME}/scheduled run " ~ run_id ~ " is overdue: not finished {hours} after it went Pending (or Late)"'
        f' ~ (" {url}" ~ run_id if "{url}" else ""))|tojson }}}},'
        f' "event": "nst.flow_run.overdue", "source": "prefect-automation", "flow": "{FLOW_NAME}",'
        f' "deployment": "{FLOW_NAME}/scheduled", "deadline_s": {deadline_s:g},'
        f' "flow_run": {{"id": {{{{ run_id|tojson }}}}, "url": {{{{ ("{url}" ~ run_id if "{url}" else none)|tojson }}}}}}}}'
    )


def check_webhook_url(url: str) -> str:
    """``url`` if it is an http(s) URL with a host.

    Raises:
        ValueError: anything else (the message never repeats the URL: it may hold a token).
    """
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("the failure webhook must be an http(s) URL with a host")
    return url.strip()


def failed_automation(block_id: Any) -> Any:
    """The reactive automation: a run of the flow failed, crashed or timed out."""
    from prefect.events.actions import CallWebhook
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    return AutomationCore(
        name=FAILED_AUTOMATION,
        description=f"POST to the {WEBHOOK_BLOCK} webhook block when a {FLOW_NAME} run ends {', '.join(FAILED_STATES)} (nst_cli/alerts.py)",
        trigger=EventTrigger(
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.role": "flow", "prefect.resource.name": FLOW_NAME},
            expect={f"prefect.flow-run.{state}" for state in FAILED_STATES},
            posture=Posture.Reactive,
            threshold=1,
            within=0,
        ),
        actions=[CallWebhook(block_document_id=block_id, payload=FAILED_PAYLOAD)],
    )


def overdue_automation(block_id: Any, deployment_id: Any, deadline_s: float, ui_url: str | None) -> Any:
    """The proactive automation: a scheduled run has no final state ``deadline_s`` after it started (or was late)."""
    from prefect.events.actions import CallWebhook
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    return AutomationCore(
        name=OVERDUE_AUTOMATION,
        description=f"POST to the {WEBHOOK_BLOCK} webhook block when a {FLOW_NAME}/scheduled run is not finished "
        f"{deadline_s:g} s after going Pending or Late (nst_cli/alerts.py)",
        trigger=EventTrigger(
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.id": f"prefect.deployment.{deployment_id}"},
            after={f"prefect.flow-run.{state}" for state in STARTED_STATES},
            expect={f"prefect.flow-run.{state}" for state in FINAL_STATES},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=deadline_s,
        ),
        actions=[CallWebhook(block_document_id=block_id, payload=overdue_payload(deadline_s, ui_url))],
    )


def ensure_alerts(webhook_url: str, *, scheduled_deployment_id: Any = None, deadline_s: float = DEFAULT_DEADLINE_HOURS * 3600) -> dict[str, str]:
    """Save the webhook block and (re)create the automations on the current Prefect server.

    Args:
        webhook_url: where the alerts are POSTed (kept only in the block, as a secret).
        scheduled_deployment_id: the scheduled deployment's id; ``None`` leaves the overdue alert out.
        deadline_s: how long a scheduled run may take from going Pending (or Late) to a final state.

    Returns:
        ``{name: id}`` of the block and each automation.

    Raises:
        ValueError: ``webhook_url`` is not an http(s) URL, or ``deadline_s`` is under 10 s (Prefect's minimum).
    """
    from prefect.blocks.webhook import Webhook
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_UI_URL

    url = check_webhook_url(webhook_url)
    if deadline_s < 10:
        raise ValueError(f"the run deadline must be at least 10 s (got {deadline_s:g})")
    block_id = Webhook(method="POST", url=url, headers={"Content-Type": "application/json", "User-Agent": "nst-bulk-alerts"}).save(
        WEBHOOK_BLOCK, overwrite=True
    )
    wanted = [failed_automation(block_id)]
    if scheduled_deployment_id is not None:
        ui_url = PREFECT_UI_URL.value() or os.environ.get("PREFECT_UI_URL")
        wanted.append(overdue_automation(block_id, scheduled_deployment_id, deadline_s, ui_url))
    out = {WEBHOOK_BLOCK: str(block_id)}
    with get_client(sync_client=True) as client:
        for automation in wanted:
            for old in client.read_automations_by_name(automation.name):  # replace: re-running converges
                client.delete_automation(old.id)
            out[automation.name] = str(client.create_automation(automation))
    return out
