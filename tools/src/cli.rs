//! Command-line grammar (clap derive). Parsing only: every value that has a format (sizes) is validated here, so
//! the command code receives typed values and bad input fails before the daemon is contacted.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use shale_sr::size::parse_size;

/// Shale: thin-provisioned volumes with O(1) snapshots and clones.
#[derive(Debug, Parser)]
#[command(name = "shale", version, about, propagate_version = true)]
pub struct Cli {
    /// Print machine-readable JSON instead of tables and text.
    #[arg(long, global = true)]
    pub json: bool,

    /// The daemon's Unix socket (default: STATE_DIR/shale.sock).
    #[arg(long, global = true, env = "SHALE_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the host daemon: owns this host's SRs and serves the API on a Unix socket.
    Serve(ServeArgs),
    /// Storage repositories (SRs).
    #[command(subcommand)]
    Sr(SrCommand),
    /// Virtual disks (VDIs) and their snapshots.
    #[command(subcommand)]
    Vdi(VdiCommand),
    /// The daemon's NBD server: exports and live connections.
    #[command(subcommand)]
    Nbd(NbdCommand),
    /// Virtual machines on the embedded KVM VMM (run by the daemon; `vm run` in the foreground).
    #[command(subcommand)]
    Vm(crate::vm_cmd::VmCommand),
}

/// `shale serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Where the daemon keeps its registry, lock and default SR (default: $SHALE_STATE_DIR, else /var/lib/shale
    /// when writable, else $XDG_DATA_HOME/shale or ~/.local/share/shale).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// NBD Unix socket (default: STATE_DIR/nbd.sock).
    #[arg(long, value_name = "PATH")]
    pub nbd_socket: Option<PathBuf>,

    /// NBD TCP listen address; loopback only by default, since NBD itself has no authentication (see
    /// --nbd-tls-cert and --nbd-tls-client-ca before listening beyond it).
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "127.0.0.1:10809",
        conflicts_with = "no_nbd_tcp"
    )]
    pub nbd_listen: String,

    /// Do not listen for NBD on TCP (Unix socket only).
    #[arg(long)]
    pub no_nbd_tcp: bool,

    /// I/O threads serving NBD connections, 0-64 (default: half the cores, at most 4). Each connection stays on
    /// one thread, with its own io_uring ring; 0 serves them on the daemon's shared runtime instead.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(0..=64))]
    pub nbd_io_threads: Option<u16>,

    /// Serve NBD over TLS with this PEM certificate (chain), with --nbd-tls-key: TCP clients must then start
    /// TLS (`nbds://` URIs); Unix-socket clients may. `tools/nbd-tls-certs.sh DIR` makes a test CA and
    /// certificates.
    #[arg(long, value_name = "PEM", requires = "nbd_tls_key")]
    pub nbd_tls_cert: Option<PathBuf>,

    /// The PEM private key of --nbd-tls-cert.
    #[arg(long, value_name = "PEM", requires = "nbd_tls_cert")]
    pub nbd_tls_key: Option<PathBuf>,

    /// Accept only NBD TLS clients presenting a certificate signed by a CA in this PEM file.
    #[arg(long, value_name = "PEM", requires = "nbd_tls_cert")]
    pub nbd_tls_client_ca: Option<PathBuf>,
}

/// `shale nbd ...`.
#[derive(Debug, Subcommand)]
pub enum NbdCommand {
    /// List NBD listeners, exports and active connections (peer, export, counters).
    List,
}

/// `shale sr ...`.
#[derive(Debug, Subcommand)]
pub enum SrCommand {
    /// Create an SR and attach it to this host.
    Create {
        /// Host-unique name.
        #[arg(long)]
        name: String,
        /// SR type.
        #[arg(long = "type", default_value = "thin")]
        sr_type: String,
        /// Directory for the SR (created if absent; must be empty).
        #[arg(long)]
        path: PathBuf,
        /// Allocation unit (4K..1M, power of two).
        #[arg(long, value_parser = parse_cluster_size, value_name = "SIZE")]
        cluster_size: Option<u32>,
        /// Maximum data the SR may hold (default: until the filesystem is full).
        #[arg(long, value_parser = parse_size_arg, value_name = "SIZE")]
        capacity: Option<u64>,
    },
    /// List SRs.
    List,
    /// Show SRs in detail (all when none is named).
    Show {
        /// SR name or UUID.
        sr: Option<String>,
    },
    /// Destroy an SR and its data.
    Destroy {
        /// SR name or UUID.
        sr: String,
        /// Destroy even if it still holds VDIs or snapshots.
        #[arg(long)]
        force: bool,
    },
    /// Detach an SR without destroying it (refused while any of its VDIs is exported or a VM disk). Its objects
    /// disappear until `sr attach`; a daemon restart attaches it again too.
    Detach {
        /// SR name or UUID.
        sr: String,
    },
    /// Attach a detached SR, or one that failed to attach (e.g. its filesystem was not mounted at start).
    Attach {
        /// SR name or UUID.
        sr: String,
    },
    /// Check SR metadata consistency (all SRs when none is named); exits 1 if problems are found.
    Check {
        /// SR name or UUID.
        sr: Option<String>,
    },
    /// Reclaim space of destroyed VDIs and snapshots now (it also happens in the background).
    Gc {
        /// SR name or UUID.
        sr: String,
    },
}

