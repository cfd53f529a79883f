"""The `cxrnode` command line."""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated

import typer

from cxrnode.cli.accounts import token_app, user_app
from cxrnode.cli.common import load_settings
from cxrnode.cli.demo import demo_command
from cxrnode.cli.label import eval_command, label_command
from cxrnode.cli.model import model_app
from cxrnode.cli.monitor import monitor_command
from cxrnode.cli.notify import notify_app
from cxrnode.cli.resend import resend_command
from cxrnode.settings import example_toml, parse_destination

app = typer.Typer(
    help="cxrnode: a DICOM node that drafts chest radiograph reports with CXR-LLaVA.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
config_app = typer.Typer(help="Settings.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(config_app, name="config")
app.add_typer(model_app, name="model")
app.add_typer(user_app, name="user")
app.add_typer(token_app, name="token")
app.add_typer(notify_app, name="notify")
app.command("label")(label_command)
app.command("eval")(eval_command)
app.command("resend")(resend_command)
app.command("monitor")(monitor_command)
app.command("demo")(demo_command)


_settings = load_settings


@app.command()
def serve(
    workers: Annotated[
        bool, typer.Option("--workers/--no-workers", help="Also start Celery workers here.")
    ] = True,
) -> None:
    """Run the node: DICOM listener, scheduler and (by default) the workers."""
    from cxrnode.logs import setup_logging
    from cxrnode.node import Supervisor

    settings = _settings()
    setup_logging(settings.log_level)
    Supervisor(settings, workers=workers).run()


@app.command()
def echo(
    destination: Annotated[str, typer.Argument(help="AET@host:port of the peer.")],
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the peer.")] = 10.0,
) -> None:
    """Send a C-ECHO (DICOM ping) to a peer and report its answer."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    from cxrnode.net.requestor import associate

    try:
        aet, host, port = parse_destination(destination)
    except ValueError as exc:
        typer.echo(f"cxrnode echo: {exc}", err=True)
        raise typer.Exit(2) from exc
    ae = AE(ae_title=_settings().ae_title)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    assoc = associate(ae, host, port, ae_title=aet)
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "no association (peer down or unreachable)"
        typer.echo(f"C-ECHO {destination}: {why}", err=True)
        raise typer.Exit(1)
    status = assoc.send_c_echo()
    assoc.release()
    code = getattr(status, "Status", None)
    if code != 0x0000:
        typer.echo(f"C-ECHO {destination}: failed (status {code})", err=True)
        raise typer.Exit(1)
    typer.echo(f"C-ECHO {destination}: success")


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")] = False,
) -> None:
    """What the node is doing: counts by state, queues, live workers (both modes), the oldest
    open job, the last hour, disk, failures and dead letters (the dashboard's summary)."""
    from cxrnode.status import collect_status, render_status

    summary = collect_status(_settings())
    typer.echo(summary.model_dump_json(indent=2) if as_json else render_status(summary))


@app.command()
def worker(
    queues: Annotated[
        str, typer.Option(help="Comma-separated queues: prepare, infer, outputs, send.")
    ] = "prepare,infer,outputs,send",
    concurrency: Annotated[
        int | None, typer.Option(help="Threads; default: BATCH_SIZE for infer, else 4.")
    ] = None,
    gpus: Annotated[
        str | None,
        typer.Option(
            help="`all` or GPU indices (0,1): one inference process per GPU, each with its own "
            "CUDA_VISIBLE_DEVICES and its own batch."
        ),
    ] = None,
) -> None:
    """Run a Celery worker (e.g. `--queues infer --gpus all` on a GPU host)."""
    from cxrnode.jobs.broker import QUEUES

    settings = _settings()
    chosen = [q.strip() for q in queues.split(",") if q.strip()]
    unknown = sorted(set(chosen) - set(QUEUES))
    if unknown or not chosen:
        typer.echo(f"cxrnode worker: unknown queue(s) {unknown}; choose from {QUEUES}", err=True)
        raise typer.Exit(2)
    threads = concurrency or (max(settings.batch_size, 4) if "infer" in chosen else 4)
    from cxrnode.node import SUPERVISED_ENV, root_note, worker_environment

    note = root_note(settings)
    if note and not os.environ.get(SUPERVISED_ENV):
        typer.echo(f"cxrnode worker: {note}", err=True)
    from cxrnode.process import lower_priority

    # receive first: the worker (and the process exec'd next, which inherits it) runs at a
    # lower CPU priority than the DICOM listeners
    lower_priority(settings.worker_niceness)
    # exec the worker package's own entry point: cxrnode never imports worker (or torch)
    command = [sys.executable, "-m", "worker", "--queues", ",".join(chosen)]
    command += ["--concurrency", str(threads)] + (["--gpus", gpus] if gpus else [])
    os.execve(sys.executable, command, worker_environment())


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply database migrations (also done at every `serve` start)."""
    from cxrnode.db import make_engine
    from cxrnode.db.migrate import current_revision, upgrade

    settings = _settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.effective_database_url)
    upgrade(engine)
    typer.echo(f"database at revision {current_revision(engine)}")


@db_app.command("reconcile")
def db_reconcile() -> None:
    """Record again every durable instance file without a row (after a restore from backup or
    a database failover); stray files go to DATA_DIR/quarantine. `serve` does this at start."""
    from cxrnode.db import make_engine, make_sessionmaker
    from cxrnode.ingest.reconcile import reconcile_files

    settings = _settings()
    engine = make_engine(settings.effective_database_url)
    try:
        found = reconcile_files(settings, make_sessionmaker(engine))
    finally:
        engine.dispose()
    typer.echo(
        f"{len(found.recorded)} instances recorded again, {len(found.quarantined)} stray files "
        f"quarantined ({found.studies_checked} study folders had more files than rows)"
    )


@config_app.command("example")
def config_example() -> None:
    """Print a TOML file with every option, its description and its default."""
    sys.stdout.write(example_toml() + "\n")


@config_app.command("show")
def config_show() -> None:
    """Print the settings in effect (every secret masked, see SECRET_SETTINGS)."""
    from cxrnode.settings import masked

    typer.echo(json.dumps(masked(_settings()), indent=2))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
