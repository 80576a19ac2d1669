"""``nst serve``: the deployments of ``stylize_manifest``, through Prefect's own deployment API.

Two deployments, declared here once. ``prefect.yaml`` at the repository root (what
``prefect deploy`` reads) is generated from this declaration (``nst serve --prefect-yaml >
prefect.yaml``, or ``make prefect.yaml``); ``tests/integration/test_operations.py`` checks that the committed
file is the generated one and that both paths store the same deployments on a real server:

``stylize_manifest/adhoc``
    for runs started by hand: the UI's custom-run form, ``prefect deployment
    run 'stylize_manifest/adhoc' --param ...`` or the REST API.
``stylize_manifest/scheduled``
    a cron schedule (default ``0 2 * * *`` UTC) whose parameters carry the
    manifest and output URIs.

Both refuse local paths (``allow_local_paths=False``: s3:// only) and have
``enforce_parameter_schema`` on, so the Prefect server refuses a run with
invalid parameters before it starts, naming the field. The scheduled one has a
deployment concurrency limit of 1 with collision strategy ``CANCEL_NEW``: while
a slow nightly run is still going, the next one is cancelled (visible as such in
the UI) instead of running beside it; items are content-addressed, so the night
after picks up whatever was missed.

Why Python is the source and the yaml the copy: ``nst serve`` must work from an
installed wheel, where no repository root (and no ``prefect.yaml``) exists.

Server-side alerts (``nst_cli/alerts.py``): with ``--failure-webhook URL`` (or
``NST_FAILURE_WEBHOOK``), ``nst serve`` also creates the failure and deadline
automations; ``nst serve --alerts-only`` creates only them (after ``prefect deploy``).

Modes:

* ``nst serve`` (default): ``prefect.serve(...)`` - this process registers the
  deployments and runs their flow runs itself (one machine, no work pool).
* ``nst serve --work-pool POOL``: ``prefect.deploy(...)`` - register them on a
  work pool (``process``, Kubernetes, ...) and exit; the pool's workers run them.
* ``--dry-run``: print the deployments as JSON; contact no server.
* ``--prefect-yaml``: print the repository's ``prefect.yaml``; contact no server.
* ``--alerts-only``: create the alerts for deployments already on the server.

The scheduled deployment's URIs come from ``--schedule-manifest`` /
``--schedule-output`` or ``NST_SCHEDULE_MANIFEST`` / ``NST_SCHEDULE_OUTPUT``
(the same variables ``prefect.yaml`` reads); ``--no-schedule`` leaves it out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nst_cli.alerts import DEFAULT_DEADLINE_HOURS  # a module without Prefect imports at its top

FLOW_NAME = "stylize_manifest"
ENTRYPOINT = "flows/stylize_manifest.py:stylize_manifest"
ADHOC, SCHEDULED = "adhoc", "scheduled"
DEFAULT_CRON = "0 2 * * *"
DEFAULT_TIMEZONE = "UTC"
TAGS = ("nst",)
BASE_PARAMETERS: dict[str, Any] = {"allow_local_paths": False}
# The scheduled deployment: one run at a time; a run due while one is going is cancelled (see above).
SCHEDULED_CONCURRENCY_LIMIT = 1
SCHEDULED_COLLISION_STRATEGY = "CANCEL_NEW"
WORK_POOL = "nst-local"  # prefect.yaml's pool: the local stack's process pool (`prefect deploy --pool nst-gpu` overrides it)
# prefect.yaml's placeholders, filled by Prefect's {{ $VAR }} templating when deploying.
YAML_PLACEHOLDERS = {"manifest_uri": "{{ $NST_SCHEDULE_MANIFEST }}", "output_uri": "{{ $NST_SCHEDULE_OUTPUT }}"}

ADHOC_DESCRIPTION = (
    "Stylise a manifest on demand: fill the custom-run form (every parameter is described there), "
    "or `prefect deployment run 'stylize_manifest/adhoc' --param manifest_uri=s3://... --param output_uri=s3://...`. "
    "s3:// URIs only."
)
SCHEDULED_DESCRIPTION = (
    "Stylise a fixed manifest on a cron schedule; the manifest and output URIs are the schedule's parameters. "
    "One run at a time: a run due while the last one still goes is cancelled. Failed and overdue runs are posted to "
    "the nst-failure-webhook block's URL once `nst serve --alerts-only` has created the automations. s3:// URIs only."
)


@dataclass(frozen=True)
class DeploymentSpec:
    """One deployment of the flow, independent of Prefect's classes (comparable with prefect.yaml)."""

    name: str
    description: str
    tags: tuple[str, ...]
    parameters: dict[str, Any]
    cron: str | None = None
    timezone: str | None = None
    schedule_parameters: dict[str, Any] = field(default_factory=dict)
    schedule_active: bool = True
    enforce_parameter_schema: bool = True
    concurrency_limit: int | None = None
    collision_strategy: str | None = None

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["tags"] = list(self.tags)
        data["full_name"] = f"{FLOW_NAME}/{self.name}"
        return data


