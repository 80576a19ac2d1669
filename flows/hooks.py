"""Operational wiring of the flows: the failure webhook and parameter descriptions.

``notify_failure`` is a Prefect state hook (``on_failure`` / ``on_crashed``):
when a run of the flow ends ``Failed`` or ``Crashed`` and ``NST_FAILURE_WEBHOOK``
is set (in the environment of the worker or serving process that runs it), it
POSTs one JSON document to that URL::

    {"text": "stylize_manifest run 'amber-fox' (stylize_manifest/scheduled, scheduled) failed: ...",
     "event": "nst.flow_run.failed", "flow": "stylize_manifest", "deployment": "stylize_manifest/scheduled",
     "flow_run": {"id": ..., "name": ..., "state": "Failed", "message": ..., "scheduled": true,
                  "url": "http://127.0.0.1:4200/runs/flow-run/..."},
     "parameters": {"manifest_uri": "s3://...", "output_uri": "s3://..."}}

``text`` makes it a valid Slack / Mattermost / Teams-workflow incoming-webhook
message as is. The payload never carries a secret: no environment, no
credentials, no webhook URL; URIs lose query strings and user info, and any value
of a secret-looking environment variable (``*SECRET*``, ``*TOKEN*``, ``*PASSWORD*``,
``*AUTH*``, ``*KEY*``) that shows up in a message is replaced by ``***``.
Settings (environment variables):

- ``NST_FAILURE_WEBHOOK``: the http(s) URL to POST to; unset = no notification.
- ``NST_FAILURE_WEBHOOK_SCOPE``: ``no-deployment`` (default: only runs not started
  from a deployment, such as ``nst run``'s; deployment runs are covered by the
  server's automations, ``nst_cli/alerts.py``, which also see lost workers and
  overdue runs), ``all`` (every failed run: a server without those automations)
  or ``scheduled`` (only runs created by a deployment's schedule).
- ``NST_FAILURE_WEBHOOK_TIMEOUT_S``: seconds before giving up (default 10).

A notification that cannot be sent is logged (with the webhook's host only) and
never changes the run's state.

``describe_parameters`` copies the ``Field(description=...)`` of each
``Annotated`` parameter into a Google-style ``Args:`` section of the function's
docstring, which is where Prefect's parameter schema (the UI's run form)
takes parameter descriptions from: Prefect 3.8 drops descriptions given only
in ``Annotated`` metadata.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
import typing
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic.fields import FieldInfo

from nst_core import storage

WEBHOOK_ENV = "NST_FAILURE_WEBHOOK"
SCOPE_ENV = "NST_FAILURE_WEBHOOK_SCOPE"
TIMEOUT_ENV = "NST_FAILURE_WEBHOOK_TIMEOUT_S"
DEFAULT_SCOPE = "no-deployment"
MESSAGE_LIMIT = 500
_SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|AUTH|CREDENTIAL|(^|_)KEY($|_)|_KEY_ID$", re.IGNORECASE)
_URL = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+)")

F = TypeVar("F", bound=Callable[..., Any])


# --------------------------------------------------------------------------- descriptions


def describe_parameters(fn: F) -> F:
    """Put each ``Annotated[..., Field(description=...)]`` into ``fn``'s docstring ``Args:`` section."""
    try:
        hints = typing.get_type_hints(fn, include_extras=True)
    except Exception:  # unresolvable annotations: leave the function as it is
        return fn
    lines: list[str] = []
    for name in inspect.signature(fn).parameters:
        hint = hints.get(name)
        if typing.get_origin(hint) is not typing.Annotated:
            continue
        descriptions = [m.description for m in typing.get_args(hint)[1:] if isinstance(m, FieldInfo) and m.description]
        if descriptions:
            text = " ".join(descriptions[-1].split())
            allowed = _allowed(hint)
            lines.append(f"    {name}: {text} Allowed: {allowed}." if allowed else f"    {name}: {text}")
    if lines:
        # Google style needs a summary line before the sections, or nothing is parsed.
        doc = inspect.cleandoc(fn.__doc__ or "").rstrip() or f"{fn.__name__}."
        fn.__doc__ = doc + "\n\nArgs:\n" + "\n".join(lines) + "\n"
    return fn


def _allowed(hint: Any) -> str:
    """The bounds of an annotated parameter in words (forms show descriptions, not bounds)."""
    try:
        from pydantic import TypeAdapter

        from nst_core.params import allowed_values

        return allowed_values(TypeAdapter(hint).json_schema())
    except Exception:
        return ""


