"""``nst serve``: the deployments of ``stylize_manifest``, through Prefect's own deployment API.

Two deployments, declared here and, identically, in ``infra/prefect.yaml``
(``tests/e2e/test_stack.py`` checks that the two agree):

``stylize_manifest/adhoc``
    for runs started by hand: the UI's custom-run form, ``prefect deployment
    run 'stylize_manifest/adhoc' --param ...`` or the REST API.
``stylize_manifest/scheduled``
    a cron schedule (default ``0 2 * * *`` UTC) whose parameters carry the
    manifest and output URIs.

Both refuse local paths (``allow_local_paths=False``: s3:// only) and have
``enforce_parameter_schema`` on, so the Prefect server refuses a run with
invalid parameters before it starts, naming the field.

Modes:

* ``nst serve`` (default): ``prefect.serve(...)`` - this process registers the
  deployments and runs their flow runs itself (one machine, no work pool).
* ``nst serve --work-pool POOL``: ``prefect.deploy(...)`` - register them on a
  work pool (``process``, Kubernetes, ...) and exit; the pool's workers run them.
* ``--dry-run``: print the deployments as JSON; contact no server.

The scheduled deployment's URIs come from ``--schedule-manifest`` /
``--schedule-output`` or ``NST_SCHEDULE_MANIFEST`` / ``NST_SCHEDULE_OUTPUT``
(the same variables ``infra/prefect.yaml`` reads); ``--no-schedule`` leaves it out.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FLOW_NAME = "stylize_manifest"
ENTRYPOINT = "flows/stylize_manifest.py:stylize_manifest"
ADHOC, SCHEDULED = "adhoc", "scheduled"
DEFAULT_CRON = "0 2 * * *"
DEFAULT_TIMEZONE = "UTC"
TAGS = ("nst",)
BASE_PARAMETERS: dict[str, Any] = {"allow_local_paths": False}

ADHOC_DESCRIPTION = (
    "Stylise a manifest on demand: fill the custom-run form (every parameter is described there), "
    "or `prefect deployment run 'stylize_manifest/adhoc' --param manifest_uri=s3://... --param output_uri=s3://...`. "
    "s3:// URIs only."
)
SCHEDULED_DESCRIPTION = (
    "Stylise a fixed manifest on a cron schedule; the manifest and output URIs are the schedule's parameters. "
    "A failed run is posted to $NST_FAILURE_WEBHOOK when set. s3:// URIs only."
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
    """The deployments, checked: the scheduled one needs s3:// manifest and output URIs."""
    from nst_cli.common import UsageError

    specs = [DeploymentSpec(ADHOC, ADHOC_DESCRIPTION, (*TAGS, ADHOC), dict(BASE_PARAMETERS))]
    if not scheduled:
        return specs
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
        )
    )
    return specs


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
            )
        )
    return out


def _run_command(spec: DeploymentSpec) -> str:
    return (
        f"prefect deployment run '{FLOW_NAME}/{spec.name}' --param manifest_uri=s3://BUCKET/manifest.csv "
        f"--param output_uri=s3://BUCKET/outputs"
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from nst_cli.common import EXIT_OK

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
    for name, value in (("PREFECT_SERVER_ANALYTICS_ENABLED", "false"), ("DO_NOT_TRACK", "1")):
        os.environ.setdefault(name, value)
    if args.work_pool:
        from prefect import deploy

        deployments = runner_deployments(specs, from_source=True)
        ids = deploy(*deployments, work_pool_name=args.work_pool, print_next_steps_message=False, ignore_warnings=True)
        for spec, dep_id in zip(specs, ids, strict=False):
            when = f"cron '{spec.cron}' ({spec.timezone})" if spec.cron else "on demand"
            print(f"deployment {FLOW_NAME}/{spec.name} ({dep_id}) on work pool {args.work_pool}: {when}")
        print(f"start a run: {_run_command(specs[0])}")
        return EXIT_OK
    from prefect import serve

    deployments = runner_deployments(specs, from_source=False)
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
    p.set_defaults(func=cmd_serve)
    return p