def deployment_specs(
    schedule_manifest: str | None,
    schedule_output: str | None,
    *,
    cron: str = DEFAULT_CRON,
    timezone: str = DEFAULT_TIMEZONE,
    scheduled: bool = True,
    schedule_active: bool = True,
) -> list[DeploymentSpec]:
    """The deployments, checked: the scheduled one needs s3:// manifest and output URIs.

    Raises:
        UsageError: a URI missing or not s3://, an invalid cron or time zone.
    """
    from nst_cli.common import UsageError

    if not scheduled:
        return declared_deployments(None, None, cron=cron, timezone=timezone, schedule_active=schedule_active)
    missing = [flag for flag, value in (("--schedule-manifest", schedule_manifest), ("--schedule-output", schedule_output)) if not value]
    if missing:
        raise UsageError(
            f"the scheduled deployment needs {' and '.join(missing)} (or NST_SCHEDULE_MANIFEST / NST_SCHEDULE_OUTPUT); "
            "--no-schedule leaves it out"
        )
    assert schedule_manifest and schedule_output
    for flag, value in (("--schedule-manifest", schedule_manifest), ("--schedule-output", schedule_output)):
        if not value.lower().startswith("s3://") or len(value) <= len("s3://"):
            raise UsageError(f"{flag} {value!r}: deployments take s3:// URIs only (allow_local_paths is off)")
    _check_cron(cron, timezone)
    return declared_deployments(schedule_manifest, schedule_output, cron=cron, timezone=timezone, schedule_active=schedule_active)


def declared_deployments(
    schedule_manifest: str | None,
    schedule_output: str | None,
    *,
    cron: str = DEFAULT_CRON,
    timezone: str = DEFAULT_TIMEZONE,
    schedule_active: bool = True,
) -> list[DeploymentSpec]:
    """The one declaration of the deployments (unchecked; ``None`` URIs leave the scheduled one out)."""
    specs = [DeploymentSpec(ADHOC, ADHOC_DESCRIPTION, (*TAGS, ADHOC), dict(BASE_PARAMETERS))]
    if schedule_manifest is None or schedule_output is None:
        return specs
    uris = {"manifest_uri": schedule_manifest, "output_uri": schedule_output}
    specs.append(
        DeploymentSpec(
            SCHEDULED,
            SCHEDULED_DESCRIPTION,
            (*TAGS, SCHEDULED),
            {**BASE_PARAMETERS, **uris},  # also on the deployment: a manual re-run of the nightly job needs no typing
            cron=cron,
            timezone=timezone,
            schedule_parameters=uris,
            schedule_active=schedule_active,
            concurrency_limit=SCHEDULED_CONCURRENCY_LIMIT,
            collision_strategy=SCHEDULED_COLLISION_STRATEGY,
        )
    )
    return specs


