//! Serve one raw file over NBD with Shale's server: the benchmark target and a manual test tool.
//!
//! ```text
//! cargo run --release -p shale-block --example nbd-serve -- FILE [--name vol] [--tcp 127.0.0.1:10809]
//!     [--unix /tmp/shale-nbd.sock] [--read-only] [--create-size 1G] [--io-threads 1] [--workers 2]
//!     [--conn-threads N] [--tls-cert PEM --tls-key PEM]
//! ```
//! `--io-threads` sizes the shared io_uring engine, `--workers` the tokio runtime that accepts connections, and
//! `--conn-threads` the server's I/O threads that serve them (0: serve on the tokio runtime through the shared
//! engine, the pre-I/O-thread design, for A/B comparisons). With `--tls-cert`/`--tls-key` every client must start
//! TLS (TCP and Unix alike).
//! Prints the export URIs, then serves until SIGINT/SIGTERM.

use std::sync::Arc;

use shale_block::file::FileDevice;
use shale_block::nbd::{Export, NbdServer, ServerConfig, ServerTls, ServerTlsConfig, TlsPolicy};
use shale_block::uring::{IoEngine, IoEngineConfig};
use shale_block::BlockDevice;

struct Args {
    file: String,
    name: String,
    tcp: Option<String>,
    unix: Option<String>,
    read_only: bool,
    create_size: Option<u64>,
    io_threads: usize,
    workers: usize,
    conn_threads: Option<usize>,
    tls_cert: Option<String>,
    tls_key: Option<String>,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        Some('T' | 't') => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .map(|n| n * mult)
        .map_err(|e| format!("bad size {s:?}: {e}"))
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        file: String::new(),
        name: "vol".into(),
        tcp: None,
        unix: None,
        read_only: false,
        create_size: None,
        io_threads: 1,
        workers: 2,
        conn_threads: None,
        tls_cert: None,
        tls_key: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = |n: &str| it.next().ok_or_else(|| format!("{n} needs a value"));
        match arg.as_str() {
            "--name" => a.name = val("--name")?,
            "--tcp" => a.tcp = Some(val("--tcp")?),
            "--unix" => a.unix = Some(val("--unix")?),
            "--read-only" => a.read_only = true,
            "--create-size" => a.create_size = Some(parse_size(&val("--create-size")?)?),
            "--io-threads" => a.io_threads = val("--io-threads")?.parse().map_err(|e| format!("{e}"))?,
            "--workers" => a.workers = val("--workers")?.parse().map_err(|e| format!("{e}"))?,
            "--conn-threads" => a.conn_threads = Some(val("--conn-threads")?.parse().map_err(|e| format!("{e}"))?),
            "--tls-cert" => a.tls_cert = Some(val("--tls-cert")?),
            "--tls-key" => a.tls_key = Some(val("--tls-key")?),
            "-h" | "--help" => return Err("usage: nbd-serve FILE [--name N] [--tcp ADDR] [--unix PATH] [--read-only] [--create-size SIZE] [--io-threads N] [--workers N] [--conn-threads N] [--tls-cert PEM --tls-key PEM]".into()),
            f if !f.starts_with('-') && a.file.is_empty() => a.file = f.to_string(),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if a.file.is_empty() {
        return Err("missing FILE".into());
    }
    if a.tls_cert.is_some() != a.tls_key.is_some() {
        return Err("--tls-cert and --tls-key go together".into());
    }
    if a.tcp.is_none() && a.unix.is_none() {
        a.tcp = Some("127.0.0.1:10809".into());
    }
    Ok(a)
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("nbd-serve: {e}");
            std::process::exit(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.workers.max(1))
        .enable_all()
        .build()
        .unwrap_or_else(|e| {
            eprintln!("nbd-serve: cannot start runtime: {e}");
            std::process::exit(1)
        });
    if let Err(e) = rt.block_on(serve(args)) {
        eprintln!("nbd-serve: {e}");
        std::process::exit(1);
    }
}

async fn serve(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    if let Some(size) = args.create_size {
        if !std::path::Path::new(&args.file).exists() {
            std::fs::File::create(&args.file)?.set_len(size)?;
        }
    }
    let engine = IoEngine::new(IoEngineConfig {
        threads: args.io_threads.max(1),
        ..Default::default()
    })?;
    let dev = FileDevice::open(&args.file, args.read_only, engine)?;
    let direct = dev.is_direct();
    let dev: Arc<dyn BlockDevice> = Arc::new(dev);
    let mut config = ServerConfig::default();
    if let Some(n) = args.conn_threads {
        config.io_threads = n;
    }
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        config.tls = Some(ServerTlsConfig {
            creds: ServerTls::from_pem_files(cert.as_ref(), key.as_ref(), None)?,
            tcp: TlsPolicy::Require,
            unix: TlsPolicy::Require,
        });
    }
    let tls = config.tls.is_some();
    let server = NbdServer::new(config);
    server.add_export(
        Export::new(&args.name, dev)
            .with_description(format!("{} (O_DIRECT: {direct})", args.file))
            .read_only(args.read_only),
    )?;
    let mut listeners = Vec::new();
    if let Some(t) = &args.tcp {
        listeners.push(server.listen_tcp(t.as_str()).await?);
    }
    if let Some(u) = &args.unix {
        listeners.push(server.listen_unix(u).await?);
    }
    for l in &listeners {
        println!("{}", l.local_addr().uri_tls(&args.name, tls));
    }
    use std::io::Write;
    std::io::stdout().flush()?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    server.shutdown();
    for l in listeners {
        l.stop();
    }
    Ok(())
}
