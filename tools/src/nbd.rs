//! NBD in the CLI: `shale vdi export` (the URIs of a VDI or snapshot), `shale nbd list` (exports and live
//! connections), and how `shale serve` turns its `--nbd-*` flags into listeners.
//!
//! Export names (see [`shale_sr::export`]): `SR/NAME` always, the UUID always, and the bare `NAME` while it is
//! unique across SRs; the URIs printed use the bare name when it is unique, else `SR/NAME`.

use std::path::Path;

use anyhow::Result;
use shale_sr::export::{NbdOptions, NbdTlsFiles, NBD_SOCKET_NAME};
use shale_sr::proto;
use shale_sr::size::format_size;

use crate::cli::{NbdCommand, ServeArgs};
use crate::commands::Ctx;
use crate::output;

/// Listener options of `shale serve` from its flags.
pub fn serve_options(args: &ServeArgs, state_dir: &Path) -> NbdOptions {
    NbdOptions {
        unix: Some(
            args.nbd_socket
                .clone()
                .unwrap_or_else(|| state_dir.join(NBD_SOCKET_NAME)),
        ),
        tcp: (!args.no_nbd_tcp).then(|| args.nbd_listen.clone()),
        io_threads: args.nbd_io_threads.map(usize::from),
        tls: match (&args.nbd_tls_cert, &args.nbd_tls_key) {
            (Some(cert), Some(key)) => Some(NbdTlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: args.nbd_tls_client_ca.clone(),
            }),
            _ => None,
        },
    }
}

/// `shale vdi export VDI`: print the object's URIs (one per line; `--json` for every field).
pub async fn vdi_export(ctx: &mut Ctx, vdi: String) -> Result<()> {
    let reply = ctx
        .client()
        .vdi_export(proto::VdiRef { vdi })
        .await
        .map_err(|s| ctx.status(s))?
        .into_inner();
    ctx.print(&reply, export_text)
}

fn export_text(r: &proto::VdiExportReply) -> String {
    let mut out = String::new();
    for u in &r.uris {
        out.push_str(u);
        out.push('\n');
    }
    out
}

/// Run `shale nbd ...`. Returns the process exit code.
pub async fn nbd(ctx: &mut Ctx, cmd: NbdCommand) -> Result<u8> {
    match cmd {
        NbdCommand::List => {
            let reply = ctx
                .client()
                .nbd_list(proto::NbdListRequest {})
                .await
                .map_err(|s| ctx.status(s))?
                .into_inner();
            ctx.print(&reply, list_text)?;
        }
    }
    Ok(0)
}