/// `shale vdi ...`.
#[derive(Debug, Subcommand)]
pub enum VdiCommand {
    /// Create a thin VDI (costs no space until written).
    Create {
        /// SR name or UUID (optional when the host has one SR).
        #[arg(long)]
        sr: Option<String>,
        /// Name, unique within the SR.
        #[arg(long)]
        name: String,
        /// Virtual size, e.g. 10G or 1T (a multiple of 512 bytes).
        #[arg(long, value_parser = parse_size_arg)]
        size: u64,
    },
    /// List VDIs and snapshots.
    List {
        /// Only this SR.
        #[arg(long)]
        sr: Option<String>,
        /// Include hidden snapshots (destroyed, but kept for their clones).
        #[arg(long)]
        all: bool,
    },
    /// Show a VDI or snapshot.
    Show {
        /// NAME, SR/NAME or UUID.
        vdi: String,
    },
    /// Change a VDI's virtual size (grows online; shrinking needs --allow-shrink).
    Resize {
        /// NAME, SR/NAME or UUID.
        vdi: String,
        /// New virtual size, e.g. 20G.
        #[arg(value_parser = parse_size_arg)]
        size: u64,
        /// Allow shrinking (data past the new end is lost).
        #[arg(long)]
        allow_shrink: bool,
    },
    /// Take a read-only snapshot of a VDI.
    Snapshot {
        /// NAME, SR/NAME or UUID.
        vdi: String,
        /// Snapshot name, unique within the SR.
        #[arg(long)]
        name: String,
    },
    /// Create a new VDI from a snapshot.
    Clone {
        /// The snapshot: NAME, SR/NAME or UUID.
        snapshot: String,
        /// Name of the new VDI.
        #[arg(long)]
        name: String,
    },
    /// Revert a VDI to one of its snapshots.
    Revert {
        /// NAME, SR/NAME or UUID.
        vdi: String,
        /// The snapshot (a bare name is looked up in the VDI's SR).
        snapshot: String,
    },
    /// Destroy a VDI or snapshot (a snapshot with clones stays hidden until they are gone).
    Destroy {
        /// NAME, SR/NAME or UUID.
        vdi: String,
    },
    /// blake3 digest of a VDI's or snapshot's content.
    Digest {
        /// NAME, SR/NAME or UUID.
        vdi: String,
    },
    /// List what a VDI (or a later snapshot) changed since a snapshot: changed blocks, for incremental backups
    Diff {
        /// The newer side: a VDI or snapshot (NAME, SR/NAME or UUID).
        vdi: String,
        /// The older side: a snapshot of that VDI, or the one it was cloned from or reverted to.
        #[arg(long)]
        from: String,
    },
    /// Write data into a VDI (scripted I/O through the daemon; durable when the command returns).
    Write(WriteArgs),
    /// Print the NBD URIs of a VDI or snapshot (snapshots are exported read-only).
    Export {
        /// NAME, SR/NAME or UUID.
        vdi: String,
    },
    /// Read data from a VDI or snapshot (to stdout or a file).
    Read {
        /// NAME, SR/NAME or UUID.
        vdi: String,
        /// Byte offset, e.g. 0, 4096, 1M.
        #[arg(long, value_parser = parse_size_arg, default_value = "0")]
        offset: u64,
        /// Bytes to read, e.g. 4K.
        #[arg(long, value_parser = parse_size_arg)]
        length: u64,
        /// Write the data to this file instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// `shale vdi write`.
#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("source").required(true).args(["file", "pattern"]))]
pub struct WriteArgs {
    /// NAME, SR/NAME or UUID.
    pub vdi: String,
    /// Byte offset, e.g. 0, 4096, 1M.
    #[arg(long, value_parser = parse_size_arg, default_value = "0")]
    pub offset: u64,
    /// Write this file's content.
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Write this byte value repeatedly (decimal or 0xNN); needs --length.
    #[arg(long, value_parser = parse_byte, requires = "length")]
    pub pattern: Option<u8>,
    /// Bytes to write with --pattern (or at most this many bytes of --file).
    #[arg(long, value_parser = parse_size_arg)]
    pub length: Option<u64>,
}

/// clap adapter for [`parse_size`].
pub fn parse_size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

/// A cluster size: a size that fits 32 bits (the daemon checks the allowed range).
fn parse_cluster_size(s: &str) -> Result<u32, String> {
    let v = parse_size_arg(s)?;
    u32::try_from(v).map_err(|_| format!("cluster size {s} is too large (at most 1M)"))
}

/// A byte value: `171`, `0xab`.
fn parse_byte(s: &str) -> Result<u8, String> {
    let t = s.trim();
    let v = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u8::from_str_radix(hex, 16),
        None => t.parse::<u8>(),
    };
    v.map_err(|_| format!("invalid pattern '{s}': expected a byte value, 0-255 or 0x00-0xff"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn grammar_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn bytes_and_sizes() {
        assert_eq!(parse_byte("0xab"), Ok(0xab));
        assert_eq!(parse_byte("7"), Ok(7));
        assert!(parse_byte("256").is_err());
        assert_eq!(parse_cluster_size("64K"), Ok(65536));
        assert!(parse_cluster_size("8G").is_err());
        assert!(parse_size_arg("10X").unwrap_err().contains("unknown unit"));
    }

    #[test]
    fn parses_commands() {
        let c = Cli::try_parse_from([
            "shale", "--json", "vdi", "create", "--name", "a", "--size", "1T",
        ])
        .unwrap();
        assert!(c.json);
        assert!(
            matches!(c.command, Command::Vdi(VdiCommand::Create { size, .. }) if size == 1 << 40)
        );
        assert!(
            Cli::try_parse_from(["shale", "vdi", "write", "a"]).is_err(),
            "needs --file or --pattern"
        );
        assert!(
            Cli::try_parse_from(["shale", "vdi", "write", "a", "--pattern", "1"]).is_err(),
            "needs --length"
        );
        let c = Cli::try_parse_from(["shale", "vdi", "list", "--json"]).unwrap();
        assert!(c.json, "--json is global");
    }
}