PREFECT_YAML_HEADER = """\
# GENERATED from nst_cli/serve.py (the one declaration of the deployments): edit that file, then
#   nst serve --prefect-yaml > prefect.yaml        (or: make prefect.yaml)
# tests/integration/test_operations.py fails when this file and the declaration differ.
#
# Apply from the repository root (entrypoints are relative to it):
#   NST_CODE_DIR=$PWD NST_SCHEDULE_MANIFEST=s3://BUCKET/manifests/nightly.csv NST_SCHEDULE_OUTPUT=s3://BUCKET/outputs/nightly \\
#     prefect --no-prompt deploy --all [--pool nst-gpu]
# then the server-side failure and deadline alerts (a webhook held in a Prefect Webhook block):
#   NST_FAILURE_WEBHOOK=https://hooks.example.com/... nst serve --alerts-only
# `make up` does both against the local stack.
#
# Variables (read when deploying, by Prefect's {{ $VAR }} templating):
#   NST_CODE_DIR           where workers find the code: the repo root locally, /opt/nst in the GPU image
#   NST_SCHEDULE_MANIFEST  the scheduled deployment's manifest (s3:// only)
#   NST_SCHEDULE_OUTPUT    the scheduled deployment's output prefix (s3:// only)
#
# Both deployments refuse local paths (allow_local_paths: false) and enforce the parameter schema.
# The scheduled one runs one at a time: a run due while the last is still going is cancelled.
"""


def prefect_yaml_document(specs: list[DeploymentSpec]) -> dict[str, Any]:
    """``specs`` as a ``prefect.yaml`` document (``prefect deploy --all`` creates them)."""
    from prefect import __version__ as prefect_version

    deployments = []
    for spec in specs:
        entry: dict[str, Any] = {
            "name": spec.name,
            "description": spec.description,
            "entrypoint": ENTRYPOINT,
            "tags": list(spec.tags),
            "parameters": dict(spec.parameters),
            "enforce_parameter_schema": spec.enforce_parameter_schema,
            "work_pool": {"name": WORK_POOL, "work_queue_name": "default"},
            "schedules": [],
        }
        if spec.cron:
            entry["schedules"] = [{"cron": spec.cron, "timezone": spec.timezone, "active": spec.schedule_active,
                                   "parameters": dict(spec.schedule_parameters)}]  # fmt: skip
        if spec.concurrency_limit is not None:
            entry["concurrency_limit"] = {"limit": spec.concurrency_limit, "collision_strategy": spec.collision_strategy}
        deployments.append(entry)
    return {
        "name": "nst-bulk",
        "prefect-version": prefect_version,
        "build": None,
        "push": None,
        "pull": [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $NST_CODE_DIR }}"}}],
        "deployments": deployments,
    }


def render_prefect_yaml() -> str:
    """The text of the repository's ``prefect.yaml``, from :func:`declared_deployments`."""
    import yaml

    specs = declared_deployments(YAML_PLACEHOLDERS["manifest_uri"], YAML_PLACEHOLDERS["output_uri"])
    body = yaml.safe_dump(prefect_yaml_document(specs), sort_keys=False, width=120, allow_unicode=True)
    return PREFECT_YAML_HEADER + "\n" + body


def _check_cron(cron: str, timezone: str) -> None:
    from nst_cli.common import UsageError

    try:
        from prefect.client.schemas.schedules import CronSchedule

        CronSchedule(cron=cron, timezone=timezone)
    except Exception as exc:  # pydantic ValidationError: an invalid cron or time zone
        errors = getattr(exc, "errors", None)
        reason = errors()[0]["msg"].removeprefix("Value error, ") if callable(errors) else str(exc).splitlines()[0]
        raise UsageError(f"--cron {cron!r} / --timezone {timezone!r}: {reason}") from None


def flow_source_root() -> Path:
    """The folder the entrypoint ``flows/stylize_manifest.py`` is relative to (repo root, or site-packages)."""
    import flows

    return Path(flows.__file__).resolve().parents[1]