fn list_text(r: &proto::NbdListReply) -> String {
    let mut out = format!("listening: {}\n\n", r.listeners.join(", "));
    let rows: Vec<Vec<String>> = r
        .exports
        .iter()
        .map(|e| {
            vec![
                e.name.clone(),
                format_size(e.size),
                if e.read_only { "ro" } else { "rw" }.to_string(),
                e.description.clone(),
            ]
        })
        .collect();
    out.push_str(&output::table(
        &["EXPORT", "SIZE", "MODE", "DESCRIPTION"],
        &rows,
    ));
    out.push('\n');
    if r.connections.is_empty() {
        out.push_str("no active connections\n");
        return out;
    }
    let rows: Vec<Vec<String>> = r
        .connections
        .iter()
        .map(|c| {
            vec![
                c.id.to_string(),
                c.peer.clone(),
                if c.export.is_empty() {
                    "(negotiating)".to_string()
                } else {
                    c.export.clone()
                },
                output::utc(c.connected_at),
                if c.tls { "tls" } else { "-" }.to_string(),
                if c.extended {
                    "extended"
                } else if c.structured {
                    "structured"
                } else {
                    "simple"
                }
                .to_string(),
                c.reads.to_string(),
                format_size(c.bytes_read),
                c.writes.to_string(),
                format_size(c.bytes_written),
                c.flushes.to_string(),
                c.errors.to_string(),
                c.in_flight.to_string(),
            ]
        })
        .collect();
    out.push_str(&output::table(
        &[
            "CONN",
            "PEER",
            "EXPORT",
            "CONNECTED",
            "TLS",
            "REPLIES",
            "READS",
            "READ",
            "WRITES",
            "WRITTEN",
            "FLUSHES",
            "ERRORS",
            "IN-FLIGHT",
        ],
        &rows,
    ));
    out
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command, VdiCommand};

    fn serve(args: &[&str]) -> Result<ServeArgs, clap::Error> {
        let mut v = vec!["shale", "serve"];
        v.extend_from_slice(args);
        match Cli::try_parse_from(v)?.command {
            Command::Serve(a) => Ok(a),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn serve_listens_on_loopback_and_state_dir_socket_by_default() {
        let a = serve(&[]).unwrap();
        let o = serve_options(&a, Path::new("/st"));
        assert_eq!(o.tcp.as_deref(), Some("127.0.0.1:10809"));
        assert_eq!(o.unix.as_deref(), Some(Path::new("/st/nbd.sock")));
    }

    #[test]
    fn serve_nbd_flags() {
        let a = serve(&["--nbd-listen", "0.0.0.0:1234", "--nbd-socket", "/x.sock"]).unwrap();
        let o = serve_options(&a, Path::new("/st"));
        assert_eq!(o.tcp.as_deref(), Some("0.0.0.0:1234"));
        assert_eq!(o.unix.as_deref(), Some(Path::new("/x.sock")));
        let o = serve_options(&serve(&["--no-nbd-tcp"]).unwrap(), Path::new("/st"));
        assert_eq!(o.tcp, None);
        assert!(serve(&["--no-nbd-tcp", "--nbd-listen", "127.0.0.1:1"]).is_err());
        assert!(o.tls.is_none());
    }

    #[test]
    fn serve_tls_flags_go_together() {
        let a = serve(&[
            "--nbd-tls-cert",
            "/c.pem",
            "--nbd-tls-key",
            "/k.pem",
            "--nbd-tls-client-ca",
            "/ca.pem",
        ])
        .unwrap();
        let t = serve_options(&a, Path::new("/st")).tls.unwrap();
        assert_eq!(
            (t.cert.as_path(), t.key.as_path(), t.client_ca.as_deref()),
            (
                Path::new("/c.pem"),
                Path::new("/k.pem"),
                Some(Path::new("/ca.pem"))
            )
        );
        assert!(serve(&["--nbd-tls-cert", "/c.pem"]).is_err());
        assert!(serve(&["--nbd-tls-key", "/k.pem"]).is_err());
        assert!(serve(&["--nbd-tls-client-ca", "/ca.pem"]).is_err());
    }

    #[test]
    fn export_and_list_parse() {
        let c = Cli::try_parse_from(["shale", "vdi", "export", "local/disk"]).unwrap();
        assert!(
            matches!(c.command, Command::Vdi(VdiCommand::Export { vdi }) if vdi == "local/disk")
        );
        let c = Cli::try_parse_from(["shale", "nbd", "list", "--json"]).unwrap();
        assert!(c.json && matches!(c.command, Command::Nbd(NbdCommand::List)));
    }

    #[test]
    fn list_text_shows_connections() {
        let r = proto::NbdListReply {
            listeners: vec!["tcp:127.0.0.1:10809".into()],
            exports: vec![proto::NbdExport {
                name: "local/a".into(),
                description: "vdi a".into(),
                size: 1 << 20,
                read_only: false,
            }],
            connections: vec![proto::NbdConnection {
                id: 3,
                peer: "127.0.0.1:5555".into(),
                export: "local/a".into(),
                reads: 7,
                tls: true,
                structured: true,
                extended: true,
                ..Default::default()
            }],
        };
        let t = list_text(&r);
        assert!(
            t.contains("local/a")
                && t.contains("127.0.0.1:5555")
                && t.contains("1 MiB")
                && t.contains("tls")
                && t.contains("REPLIES")
                && t.contains("extended"),
            "{t}"
        );
    }
}
