//! The CLI's client commands: one gRPC call (or a few) each, then output as text or JSON.
//!
//! The daemon's status messages are already one user-facing line ([`shale_sr::error`]), so errors are passed
//! through verbatim; only transport failures get a wording of their own.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use shale_sr::proto::{self, shale_client::ShaleClient};
use shale_sr::size::format_size;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::cli::{SrCommand, VdiCommand, WriteArgs};
use crate::output;

/// Bytes per write/read request (well under the API's per-message limit).
const CHUNK: usize = 4 << 20;

/// A connected client plus how to print.
pub struct Ctx {
    client: ShaleClient<Channel>,
    socket: PathBuf,
    json: bool,
}

impl Ctx {
    /// Connect to the daemon at `socket`.
    pub async fn connect(socket: &Path, json: bool) -> Result<Ctx> {
        let client = shale_sr::client::connect(socket).await?;
        Ok(Ctx {
            client,
            socket: socket.to_path_buf(),
            json,
        })
    }

    /// The gRPC client, for command modules kept outside this file (e.g. [`crate::nbd`]).
    pub(crate) fn client(&mut self) -> &mut ShaleClient<Channel> {
        &mut self.client
    }

    /// A failed call as the one-line error the CLI prints.
    pub(crate) fn status(&self, s: Status) -> anyhow::Error {
        match s.code() {
            Code::Unavailable | Code::Unknown | Code::Cancelled
                if s.message().contains("transport") =>
            {
                anyhow!(
                    "lost connection to shale daemon at {}: {}",
                    self.socket.display(),
                    s.message()
                )
            }
            _ => anyhow!("{}", s.message()),
        }
    }

    /// Print `v` as JSON with `--json`, else as `text` renders it.
    pub(crate) fn print<T: Serialize>(&self, v: &T, text: impl FnOnce(&T) -> String) -> Result<()> {
        if self.json {
            output::json(v)
        } else {
            print!("{}", text(v));
            Ok(())
        }
    }
}

/// Run `shale sr ...`. Returns the process exit code.
pub async fn sr(ctx: &mut Ctx, cmd: SrCommand) -> Result<u8> {
    match cmd {
        SrCommand::Create {
            name,
            sr_type,
            path,
            cluster_size,
            capacity,
        } => {
            let path = crate::paths::absolute(&path)
                .with_context(|| format!("invalid path {}", path.display()))?;
            let req = proto::SrCreateRequest {
                name,
                r#type: sr_type,
                path: path.display().to_string(),
                cluster_size: cluster_size.unwrap_or(0),
                capacity,
            };
            let sr = ctx
                .client
                .sr_create(req)
                .await
                .map_err(|s| ctx.status(s))?
                .into_inner();
            ctx.print(&sr, output::sr_fields)?;
        }
        SrCommand::List => {
            let srs = ctx
                .client
                .sr_list(proto::SrListRequest {})
                .await
                .map_err(|s| ctx.status(s))?
                .into_inner();
            ctx.print(&srs.srs, |s| output::sr_table(s))?;
        }
        SrCommand::Show { sr } => match sr {
            Some(sr) => {
                let sr = ctx
                    .client
                    .sr_show(proto::SrRef { sr })
                    .await
                    .map_err(|s| ctx.status(s))?
                    .into_inner();
                ctx.print(&sr, output::sr_fields)?;
            }
            None => {
                let srs = ctx
                    .client
                    .sr_list(proto::SrListRequest {})
                    .await
                    .map_err(|s| ctx.status(s))?
                    .into_inner();
                ctx.print(&srs.srs, |list| {
                    list.iter()
                        .map(output::sr_fields)
                        .collect::<Vec<_>>()
                        .join("\n")
                })?;
            }
        },
        SrCommand::Destroy { sr, force } => {
            let r = ctx
                .client
                .sr_destroy(proto::SrDestroyRequest { sr, force })
                .await
                .map_err(|s| ctx.status(s))?
                .into_inner();
            ctx.print(&r, |r| format!("destroyed SR '{}' ({})\n", r.name, r.uuid))?;
        }
        SrCommand::Detach { sr } => {
            let sr = ctx
                .client
                .sr_detach(proto::SrRef { sr })
                .await
                .map_err(|s| ctx.status(s))?
                .into_inner();
            ctx.print(&sr, |s| format!("detached SR '{}' ({})\n", s.name, s.uuid))?;
        }
        SrCommand::Attach { sr } => {
            let sr = ctx
                .client
                .sr_attach(proto::SrRef { sr })
                .await
                .map_err(|s| ctx.status(s))?
                .into_inner();
            ctx.print(&sr, output::sr_fields)?;
        }
        SrCommand::Check { sr } => {
            let names = match sr {
                Some(sr) => vec![sr],
                None => {
                    let list = ctx
                        .client
                        .sr_list(proto::SrListRequest {})
                        .await
                        .map_err(|s| ctx.status(s))?;
                    // Detached or unavailable SRs have nothing open to check; say so instead of failing.
                    let (up, down): (Vec<_>, Vec<_>) =
                        list.into_inner().srs.into_iter().partition(|s| {
                            s.status == "attached" || s.status.starts_with("degraded")
                        });
                    for s in down {
                        eprintln!("SR '{}' not checked: {}", s.name, s.status);
                    }
                    up.into_iter().map(|s| s.uuid).collect()
                }
            };
            let mut reports = Vec::new();
            for sr in names {
                reports.push(
                    ctx.client
                        .sr_check(proto::SrRef { sr })
                        .await
                        .map_err(|s| ctx.status(s))?
                        .into_inner(),
                );
            }
            let all_ok = reports.iter().all(|r| r.ok);
            ctx.print(&reports, |reports| {
                let mut out = String::new();
                for r in reports {
                    if r.ok {
                        out.push_str(&format!(
                            "SR '{}': OK ({} objects, {} mapped clusters ({} partial), {} free clusters)\n",
                            r.sr, r.objects, r.mapped_clusters, r.partial_entries, r.free_clusters
                        ));
                    } else {
                        out.push_str(&format!("SR '{}': {} problem(s)\n", r.sr, r.problems.len()));
                        for p in &r.problems {
                            out.push_str(&format!("  {p}\n"));
                        }
                    }
                }
                out
            })?;
            if !all_ok {
                return Ok(1);
            }
        }
        SrCommand::Gc { sr } => {
            let r = ctx
                .client
                .sr_gc(proto::SrRef { sr })
                .await
                .map_err(|s| ctx.status(s))?
                .into_inner();
            ctx.print(&r, |r| {
                format!(
                    "SR '{}': reclaimed {}\n",
                    r.sr,
                    format_size(r.reclaimed_bytes)
                )
            })?;
        }
    }
    Ok(0)
}