def runner_deployments(specs: list[DeploymentSpec], *, from_source: bool) -> list[Any]:
    """``RunnerDeployment`` objects (``flow.to_deployment``) for ``specs``.

    ``from_source``: load the flow with ``flow.from_source(<source root>, ENTRYPOINT)``, so a
    work pool's workers get a pull step that sets their working directory to that folder.
    """
    from prefect.schedules import Cron

    from flows.stylize_manifest import stylize_manifest

    flow = stylize_manifest
    if from_source:
        flow = stylize_manifest.from_source(source=str(flow_source_root()), entrypoint=ENTRYPOINT)
    out = []
    for spec in specs:
        schedules = None
        if spec.cron:
            schedules = [Cron(spec.cron, timezone=spec.timezone, active=spec.schedule_active, parameters=dict(spec.schedule_parameters))]
        out.append(
            flow.to_deployment(
                name=spec.name,
                description=spec.description,
                tags=list(spec.tags),
                parameters=dict(spec.parameters),
                schedules=schedules,
                enforce_parameter_schema=spec.enforce_parameter_schema,
                concurrency_limit=_concurrency(spec),
            )
        )
    return out


def _concurrency(spec: DeploymentSpec) -> Any:
    if spec.concurrency_limit is None:
        return None
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    return ConcurrencyLimitConfig(limit=spec.concurrency_limit, collision_strategy=ConcurrencyLimitStrategy(spec.collision_strategy))


def _run_command(spec: DeploymentSpec) -> str:
    return (
        f"prefect deployment run '{FLOW_NAME}/{spec.name}' --param manifest_uri=s3://BUCKET/manifest.csv "
        f"--param output_uri=s3://BUCKET/outputs"
    )


def _alerts(args: argparse.Namespace, scheduled_id: Any) -> None:
    """Create the server-side alerts when a webhook is given (``nst_cli/alerts.py``)."""
    from nst_cli.alerts import OVERDUE_AUTOMATION, WEBHOOK_BLOCK, ensure_alerts
    from nst_cli.common import UsageError

    if not args.failure_webhook:
        if args.alerts_only:
            raise UsageError("--alerts-only needs --failure-webhook URL (or NST_FAILURE_WEBHOOK)")
        return
    try:
        created = ensure_alerts(args.failure_webhook, scheduled_deployment_id=scheduled_id, deadline_s=args.run_deadline * 3600)
    except ValueError as exc:
        raise UsageError(f"--failure-webhook / --run-deadline: {exc}") from None
    for name in created:
        if name != WEBHOOK_BLOCK:
            print(f"automation {name!r}: POSTs to the webhook held in the Prefect Webhook block {WEBHOOK_BLOCK!r}")
    if scheduled_id is None:
        print(f"(no scheduled deployment: {OVERDUE_AUTOMATION!r} left out)")


