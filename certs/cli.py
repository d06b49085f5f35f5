"""`visionfm-server certs ...`: provision the federation's certificates from a participants file."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from certs.errors import CertificateError
from certs.provision import crl_time_left, issue, refresh_crl, renew, revoke
from certs.verify import has_errors, verify_path
from visionfm_core.errors import ConfigError

app = typer.Typer(
    help="Issue, renew, revoke and verify the federation's certificates and keys.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals may hold paths or keys
)
console = Console(soft_wrap=True)  # never wrap or cut a line: paths must stay whole


def _fail(exc: Exception) -> None:
    console.print(f"[red]error:[/red] {escape(str(exc))}")
    raise typer.Exit(2)


@app.command("issue")
def issue_cmd(
    participants: Path = typer.Argument(
        ..., help="The participants TOML file (coordinator address, hospitals).", resolve_path=True
    ),
    out: Path = typer.Option(..., "--out", "-o", help="The provisioning folder (created; keep it private).",
                           resolve_path=True),
) -> None:
    """Create the CA, the coordinator's certificate and one bundle per hospital (only what is missing).

    Run it again after adding hospitals to the participants file: existing credentials are kept.
    Hand `OUT/bundles/<hospital>/` to each hospital over a secure channel; nothing else leaves OUT.
    """
    try:
        report = issue(participants, out)
    except (ConfigError, CertificateError) as exc:
        _fail(exc)
        return
    for name in report.created:
        console.print(f"created  {name}")
    for name in report.kept:
        console.print(f"kept     {name}")
    for name in report.skipped_revoked:
        console.print(f"[yellow]skipped  {name} (revoked)[/yellow]")
    console.print(f"bundles: {out / 'bundles'}")


@app.command("renew")
def renew_cmd(
    folder: Path = typer.Argument(..., help="The provisioning folder.", resolve_path=True),
    hospital: list[str] = typer.Option([], "--hospital", "-H", help="A hospital to renew (repeatable)."),
    server: bool = typer.Option(False, "--server", help="Renew the coordinator's server certificate."),
    days: int = typer.Option(0, "--days", help="Validity in days (default: the participants file's)."),
    new_node_key: bool = typer.Option(False, "--new-node-key", help="Also replace the hospitals' node keys."),
) -> None:
    """Issue fresh certificates; hand the rewritten bundles to the hospitals. Old ones stay valid until
    they expire (revoke to cut a hospital off)."""
    if not hospital and not server:
        _fail(ConfigError("renew", "name at least one --hospital or --server"))
    try:
        renewed = renew(folder, hospital, server=server, days=days or None, new_node_key=new_node_key)
    except (ConfigError, CertificateError) as exc:
        _fail(exc)
        return
    for name in renewed:
        console.print(f"renewed  {name}")
    if server:
        console.print(
            "a running coordinator serves the new certificate to sites within seconds; restart it "
            "(`visionfm-server start`) for its loopback SuperLink to use it too"
        )


@app.command("refresh-crl")
def refresh_crl_cmd(
    folder: Path = typer.Argument(..., help="The provisioning folder.", resolve_path=True),
) -> None:
    """Re-sign the certificate revocation list with a fresh expiry (same revocations).

    A running coordinator does this itself well before the CRL expires; run it by hand when the
    coordinator was stopped for weeks or its CA key is kept offline. A running coordinator picks the
    new CRL up within seconds."""
    from certs.store import CertStore

    try:
        refresh_crl(folder, force=True)
        left = crl_time_left(CertStore(folder))
    except (ConfigError, CertificateError) as exc:
        _fail(exc)
        return
    console.print(f"CRL refreshed: valid for {left.days if left else 0} more day(s)")


@app.command("revoke")
def revoke_cmd(
    folder: Path = typer.Argument(..., help="The provisioning folder.", resolve_path=True),
    hospital: str = typer.Argument(..., help="The hospital that may no longer join."),
    reason: str = typer.Option("unspecified", "--reason", help="Recorded in the revocation register."),
) -> None:
    """Revoke a hospital: its certificates go on the CRL, its node key is refused, its bundle is deleted.

    A running coordinator picks this up within seconds: the gateway refuses the site and the
    SuperLink unregisters its node key.
    """
    try:
        record = revoke(folder, hospital, reason)
    except (ConfigError, CertificateError) as exc:
        _fail(exc)
        return
    console.print(
        f"revoked  {record.name}: {len(record.serials)} certificate(s), "
        f"{len(record.node_key_fingerprints)} node key(s)"
    )


@app.command("verify")
def verify_cmd(
    folder: Path = typer.Argument(..., help="A provisioning folder, or one hospital's bundle.", resolve_path=True),
) -> None:
    """Explain what is wrong with a certificate set (exit code 1 when anything would fail)."""
    findings = verify_path(folder)
    for finding in findings:
        colour = "red" if finding.level == "error" else "yellow"
        console.print(
            f"[{colour}]{finding.level.upper()}[/{colour}] {escape(finding.path)}: {escape(finding.message)}"
        )
    if has_errors(findings):
        raise typer.Exit(1)
    console.print(
        "[green]OK[/green]: certificates, keys and bundles are consistent"
        + (f" ({len(findings)} warning(s))" if findings else "")
    )


@app.command("operator")
def operator_cmd(
    folder: Path = typer.Argument(..., help="The provisioning folder."),
    name: str = typer.Argument(..., help="The operator (a person of the coordinator's team), e.g. 'alice'."),
    days: int = typer.Option(0, "--days", help="Validity in days (default: the participants file's)."),
    revoke_it: bool = typer.Option(False, "--revoke", help="Revoke this operator's certificates instead."),
) -> None:
    """Issue a coordinator operator's client certificate: the only kind the dashboard admits.

    Writes OUT/operators/NAME/operator.crt and .key, and operator.p12 (passphrase in operator.p12.pass)
    to import into a browser. Hospitals' certificates never open the dashboard.
    """
    from certs.operators import issue_operator, revoke_operator

    try:
        if revoke_it:
            record = revoke_operator(folder, name)
            console.print(f"revoked  operator {record.name}: {len(record.serials)} certificate(s)")
            return
        files = issue_operator(folder, name, days or None)
    except (ConfigError, CertificateError) as exc:
        _fail(exc)
        return
    console.print(f"created  operator {name}: {files.cert}, {files.key}")
    console.print(f"browser  {files.pkcs12} (passphrase in {files.pkcs12_passphrase})")