/// Run `shale vdi ...`. Returns the process exit code.
pub async fn vdi(ctx: &mut Ctx, cmd: VdiCommand) -> Result<u8> {
    match cmd {
        VdiCommand::Create { sr, name, size } => {
            let req = proto::VdiCreateRequest {
                sr: sr.unwrap_or_default(),
                name,
                size,
            };
            let v = ctx
                .client
                .vdi_create(req)
                .await
                .map_err(|s| ctx.status(s))?
                .into_inner();
            ctx.print(&v, output::vdi_fields)?;
        }
        VdiCommand::List { sr, all } => {
            let req = proto::VdiListRequest {
                sr: sr.unwrap_or_default(),
                all,
            };
            let r = ctx
                .client
                .vdi_list(req)
                .await
                .map_err(|s| ctx.status(s))?
                .into_inner();
            ctx.print(&r.vdis, |v| output::vdi_table(v))?;
        }
        VdiCommand::Show { vdi } => {
            let v = ctx
                .client
                .vdi_show(proto::VdiRef { vdi })
                .await
                .map_err(|s| ctx.status(s))?
                .into_inner();
            ctx.print(&v, output::vdi_fields)?;
        }
        VdiCommand::Resize {
            vdi,
            size,
            allow_shrink,
        } => {
            let req = proto::VdiResizeRequest {
                vdi,
                size,
                allow_shrink,
            };
            let v = ctx
                .client
                .vdi_resize(req)
                .await
                .map_err(|s| ctx.status(s))?
                .into_inner();
            ctx.print(&v, output::vdi_fields)?;
        }
        VdiCommand::Snapshot { vdi, name } => {
            let req = proto::VdiSnapshotRequest { vdi, name };
            let v = ctx
                .client
                .vdi_snapshot(req)
                .await
                .map_err(|s| ctx.status(s))?
                .into_inner();
            ctx.print(&v, output::vdi_fields)?;
        }
        VdiCommand::Clone { snapshot, name } => {
            let req = proto::VdiCloneRequest { snapshot, name };
            let v = ctx
                .client
                .vdi_clone(req)
                .await
                .map_err(|s| ctx.status(s))?
                .into_inner();
            ctx.print(&v, output::vdi_fields)?;
        }
        VdiCommand::Revert { vdi, snapshot } => {
            let req = proto::VdiRevertRequest { vdi, snapshot };
            let v = ctx
                .client
                .vdi_revert(req)
                .await
                .map_err(|s| ctx.status(s))?
                .into_inner();
            ctx.print(&v, output::vdi_fields)?;
        }
        VdiCommand::Destroy { vdi } => {
            let r = ctx
                .client
                .vdi_destroy(proto::VdiRef { vdi })
                .await
                .map_err(|s| ctx.status(s))?
                .into_inner();
            ctx.print(&r, |r| {
                if r.hidden {
                    format!(
                        "snapshot '{}' ({}) has clones: hidden until they are destroyed\n",
                        r.name, r.uuid
                    )
                } else {
                    format!("destroyed '{}' ({})\n", r.name, r.uuid)
                }
            })?;
        }
        VdiCommand::Digest { vdi } => {
            let r = ctx
                .client
                .vdi_digest(proto::VdiRef { vdi })
                .await
                .map_err(|s| ctx.status(s))?
                .into_inner();
            ctx.print(&r, |r| format!("{}  {}\n", r.digest, r.name))?;
        }
        VdiCommand::Diff { vdi, from } => {
            let r = ctx
                .client
                .vdi_diff(proto::VdiDiffRequest { vdi, from })
                .await
                .map_err(|s| ctx.status(s))?
                .into_inner();
            ctx.print(&r, output::diff)?;
        }
        VdiCommand::Write(args) => write(ctx, args).await?,
        VdiCommand::Export { vdi } => crate::nbd::vdi_export(ctx, vdi).await?,
        VdiCommand::Read {
            vdi,
            offset,
            length,
            out,
        } => read(ctx, vdi, offset, length, out).await?,
    }
    Ok(0)
}