def _scheduled_deployment_id() -> Any:
    """The id of ``stylize_manifest/scheduled`` on the current server, or None."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return client.read_deployment_by_name(f"{FLOW_NAME}/{SCHEDULED}").id
        except ObjectNotFound:
            return None


def cmd_serve(args: argparse.Namespace) -> int:
    from nst_cli.common import EXIT_OK

    if args.prefect_yaml:
        sys.stdout.write(render_prefect_yaml())
        return EXIT_OK
    for name, value in (("PREFECT_SERVER_ANALYTICS_ENABLED", "false"), ("DO_NOT_TRACK", "1")):
        os.environ.setdefault(name, value)
    if args.alerts_only:
        _alerts(args, _scheduled_deployment_id())
        return EXIT_OK
    specs = deployment_specs(
        args.schedule_manifest,
        args.schedule_output,
        cron=args.cron,
        timezone=args.timezone,
        scheduled=not args.no_schedule,
        schedule_active=not args.paused,
    )
    if args.dry_run:
        print(json.dumps([s.as_dict() for s in specs], indent=2))
        return EXIT_OK
    if args.work_pool:
        from prefect import deploy

        deployments = runner_deployments(specs, from_source=True)
        ids = deploy(*deployments, work_pool_name=args.work_pool, print_next_steps_message=False, ignore_warnings=True)
        for spec, dep_id in zip(specs, ids, strict=False):
            when = f"cron '{spec.cron}' ({spec.timezone})" if spec.cron else "on demand"
            print(f"deployment {FLOW_NAME}/{spec.name} ({dep_id}) on work pool {args.work_pool}: {when}")
        _alerts(args, _scheduled_deployment_id() if any(s.name == SCHEDULED for s in specs) else None)
        print(f"start a run: {_run_command(specs[0])}")
        return EXIT_OK
    from prefect import serve

    deployments = runner_deployments(specs, from_source=False)
    if args.failure_webhook:
        for deployment in deployments:  # registered first, so that the alerts can name the scheduled one
            deployment.apply()
        _alerts(args, _scheduled_deployment_id() if any(s.name == SCHEDULED for s in specs) else None)
    print(f"serving {', '.join(f'{FLOW_NAME}/{s.name}' for s in specs)} from this process (Ctrl-C stops)")
    serve(*deployments, limit=args.limit, print_starting_message=True)
    return EXIT_OK


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``nst serve`` to the ``nst`` command's subparsers."""
    p = subparsers.add_parser(
        "serve",
        help="create the stylize_manifest deployments (adhoc + scheduled) and serve them, or register them on a work pool",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("--work-pool", "-p", metavar="POOL", help="register the deployments on this work pool and exit (its workers run them)")
    p.add_argument("--schedule-manifest", default=os.environ.get("NST_SCHEDULE_MANIFEST"), metavar="S3_URI",
                   help="manifest of the scheduled deployment (default: $NST_SCHEDULE_MANIFEST)")  # fmt: skip
    p.add_argument("--schedule-output", default=os.environ.get("NST_SCHEDULE_OUTPUT"), metavar="S3_URI",
                   help="output prefix of the scheduled deployment (default: $NST_SCHEDULE_OUTPUT)")  # fmt: skip
    p.add_argument("--cron", default=os.environ.get("NST_SCHEDULE_CRON") or DEFAULT_CRON, help=f"its cron (default: $NST_SCHEDULE_CRON or '{DEFAULT_CRON}')")
    p.add_argument("--timezone", default=os.environ.get("NST_SCHEDULE_TIMEZONE") or DEFAULT_TIMEZONE, help="the cron's time zone (default: UTC)")
    p.add_argument("--paused", action="store_true", help="create the schedule inactive")
    p.add_argument("--no-schedule", action="store_true", help="only the adhoc deployment")
    p.add_argument("--limit", type=int, default=None, help="serve mode: at most this many runs at once")
    p.add_argument("--dry-run", action="store_true", help="print the deployments as JSON and exit")
    p.add_argument("--prefect-yaml", action="store_true", help="print the repository's prefect.yaml (generated from this declaration) and exit")
    p.add_argument("--failure-webhook", default=os.environ.get("NST_FAILURE_WEBHOOK"), metavar="URL",
                   help="also create the server-side alerts (failed/crashed runs, overdue scheduled runs) posting here; "
                        "the URL is kept in the Prefect Webhook block nst-failure-webhook (default: $NST_FAILURE_WEBHOOK)")  # fmt: skip
    p.add_argument("--run-deadline", type=float, metavar="HOURS", default=float(os.environ.get("NST_RUN_DEADLINE_HOURS") or DEFAULT_DEADLINE_HOURS),
                   help=f"alert when a scheduled run has not finished this long after it went Pending or Late (default: $NST_RUN_DEADLINE_HOURS or {DEFAULT_DEADLINE_HOURS:g})")  # fmt: skip
    p.add_argument("--alerts-only", action="store_true", help="only create the alerts, for deployments applied with `prefect deploy`")
    p.set_defaults(func=cmd_serve)
    return p