# --------------------------------------------------------------------------- failure webhook


def _secret_values() -> list[str]:
    values = []
    for name, value in os.environ.items():
        if value and len(value) >= 6 and (_SECRET_NAME.search(name) or name == WEBHOOK_ENV):
            values.append(value)
            if ":" in value and name.endswith("AUTH_STRING"):  # user:password: the password alone too
                values.append(value.split(":", 1)[1])
    return sorted(set(values), key=len, reverse=True)


def scrub(text: Any, limit: int = MESSAGE_LIMIT) -> str:
    """``text`` fit for a notification: one line, URLs cleaned, secret values masked, capped."""
    out = " ".join(str(text).split())
    out = _URL.sub(lambda m: storage.sanitize_uri(m.group(1)), out)
    for secret in _secret_values():
        out = out.replace(secret, "***")
    return out if len(out) <= limit else out[: limit - 3] + "..."


def build_payload(flow: Any, flow_run: Any, state: Any) -> dict[str, Any]:
    """The JSON document posted for a failed run (pure: testable without a webhook)."""
    flow_name = getattr(flow, "name", None) or "flow"
    deployment = None
    try:
        from prefect.runtime import deployment as runtime_deployment

        if runtime_deployment.name:
            deployment = f"{flow_name}/{runtime_deployment.name}"
    except Exception:
        deployment = None
    params = dict(getattr(flow_run, "parameters", None) or {})
    shown = {k: scrub(storage.sanitize_uri(params[k]), 300) for k in ("manifest_uri", "output_uri") if isinstance(params.get(k), str)}
    ui = os.environ.get("PREFECT_UI_URL", "").rstrip("/")
    run_id = str(getattr(flow_run, "id", "") or "")
    url = f"{ui}/runs/flow-run/{run_id}" if ui and run_id else None
    scheduled = bool(getattr(flow_run, "auto_scheduled", False))
    state_name = getattr(state, "name", None) or str(getattr(state, "type", "Failed"))
    message = scrub(getattr(state, "message", "") or "")
    run_name = scrub(getattr(flow_run, "name", "") or run_id, 200)
    where = ", ".join(x for x in (deployment, "scheduled" if scheduled else None) if x)
    text = f"{flow_name} run '{run_name}'" + (f" ({where})" if where else "") + f" ended {state_name}"
    text += f": {message}" if message else "."
    if url:
        text += f" {url}"
    return {
        "text": text,
        "event": f"nst.flow_run.{state_name.lower()}",
        "flow": flow_name,
        "deployment": deployment,
        "flow_run": {
            "id": run_id,
            "name": run_name,
            "state": state_name,
            "message": message,
            "scheduled": scheduled,
            "url": url,
        },
        "parameters": shown,
    }


def _webhook_url() -> str | None:
    url = os.environ.get(WEBHOOK_ENV, "").strip()
    if not url:
        return None
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise ValueError(f"{WEBHOOK_ENV} must be an http(s) URL")
    return url


def post_json(url: str, payload: dict[str, Any], timeout: float) -> int:
    body = json.dumps(payload).encode()
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json", "User-Agent": "nst-bulk-failure-hook"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - http(s) only, checked above
        return int(resp.status)


def notify_failure(flow: Any, flow_run: Any, state: Any) -> None:
    """Prefect ``on_failure`` / ``on_crashed`` hook: POST the run's failure to ``$NST_FAILURE_WEBHOOK``."""
    logger = _logger()
    try:
        url = _webhook_url()
    except ValueError as exc:
        logger.warning("failure notification not sent: %s", exc)
        return
    if url is None:
        return
    scope = os.environ.get(SCOPE_ENV, DEFAULT_SCOPE).strip().lower()
    if scope == "scheduled" and not getattr(flow_run, "auto_scheduled", False):
        return
    if scope == DEFAULT_SCOPE and getattr(flow_run, "deployment_id", None):  # the server's automation posts for it
        return
    host = urllib.parse.urlsplit(url).hostname or "?"
    try:
        timeout = float(os.environ.get(TIMEOUT_ENV, "10"))
        status = post_json(url, build_payload(flow, flow_run, state), timeout)
        logger.info("failure notification sent to the webhook on %s (HTTP %s)", host, status)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = exc.code if isinstance(exc, urllib.error.HTTPError) else type(exc).__name__
        logger.warning("failure notification to the webhook on %s failed (%s)", host, reason)


def _logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:
        return logging.getLogger("nst.hooks")