/// JSON result of `vdi write`.
#[derive(Serialize)]
struct WriteResult {
    vdi: String,
    offset: u64,
    written: u64,
}

async fn write(ctx: &mut Ctx, a: WriteArgs) -> Result<()> {
    let data: Vec<u8> = match (&a.file, a.pattern) {
        (Some(f), _) => {
            let file =
                std::fs::File::open(f).with_context(|| format!("cannot read {}", f.display()))?;
            let mut data = Vec::new();
            match a.length {
                Some(n) => file.take(n).read_to_end(&mut data),
                None => { file }.read_to_end(&mut data),
            }
            .with_context(|| format!("cannot read {}", f.display()))?;
            data
        }
        (None, Some(b)) => {
            let n = a.length.unwrap_or(0);
            let n = usize::try_from(n).map_err(|_| anyhow!("--length {n} is too large"))?;
            vec![b; n]
        }
        (None, None) => bail!("pass --file or --pattern"),
    };
    let total = data.len() as u64;
    if total == 0 {
        bail!("nothing to write (empty input)");
    }
    let mut off = a.offset;
    let chunks: Vec<&[u8]> = data.chunks(CHUNK).collect();
    let last = chunks.len() - 1;
    for (i, chunk) in chunks.into_iter().enumerate() {
        let req = proto::VdiWriteRequest {
            vdi: a.vdi.clone(),
            offset: off,
            data: chunk.to_vec(),
            flush: i == last,
        };
        ctx.client.vdi_write(req).await.map_err(|s| ctx.status(s))?;
        off += chunk.len() as u64;
    }
    let r = WriteResult {
        vdi: a.vdi,
        offset: a.offset,
        written: total,
    };
    ctx.print(&r, |r| {
        format!(
            "wrote {} bytes at offset {} of '{}'\n",
            r.written, r.offset, r.vdi
        )
    })
}

/// JSON result of `vdi read`.
#[derive(Serialize)]
struct ReadResult {
    vdi: String,
    offset: u64,
    length: u64,
    blake3: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    out: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    hex: Option<String>,
}

async fn read(
    ctx: &mut Ctx,
    vdi: String,
    offset: u64,
    length: u64,
    out: Option<PathBuf>,
) -> Result<()> {
    let mut data = Vec::new();
    let mut pos = offset;
    let end = offset
        .checked_add(length)
        .ok_or_else(|| anyhow!("--offset + --length overflows"))?;
    while pos < end {
        let n = (end - pos).min(CHUNK as u64);
        let req = proto::VdiReadRequest {
            vdi: vdi.clone(),
            offset: pos,
            length: n,
        };
        let r = ctx
            .client
            .vdi_read(req)
            .await
            .map_err(|s| ctx.status(s))?
            .into_inner();
        data.extend_from_slice(&r.data);
        pos += n;
    }
    if let Some(path) = &out {
        std::fs::write(path, &data).with_context(|| format!("cannot write {}", path.display()))?;
    }
    if ctx.json {
        let hex = out
            .is_none()
            .then(|| data.iter().map(|b| format!("{b:02x}")).collect());
        return output::json(&ReadResult {
            vdi,
            offset,
            length,
            blake3: blake3_hex(&data),
            out: out.map(|p| p.display().to_string()),
            hex,
        });
    }
    if out.is_none() {
        let mut stdout = std::io::stdout().lock();
        stdout.write_all(&data)?;
        stdout.flush()?;
    }
    Ok(())
}

fn blake3_hex(data: &[u8]) -> String {
    blake3::hash(data).to_hex().to_string()
}
