//! Shale's NBD client against Shale's NBD server, serving a `FileDevice` on a sparse file, plus raw-socket
//! abuse of the server (malformed frames must cost only the offending connection).

mod common;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use common::*;
use shale_block::nbd::codec::{self, RequestHeader};
use shale_block::nbd::proto::*;
use shale_block::nbd::{ConnectOptions, Export, NbdAddr, NbdClient, NbdError, ServerConfig};
use shale_block::{BlockDevice, BlockError, DeviceInfo, Extent, ExtentKind, IoBuf, WriteFlags};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MIB: u64 = 1 << 20;

async fn client(uri: &str) -> NbdClient {
    NbdClient::connect_uri(uri).await.expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_write_flush_trim_zero_status_over_tcp_and_unix() {
    let s = serve().await;
    s.export_file("vol", 64 * MIB, false);
    for uri in [s.tcp_uri("vol"), s.unix_uri("vol")] {
        let c = client(&uri).await;
        let info = c.info();
        assert_eq!(info.size, 64 * MIB);
        assert_eq!(info.block_size, 512);
        assert!(!info.read_only && info.can_multi_conn && info.can_trim);
        assert!(c.structured_replies() && c.has_block_status());
        assert_eq!(c.max_payload(), 32 << 20);
        assert_eq!(c.description(), Some("test export vol"));

        let data = pattern(MIB, 128 << 10, 7);
        c.write(MIB, IoBuf::from_slice(&data), WriteFlags::default())
            .await
            .unwrap();
        c.write(4 * MIB, IoBuf::from_slice(&data[..4096]), WriteFlags::FUA)
            .await
            .unwrap();
        c.flush().await.unwrap();
        let back = c.read(MIB, IoBuf::zeroed(data.len())).await.unwrap();
        assert_eq!(&back[..], &data[..]);

        // A large sparse read: data in the middle, holes around it (sent as hole chunks, zero-filled here).
        let mut junk = IoBuf::zeroed(4 * MIB as usize);
        junk.fill(0xAA);
        let back = c.read(0, junk).await.unwrap();
        assert!(back[..MIB as usize].iter().all(|&b| b == 0));
        assert_eq!(&back[MIB as usize..MIB as usize + data.len()], &data[..]);
        assert!(back[MIB as usize + data.len()..].iter().all(|&b| b == 0));

        let ext = c.block_status(0, 8 * MIB).await.unwrap();
        assert_eq!(
            ext[0],
            Extent {
                offset: 0,
                length: MIB,
                kind: ExtentKind::Hole
            }
        );
        assert!(ext
            .iter()
            .any(|e| e.kind == ExtentKind::Data && e.offset == MIB));

        // Discard and write-zeroes read back as zeroes.
        c.discard(MIB, 64 << 10).await.unwrap();
        c.write_zeroes(MIB + (64 << 10), 4096, false, WriteFlags::FUA)
            .await
            .unwrap();
        let back = c.read(MIB, IoBuf::zeroed(data.len())).await.unwrap();
        assert!(back[..(64 << 10) + 4096].iter().all(|&b| b == 0));
        assert_eq!(&back[(64 << 10) + 4096..], &data[(64 << 10) + 4096..]);
        c.discard(0, 64 * MIB).await.unwrap();
        c.disconnect().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_requests_in_flight_on_one_connection() {
    let s = serve().await;
    s.export_file("vol", 16 * MIB, false);
    in_flight_round_trip(&s.tcp_uri("vol"), 0).await;
}

/// Both ways of serving a connection: on the accepting runtime (`io_threads: 0`, I/O through the shared ring
/// thread) and on I/O threads, with several connections spread over them writing disjoint ranges at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_on_the_runtime_and_on_io_threads() {
    for io_threads in [0, 1, 3] {
        let s = serve_with(ServerConfig {
            io_threads,
            ..Default::default()
        })
        .await;
        s.export_file("vol", 16 * MIB, false);
        let conns = (0..4u64).map(|k| {
            let uri = if k % 2 == 0 {
                s.tcp_uri("vol")
            } else {
                s.unix_uri("vol")
            };
            async move { in_flight_round_trip(&uri, k).await }
        });
        futures::future::join_all(conns).await;
    }
}

/// 512 concurrent 8 KiB writes then reads on one connection to `uri`, in its `slot`th 4 MiB.
async fn in_flight_round_trip(uri: &str, slot: u64) {
    let c = Arc::new(client(uri).await);
    let base = slot * 4 * MIB;
    let n = 512u64;
    let writes = (0..n).map(|i| {
        let c = c.clone();
        async move {
            c.write(
                base + i * 8192,
                IoBuf::from_slice(&pattern(base + i * 8192, 8192, 1)),
                WriteFlags::default(),
            )
            .await
        }
    });
    for r in futures::future::join_all(writes).await {
        r.unwrap();
    }
    let reads = (0..n).map(|i| {
        let c = c.clone();
        async move { (i, c.read(base + i * 8192, IoBuf::zeroed(8192)).await) }
    });
    for (i, r) in futures::future::join_all(reads).await {
        assert_eq!(
            &r.unwrap()[..],
            &pattern(base + i * 8192, 8192, 1)[..],
            "block {i}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_larger_than_max_payload_are_split() {
    let s = serve().await;
    s.export_file("vol", 128 * MIB, false);
    let c = client(&s.unix_uri("vol")).await;
    let data = pattern(0, 40 << 20, 3);
    c.write(8 * MIB, IoBuf::from_slice(&data), WriteFlags::default())
        .await
        .unwrap();
    let back = c.read(8 * MIB, IoBuf::zeroed(data.len())).await.unwrap();
    assert!(back[..] == data[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_per_spec() {
    let s = serve().await;
    s.export_file("vol", MIB, false);
    s.export_file("snap", MIB, true);
    let c = client(&s.tcp_uri("vol")).await;
    // The client validates locally too; send raw requests to see the server's answers.
    let e = c.read(MIB, IoBuf::zeroed(512)).await.unwrap_err();
    assert!(matches!(e, BlockError::OutOfRange { .. }), "{e:?}");

    let ro = client(&s.tcp_uri("snap")).await;
    assert!(ro.info().read_only);
    assert!(ro.transmission_flags() & FLAG_READ_ONLY != 0);
    assert!(ro.transmission_flags() & FLAG_SEND_TRIM == 0);

    let mut raw = RawConn::connect(&s, "vol", true).await;
    assert_eq!(raw.request(CMD_READ, 0, MIB, 512, None).await, errno_e(22));
    assert_eq!(raw.request(CMD_READ, 0, 1, 512, None).await, errno_e(22));
    assert_eq!(
        raw.request(CMD_READ, 0, u64::MAX - 511, 512, None).await,
        errno_e(22)
    );
    assert_eq!(
        raw.request(CMD_WRITE, 0, MIB, 512, Some(&[1u8; 512])).await,
        errno_e(28)
    );
    assert_eq!(
        raw.request(CMD_WRITE_ZEROES, 0, MIB - 512, 1024, None)
            .await,
        errno_e(28)
    );
    assert_eq!(
        raw.request(CMD_BLOCK_STATUS, 0, MIB, 512, None).await,
        errno_e(22)
    );
    assert_eq!(raw.request(77, 0, 0, 512, None).await, errno_e(22));
    assert_eq!(
        raw.request(CMD_READ, 0x8000, 0, 512, None).await,
        errno_e(22)
    );
    assert_eq!(
        raw.request(CMD_READ, 0, 0, 64 << 20, None).await,
        errno_e(75)
    );
    // The session is still fine.
    assert_eq!(
        raw.request(CMD_WRITE, 0, 0, 512, Some(&[9u8; 512])).await,
        Ok(vec![])
    );
    assert_eq!(
        raw.request(CMD_READ, 0, 0, 512, None).await,
        Ok(vec![9u8; 512])
    );

    let mut raw = RawConn::connect(&s, "snap", true).await;
    assert_eq!(
        raw.request(CMD_WRITE, 0, 0, 512, Some(&[1u8; 512])).await,
        errno_e(1)
    );
    assert_eq!(raw.request(CMD_TRIM, 0, 0, 512, None).await, errno_e(1));
    assert_eq!(
        raw.request(CMD_WRITE_ZEROES, 0, 0, 512, None).await,
        errno_e(1)
    );
    assert_eq!(
        raw.request(CMD_READ, 0, 0, 512, None).await,
        Ok(vec![0u8; 512])
    );

    // Without structured replies: simple replies with errno, data inline.
    let mut raw = RawConn::connect(&s, "vol", false).await;
    assert_eq!(
        raw.request(CMD_READ, 0, 0, 512, None).await,
        Ok(vec![9u8; 512])
    );
    assert_eq!(raw.request(CMD_READ, 0, MIB, 512, None).await, errno_e(22));
    assert_eq!(
        raw.request(CMD_BLOCK_STATUS, 0, 0, 512, None).await,
        errno_e(22)
    );
    raw.disconnect().await;
}

fn errno_e(e: u32) -> Result<Vec<u8>, u32> {
    Err(e)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_export_and_listing() {
    let s = serve().await;
    s.export_file("a", MIB, false);
    s.export_file("b", 2 * MIB, true);
    let (addr, _) = NbdAddr::parse_uri(&s.tcp_uri("")).unwrap();
    let list = NbdClient::list_exports(&addr).await.unwrap();
    assert_eq!(
        list,
        vec![
            ("a".into(), "test export a".into()),
            ("b".into(), "test export b".into())
        ]
    );
    let e = NbdClient::connect(&addr, "nope").await.unwrap_err();
    assert!(matches!(e, NbdError::NoSuchExport(_)), "{e}");
    // Empty name with two exports: no default.
    assert!(NbdClient::connect(&addr, "").await.is_err());
    s.server.registry().unwrap().set_default(Some("b".into()));
    assert_eq!(
        NbdClient::connect(&addr, "").await.unwrap().info().size,
        2 * MIB
    );

    let exports = s.server.exports().await;
    assert_eq!(exports.len(), 2);
    assert!(exports[1].read_only);
    assert!(s.server.remove_export("a").is_some());
    assert!(NbdClient::connect(&addr, "a").await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_stats_and_disconnect_export() {
    let s = serve().await;
    s.export_file("vol", MIB, false);
    let c1 = client(&s.tcp_uri("vol")).await;
    let c2 = client(&s.unix_uri("vol")).await;
    c1.write(0, IoBuf::from_slice(&[5u8; 4096]), WriteFlags::default())
        .await
        .unwrap();
    c1.read(0, IoBuf::zeroed(4096)).await.unwrap();
    c2.flush().await.unwrap();
    let conns = s.server.connections();
    assert_eq!(conns.len(), 2);
    let tcp = conns.iter().find(|c| c.peer.starts_with("tcp:")).unwrap();
    assert_eq!(tcp.export.as_deref(), Some("vol"));
    assert_eq!(
        (tcp.reads, tcp.writes, tcp.bytes_read, tcp.bytes_written),
        (1, 1, 4096, 4096)
    );
    assert!(tcp.structured);
    let unix = conns.iter().find(|c| c.peer == "unix").unwrap();
    assert_eq!(unix.flushes, 1);

    assert_eq!(s.server.disconnect_export("vol"), 2);
    tokio::time::timeout(Duration::from_secs(5), s.server.wait_export_idle("vol"))
        .await
        .unwrap();
    wait_for(|| s.server.connections().is_empty()).await;
    assert!(c1.read(0, IoBuf::zeroed(512)).await.is_err());
}

async fn wait_for(mut f: impl FnMut() -> bool) {
    for _ in 0..200 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition not reached");
}

/// A device whose reads at offset 0 are slow, to prove replies are sent as requests complete.
struct SlowFirstBlock(Arc<dyn BlockDevice>);

#[async_trait]
impl BlockDevice for SlowFirstBlock {
    fn info(&self) -> DeviceInfo {
        self.0.info()
    }
    async fn read(&self, offset: u64, buf: IoBuf) -> shale_block::Result<IoBuf> {
        if offset == 0 {
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
        self.0.read(offset, buf).await
    }
    async fn write(&self, offset: u64, data: IoBuf, flags: WriteFlags) -> shale_block::Result<()> {
        self.0.write(offset, data, flags).await
    }
    async fn flush(&self) -> shale_block::Result<()> {
        self.0.flush().await
    }
    async fn discard(&self, offset: u64, len: u64) -> shale_block::Result<()> {
        self.0.discard(offset, len).await
    }
    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        flags: WriteFlags,
    ) -> shale_block::Result<()> {
        self.0.write_zeroes(offset, len, may_trim, flags).await
    }
    async fn block_status(&self, offset: u64, len: u64) -> shale_block::Result<Vec<Extent>> {
        self.0.block_status(offset, len).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_are_out_of_order() {
    let s = serve().await;
    let dev = s.export_file("base", MIB, false);
    s.server
        .add_export(Export::new("slow", Arc::new(SlowFirstBlock(dev))))
        .unwrap();
    let c = client(&s.tcp_uri("slow")).await;
    let start = std::time::Instant::now();
    let slow = c.read(0, IoBuf::zeroed(512));
    let fast = async {
        let r = c.read(4096, IoBuf::zeroed(512)).await;
        (r, start.elapsed())
    };
    let (slow, (fast, fast_t)) = tokio::join!(slow, fast);
    slow.unwrap();
    fast.unwrap();
    assert!(
        fast_t < Duration::from_millis(300),
        "fast read waited for the slow one: {fast_t:?}"
    );
}

/// The server's TCP listening address.
fn tcp_addr(s: &Served) -> std::net::SocketAddr {
    match s.tcp.local_addr() {
        shale_block::nbd::ListenAddr::Tcp(a) => *a,
        other => panic!("{other:?}"),
    }
}

/// A TCP connection to `s` past the greeting, with fixed newstyle and no-zeroes sent: ready for options.
async fn greeted(s: &Served) -> TcpStream {
    let addr = tcp_addr(s);
    let mut st = TcpStream::connect(addr).await.unwrap();
    let mut g = [0u8; GREETING_LEN];
    st.read_exact(&mut g).await.unwrap();
    codec::decode_greeting(&g).unwrap();
    st.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
        .await
        .unwrap();
    st
}

/// Minimal hand-rolled client for sending exactly the frames a test wants.
struct RawConn {
    s: TcpStream,
    structured: bool,
    /// Extended headers negotiated: 32-byte requests and reply chunks.
    extended: bool,
    handle: u64,
}

impl RawConn {
    async fn connect(s: &Served, export: &str, structured: bool) -> RawConn {
        Self::negotiate(s, export, structured, false).await
    }

    /// Connect with extended headers (and `base:allocation`).
    async fn connect_extended(s: &Served, export: &str) -> RawConn {
        Self::negotiate(s, export, true, true).await
    }

    async fn negotiate(s: &Served, export: &str, structured: bool, extended: bool) -> RawConn {
        let mut st = greeted(s).await;
        let mut opts = vec![];
        if extended {
            opts.push(codec::ClientOption::ExtendedHeaders);
        }
        if structured {
            if !extended {
                opts.push(codec::ClientOption::StructuredReply);
            }
            opts.push(codec::ClientOption::SetMetaContext {
                export: export.into(),
                queries: vec![BASE_ALLOCATION.into()],
            });
        }
        opts.push(codec::ClientOption::Go {
            name: export.into(),
            requests: vec![],
        });
        for o in opts {
            let mut v = vec![];
            codec::encode_option(&o, &mut v);
            st.write_all(&v).await.unwrap();
            loop {
                let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
                st.read_exact(&mut h).await.unwrap();
                let h = codec::decode_option_reply_header(&h).unwrap();
                let mut d = vec![0u8; h.length as usize];
                st.read_exact(&mut d).await.unwrap();
                assert!(
                    h.reply_type & REP_FLAG_ERROR == 0,
                    "option {} refused",
                    h.option
                );
                if h.reply_type == REP_ACK {
                    break;
                }
            }
        }
        RawConn {
            s: st,
            structured,
            extended,
            handle: 100,
        }
    }

    /// The header of request `h` as this connection frames it (writes carry `NBD_CMD_FLAG_PAYLOAD_LEN` with
    /// extended headers only if the caller set it: tests send malformed frames on purpose).
    fn header(&self, h: &RequestHeader) -> Vec<u8> {
        if self.extended {
            codec::encode_ext_request_header(h).to_vec()
        } else {
            codec::encode_request_header(h).to_vec()
        }
    }

    /// Send one request; return the read data (or empty) or the error value.
    async fn request(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u64,
        payload: Option<&[u8]>,
    ) -> Result<Vec<u8>, u32> {
        self.handle += 1;
        let h = RequestHeader {
            flags,
            command,
            handle: self.handle,
            offset,
            length,
        };
        let hdr = self.header(&h);
        self.s.write_all(&hdr).await.unwrap();
        if let Some(p) = payload {
            self.s.write_all(p).await.unwrap();
        }
        read_reply(
            &mut self.s,
            self.handle,
            offset,
            if command == CMD_READ { length } else { 0 },
            self.structured,
            self.extended,
        )
        .await
    }

    async fn disconnect(mut self) {
        let h = RequestHeader {
            command: CMD_DISC,
            ..Default::default()
        };
        let hdr = self.header(&h);
        self.s.write_all(&hdr).await.unwrap();
        let mut rest = vec![];
        self.s.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }
}

async fn read_reply(
    s: &mut TcpStream,
    handle: u64,
    base: u64,
    read_len: u64,
    structured: bool,
    extended: bool,
) -> Result<Vec<u8>, u32> {
    let mut data = vec![0u8; read_len as usize];
    let mut error = None;
    loop {
        let mut m = [0u8; 4];
        s.read_exact(&mut m).await.unwrap();
        let magic = u32::from_be_bytes(m);
        assert_eq!(
            magic == EXTENDED_REPLY_MAGIC,
            extended,
            "reply framing {magic:#x} does not match the negotiated headers"
        );
        let n = codec::reply_header_len(magic).unwrap();
        let mut hdr = vec![0u8; n];
        hdr[..4].copy_from_slice(&m);
        s.read_exact(&mut hdr[4..]).await.unwrap();
        match codec::decode_reply_header(&hdr).unwrap() {
            codec::ReplyHeader::Simple {
                error: e,
                handle: h,
            } => {
                assert_eq!(h, handle);
                assert!(
                    !structured || read_len == 0,
                    "simple reply to a structured read"
                );
                if e != 0 {
                    return Err(e);
                }
                s.read_exact(&mut data).await.unwrap();
                return Ok(data);
            }
            codec::ReplyHeader::Chunk {
                flags,
                typ,
                handle: h,
                length,
                offset,
            } => {
                assert_eq!(h, handle);
                assert_eq!(
                    offset,
                    extended.then_some(base),
                    "extended replies echo the offset"
                );
                let mut p = vec![0u8; length as usize];
                s.read_exact(&mut p).await.unwrap();
                match typ {
                    REPLY_TYPE_OFFSET_DATA => {
                        let off = (u64::from_be_bytes(p[..8].try_into().unwrap()) - base) as usize;
                        data[off..off + p.len() - 8].copy_from_slice(&p[8..]);
                    }
                    REPLY_TYPE_OFFSET_HOLE => {}
                    REPLY_TYPE_BLOCK_STATUS | REPLY_TYPE_NONE => {}
                    REPLY_TYPE_BLOCK_STATUS_EXT => {
                        assert!(extended, "64-bit block status without extended headers");
                        // Hand the descriptors back to the caller as the "data".
                        data = p;
                    }
                    t if t & REPLY_TYPE_FLAG_ERROR != 0 => {
                        error = Some(codec::decode_error_chunk(t, &p).unwrap().error);
                    }
                    t => panic!("unexpected chunk type {t}"),
                }
                if flags & REPLY_FLAG_DONE != 0 {
                    return match error {
                        Some(e) => Err(e),
                        None => Ok(data),
                    };
                }
            }
        }
    }
}

/// Malformed frames end only the offending connection; other clients and acknowledged writes are untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_cost_only_their_connection() {
    let s = serve().await;
    s.export_file("vol", 4 * MIB, false);
    let good = client(&s.tcp_uri("vol")).await;
    let data = pattern(0, 64 << 10, 9);
    good.write(MIB, IoBuf::from_slice(&data), WriteFlags::default())
        .await
        .unwrap();
    let addr = tcp_addr(&s);

    // 1. Garbage instead of the client flags.
    let mut st = TcpStream::connect(addr).await.unwrap();
    let mut g = [0u8; GREETING_LEN];
    st.read_exact(&mut g).await.unwrap();
    st.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    expect_closed(&mut st).await;

    // 2. An option claiming 4 GiB of data.
    let mut st = TcpStream::connect(addr).await.unwrap();
    st.read_exact(&mut g).await.unwrap();
    st.write_all(&1u32.to_be_bytes()).await.unwrap();
    st.write_all(&codec::encode_option_header(OPT_GO, u32::MAX))
        .await
        .unwrap();
    expect_closed(&mut st).await;

    // 3. Option with a bad magic.
    let mut st = TcpStream::connect(addr).await.unwrap();
    st.read_exact(&mut g).await.unwrap();
    st.write_all(&1u32.to_be_bytes()).await.unwrap();
    st.write_all(&[0xffu8; 16]).await.unwrap();
    expect_closed(&mut st).await;

    // 4. Unknown options and STARTTLS are answered, the session continues; extended headers are accepted
    // once, after which structured replies cannot be asked for.
    let mut st = TcpStream::connect(addr).await.unwrap();
    st.read_exact(&mut g).await.unwrap();
    st.write_all(&1u32.to_be_bytes()).await.unwrap();
    for (opt, expect) in [
        (4242u32, REP_ERR_UNSUP),
        (OPT_STARTTLS, REP_ERR_POLICY),
        (OPT_EXTENDED_HEADERS, REP_ACK),
        (OPT_EXTENDED_HEADERS, REP_ERR_INVALID),
        (OPT_STRUCTURED_REPLY, REP_ERR_EXT_HEADER_REQD),
    ] {
        st.write_all(&codec::encode_option_header(opt, 0))
            .await
            .unwrap();
        let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
        st.read_exact(&mut h).await.unwrap();
        let h = codec::decode_option_reply_header(&h).unwrap();
        assert_eq!((h.option, h.reply_type), (opt, expect));
        let mut d = vec![0u8; h.length as usize];
        st.read_exact(&mut d).await.unwrap();
    }
    // Malformed GO data: ERR_INVALID, session continues, then ABORT gets an ACK.
    st.write_all(&codec::encode_option_header(OPT_GO, 3))
        .await
        .unwrap();
    st.write_all(&[0, 0, 9]).await.unwrap();
    let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
    st.read_exact(&mut h).await.unwrap();
    let h = codec::decode_option_reply_header(&h).unwrap();
    assert_eq!(h.reply_type, REP_ERR_INVALID);
    let mut d = vec![0u8; h.length as usize];
    st.read_exact(&mut d).await.unwrap();
    st.write_all(&codec::encode_option_header(OPT_ABORT, 0))
        .await
        .unwrap();
    let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
    st.read_exact(&mut h).await.unwrap();
    assert_eq!(
        codec::decode_option_reply_header(&h).unwrap().reply_type,
        REP_ACK
    );
    expect_closed(&mut st).await;

    // 5. Transmission: a request with a bad magic.
    let mut raw = RawConn::connect(&s, "vol", true).await;
    raw.s.write_all(&[0x55u8; 28]).await.unwrap();
    expect_closed(&mut raw.s).await;

    // 6. A write claiming a 4 GiB payload: EOVERFLOW, then the connection closes.
    let mut raw = RawConn::connect(&s, "vol", true).await;
    let h = RequestHeader {
        flags: 0,
        command: CMD_WRITE,
        handle: 1,
        offset: 0,
        length: u64::from(u32::MAX),
    };
    raw.s
        .write_all(&codec::encode_request_header(&h))
        .await
        .unwrap();
    assert_eq!(read_reply(&mut raw.s, 1, 0, 0, true, false).await, Err(75));
    expect_closed(&mut raw.s).await;

    // 7. Truncated payload: the header promises 64 KiB, the client sends 100 bytes and hangs up.
    let mut raw = RawConn::connect(&s, "vol", true).await;
    let h = RequestHeader {
        flags: 0,
        command: CMD_WRITE,
        handle: 1,
        offset: 0,
        length: 65536,
    };
    raw.s
        .write_all(&codec::encode_request_header(&h))
        .await
        .unwrap();
    raw.s.write_all(&[0xEE; 100]).await.unwrap();
    drop(raw);

    // 8. A flood of pipelined requests, then an abrupt close.
    let mut raw = RawConn::connect(&s, "vol", true).await;
    let mut v = vec![];
    for i in 0..1000u64 {
        let h = RequestHeader {
            flags: 0,
            command: CMD_READ,
            handle: i,
            offset: (i % 64) * 4096,
            length: 4096,
        };
        v.extend_from_slice(&codec::encode_request_header(&h));
    }
    raw.s.write_all(&v).await.unwrap();
    drop(raw);

    // 9. An unknown command mid-stream is answered with EINVAL and the session continues.
    let mut raw = RawConn::connect(&s, "vol", true).await;
    assert_eq!(raw.request(0x7777, 0, 0, 0, None).await, Err(22));
    assert_eq!(
        raw.request(CMD_READ, 0, MIB, 4096, None).await,
        Ok(data[..4096].to_vec())
    );

    // The well-behaved client never noticed; its acknowledged write is intact; a new client works.
    let back = good.read(MIB, IoBuf::zeroed(data.len())).await.unwrap();
    assert_eq!(&back[..], &data[..]);
    let fresh = client(&s.unix_uri("vol")).await;
    let back = fresh.read(MIB, IoBuf::zeroed(data.len())).await.unwrap();
    assert_eq!(&back[..], &data[..]);
    // The truncated write never happened.
    assert!(fresh
        .read(0, IoBuf::zeroed(4096))
        .await
        .unwrap()
        .iter()
        .all(|&b| b == 0));
}

async fn expect_closed(st: &mut TcpStream) {
    let mut buf = vec![0u8; 4096];
    let r = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match st.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(r.is_ok(), "server did not close the connection");
}

/// xorshift64*: a seeded, reproducible stream for the randomized abuse below (the seed is printed on failure).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.below(from.len() as u64) as usize]
    }
}

/// Random request frames for an export of `size` bytes: known and unknown commands, any flag bits, offsets and
/// lengths in range, just past the end, misaligned or absurd, writes with their payload, a truncated one, or
/// none, and stretches of garbage. Returns the bytes to send.
fn random_frames(rng: &mut Rng, size: u64, extended: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for handle in 0..1 + rng.below(8) {
        match rng.below(10) {
            0 => {
                let n = 1 + rng.below(64) as usize;
                out.extend((0..n).map(|_| rng.next() as u8));
            }
            _ => {
                let unknown = rng.next() as u16;
                let command = rng.pick(&[
                    CMD_READ,
                    CMD_WRITE,
                    CMD_WRITE,
                    CMD_FLUSH,
                    CMD_TRIM,
                    CMD_CACHE,
                    CMD_WRITE_ZEROES,
                    CMD_BLOCK_STATUS,
                    CMD_DISC,
                    CMD_RESIZE,
                    unknown,
                ]);
                // Mostly requests a client could send, so that the server executes many of them too.
                let flags = match rng.below(10) {
                    0 => rng.next() as u16,
                    1 => rng.pick(&[
                        CMD_FLAG_FUA,
                        CMD_FLAG_DF,
                        CMD_FLAG_NO_HOLE,
                        CMD_FLAG_REQ_ONE,
                        CMD_FLAG_FAST_ZERO,
                        CMD_FLAG_PAYLOAD_LEN,
                    ]),
                    2 if extended && command == CMD_WRITE => CMD_FLAG_PAYLOAD_LEN,
                    _ => 0,
                };
                let offset = match rng.below(8) {
                    0 => rng.next(),
                    1 => size - rng.below(8) * 512,
                    2 => rng.below(size),
                    _ => rng.below(size / 512 - 64) * 512,
                };
                let length = match rng.below(8) {
                    0 if extended => rng.next(),
                    0 => u64::from(rng.next() as u32),
                    1 => 1 + rng.below(70_000),
                    _ => (1 + rng.below(64)) * 512,
                };
                let h = RequestHeader {
                    flags,
                    command,
                    handle,
                    offset,
                    length,
                };
                if extended {
                    out.extend(codec::encode_ext_request_header(&h));
                } else {
                    out.extend(codec::encode_request_header(&h));
                }
                let payload = command == CMD_WRITE || extended && flags & CMD_FLAG_PAYLOAD_LEN != 0;
                if payload {
                    let sent = match rng.below(6) {
                        0 => rng.below(length.min(1 << 17) + 1),
                        _ => length.min(1 << 17),
                    };
                    out.extend((0..sent).map(|i| (i as u8) ^ 0x5a));
                    if sent < length {
                        break; // the rest of the stream would be payload
                    }
                }
            }
        }
    }
    out
}

/// Read what the server sends on a structured-reply (or extended-header) connection until it closes or goes
/// quiet, checking that every reply frame is well formed: a valid magic for the negotiated framing, a known
/// handle, a chunk length that is read in full.
async fn well_formed_replies(
    st: &mut (impl tokio::io::AsyncRead + Unpin),
    seed: u64,
    extended: bool,
) {
    let quiet = Duration::from_secs(5);
    loop {
        let mut hdr = [0u8; EXT_CHUNK_HEADER_LEN];
        match tokio::time::timeout(quiet, st.read_exact(&mut hdr[..4])).await {
            Err(_) => panic!("seed {seed:#x}: server neither replied nor closed"),
            Ok(Err(_)) => return, // closed
            Ok(Ok(_)) => {}
        }
        let magic = u32::from_be_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        assert_eq!(
            magic == EXTENDED_REPLY_MAGIC,
            extended,
            "seed {seed:#x}: reply magic {magic:#x}"
        );
        let n = codec::reply_header_len(magic)
            .unwrap_or_else(|e| panic!("seed {seed:#x}: bad reply: {e}"));
        if st.read_exact(&mut hdr[4..n]).await.is_err() {
            return;
        }
        match codec::decode_reply_header(&hdr[..n]).expect("reply header") {
            codec::ReplyHeader::Simple { handle, .. } => {
                assert!(handle < 8, "seed {seed:#x}: handle {handle}")
            }
            codec::ReplyHeader::Chunk { handle, length, .. } => {
                assert!(handle < 8, "seed {seed:#x}: handle {handle}");
                assert!(
                    length <= 64 << 20,
                    "seed {seed:#x}: chunk of {length} bytes"
                );
                let mut payload = vec![0u8; length as usize];
                if st.read_exact(&mut payload).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Hundreds of connections sending random frames (see [`random_frames`]) to one export, then hanging up, while
/// another export holds acknowledged data: every connection ends cleanly (well-formed replies, then a close),
/// the server keeps serving, and the other export's data is intact. Every other connection negotiates extended
/// headers and sends extended frames (64-bit lengths, the payload flag on any command).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_frames_cost_only_their_connection() {
    // A panic in a connection's task would only close that connection, which this test expects of bad
    // frames anyway: count panics, wherever they happen, to catch them.
    static PANICS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        previous(info)
    }));
    let s = serve().await;
    s.export_file("vol", 4 * MIB, false);
    s.export_file("fuzz", MIB, false);
    let good = client(&s.tcp_uri("vol")).await;
    let data = pattern(0, 256 << 10, 3);
    good.write(MIB, IoBuf::from_slice(&data), WriteFlags { fua: true })
        .await
        .unwrap();

    let base = std::env::var("SHALE_FUZZ_SEED")
        .ok()
        .and_then(|v| u64::from_str_radix(v.trim_start_matches("0x"), 16).ok())
        .unwrap_or(0x51a1e);
    for i in 0..500u64 {
        let seed = base.wrapping_add(i).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut rng = Rng(seed);
        let extended = i % 2 == 1;
        let frames = random_frames(&mut rng, MIB, extended);
        let raw = if extended {
            RawConn::connect_extended(&s, "fuzz").await
        } else {
            RawConn::connect(&s, "fuzz", true).await
        };
        let (mut rd, mut wr) = raw.s.into_split();
        let send = async move {
            // The server may close first (that is the point); a failed write is fine.
            let _ = wr.write_all(&frames).await;
            let _ = wr.shutdown().await;
        };
        tokio::join!(send, well_formed_replies(&mut rd, seed, extended));
        assert_eq!(
            PANICS.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "seed {seed:#x}: a task panicked"
        );
    }

    // The well-behaved client never noticed; its data is intact; a new client works.
    let back = good.read(MIB, IoBuf::zeroed(data.len())).await.unwrap();
    assert_eq!(&back[..], &data[..]);
    let fresh = client(&s.unix_uri("vol")).await;
    let back = fresh.read(MIB, IoBuf::zeroed(data.len())).await.unwrap();
    assert_eq!(&back[..], &data[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disc_drains_in_flight_writes() {
    let s = serve().await;
    s.export_file("vol", 16 * MIB, false);
    let addr = tcp_addr(&s);
    let mut raw = RawConn::connect(&s, "vol", true).await;
    let _ = addr;
    // Pipeline 64 writes and a DISC without waiting: every write must be applied and answered before close.
    let mut v = vec![];
    for i in 0..64u64 {
        let h = RequestHeader {
            flags: 0,
            command: CMD_WRITE,
            handle: i,
            offset: i * 65536,
            length: 65536,
        };
        v.extend_from_slice(&codec::encode_request_header(&h));
        v.extend_from_slice(&pattern(i * 65536, 65536, 4));
    }
    v.extend_from_slice(&codec::encode_request_header(&RequestHeader {
        command: CMD_DISC,
        ..Default::default()
    }));
    raw.s.write_all(&v).await.unwrap();
    let mut replies = vec![];
    raw.s.read_to_end(&mut replies).await.unwrap();
    assert_eq!(replies.len(), 64 * SIMPLE_REPLY_LEN);
    let c = client(&s.tcp_uri("vol")).await;
    let back = c.read(0, IoBuf::zeroed(64 * 65536)).await.unwrap();
    assert!(back[..] == pattern(0, 64 * 65536, 4)[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_against_qemu_nbd() {
    if !have("qemu-nbd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("q.raw");
    sparse_file(&img, 16 * MIB);
    let sock = dir.path().join("q.sock");
    let mut child = tokio::process::Command::new("qemu-nbd")
        .args([
            "-f",
            "raw",
            "-x",
            "qexp",
            "-e",
            "4",
            "--cache=none",
            "--aio=threads",
            "-k",
        ])
        .arg(&sock)
        .arg(&img)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    for _ in 0..100 {
        if sock.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let c = Arc::new(
        NbdClient::connect(&NbdAddr::Unix(sock.clone()), "qexp")
            .await
            .unwrap(),
    );
    assert_eq!(c.info().size, 16 * MIB);
    assert!(c.structured_replies() && c.has_block_status());
    assert!(
        c.extended_headers(),
        "qemu-nbd 8.2+ offers extended headers"
    );
    let data = pattern(0, 1 << 20, 5);
    c.write(2 * MIB, IoBuf::from_slice(&data), WriteFlags::FUA)
        .await
        .unwrap();
    let jobs = (0..64u64).map(|i| {
        let c = c.clone();
        async move {
            c.write(
                8 * MIB + i * 4096,
                IoBuf::from_slice(&pattern(i, 4096, 2)),
                WriteFlags::default(),
            )
            .await
        }
    });
    for r in futures::future::join_all(jobs).await {
        r.unwrap();
    }
    c.flush().await.unwrap();
    let back = c.read(0, IoBuf::zeroed(4 * MIB as usize)).await.unwrap();
    assert!(back[..2 * MIB as usize].iter().all(|&b| b == 0));
    assert!(back[2 * MIB as usize..3 * MIB as usize] == data[..]);
    for i in 0..64u64 {
        let b = c
            .read(8 * MIB + i * 4096, IoBuf::zeroed(4096))
            .await
            .unwrap();
        assert_eq!(&b[..], &pattern(i, 4096, 2)[..]);
    }
    let ext = c.block_status(0, 16 * MIB).await.unwrap();
    assert_eq!(ext[0].kind, ExtentKind::Hole);
    assert!(ext.iter().any(|e| e.kind == ExtentKind::Data
        && e.offset <= 2 * MIB
        && e.offset + e.length >= 3 * MIB));
    c.discard(2 * MIB, MIB).await.unwrap();
    let back = c.read(2 * MIB, IoBuf::zeroed(MIB as usize)).await.unwrap();
    assert!(back.iter().all(|&b| b == 0));

    // Several connections where qemu-nbd promises multi-conn consistency, one where it does not (made while
    // `c` is connected: without --persistent, qemu-nbd exits when its last client leaves; -e 4 admits 1 + 3).
    let m = NbdClient::connect_multi(&NbdAddr::Unix(sock.clone()), "qexp", 3)
        .await
        .unwrap();
    let want = if m.info().can_multi_conn { 3 } else { 1 };
    assert_eq!(m.connections(), want);
    m.write(4 * MIB, IoBuf::from_slice(&data), WriteFlags::default())
        .await
        .unwrap();
    m.flush().await.unwrap();
    let back = m.read(4 * MIB, IoBuf::zeroed(MIB as usize)).await.unwrap();
    assert!(back[..] == data[..]);
    m.disconnect().await;
    drop(c);
    let _ = child.kill().await;
}

/// A multi-connection client spreads its requests over every connection (the server sees all of them at work),
/// and one flush makes the writes of all of them durable and visible to any other client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_conn_client_spreads_requests_over_its_connections() {
    let s = serve().await;
    s.export_file("vol", 16 * MIB, false);
    let addr = NbdAddr::parse_uri(&s.tcp_uri("vol")).unwrap().0;
    let c = Arc::new(NbdClient::connect_multi(&addr, "vol", 4).await.unwrap());
    assert!(c.info().can_multi_conn);
    assert_eq!(c.connections(), 4);
    let jobs = (0..64u64).map(|i| {
        let c = c.clone();
        async move {
            let data = IoBuf::from_slice(&pattern(i, 64 << 10, 4));
            c.write(i * (64 << 10), data, WriteFlags::default()).await
        }
    });
    for r in futures::future::join_all(jobs).await {
        r.unwrap();
    }
    c.flush().await.unwrap();
    let conns = s.server.connections();
    assert_eq!(conns.len(), 4);
    assert_eq!(conns.iter().map(|c| c.writes).sum::<u64>(), 64);
    assert!(
        conns.iter().all(|c| c.writes > 0),
        "every connection carries writes: {conns:?}"
    );
    let other = client(&s.unix_uri("vol")).await;
    let back = other
        .read(0, IoBuf::zeroed(4 * MIB as usize))
        .await
        .unwrap();
    for i in 0..64usize {
        assert_eq!(
            &back[i << 16..(i + 1) << 16],
            &pattern(i as u64, 64 << 10, 4)[..]
        );
    }
    // A read larger than one request goes out in pieces over the connections and comes back whole.
    let big = c.read(0, IoBuf::zeroed(4 * MIB as usize)).await.unwrap();
    assert!(big[..] == back[..]);
    Arc::try_unwrap(c).unwrap().disconnect().await;
    wait_for(|| s.server.connections().len() == 1).await;
}

/// Overlapping requests pipelined on one connection take effect in arrival order (a trim followed at once by a
/// write of the same block leaves the written data), as clients such as fio's `trimwrite` expect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_pipelined_requests_keep_arrival_order() {
    let s = serve().await;
    s.export_file("vol", 16 * MIB, false);
    let mut raw = RawConn::connect(&s, "vol", true).await;
    let mut v = vec![];
    let mut handle = 0u64;
    let mut hdr = |command: u16, offset: u64, length: u32| {
        handle += 1;
        codec::encode_request_header(&RequestHeader {
            flags: 0,
            command,
            handle,
            offset,
            length: u64::from(length),
        })
    };
    for i in 0..128u64 {
        let off = i * 65536;
        v.extend_from_slice(&hdr(CMD_WRITE, off, 65536));
        v.extend_from_slice(&pattern(off, 65536, 1));
        v.extend_from_slice(&hdr(CMD_TRIM, off, 65536));
        v.extend_from_slice(&hdr(CMD_WRITE, off, 65536));
        v.extend_from_slice(&pattern(off, 65536, 2));
        v.extend_from_slice(&hdr(CMD_WRITE_ZEROES, off, 4096));
    }
    v.extend_from_slice(&hdr(CMD_DISC, 0, 0));
    raw.s.write_all(&v).await.unwrap();
    let mut replies = vec![];
    raw.s.read_to_end(&mut replies).await.unwrap();
    assert_eq!(replies.len(), 4 * 128 * SIMPLE_REPLY_LEN);
    let c = client(&s.tcp_uri("vol")).await;
    let back = c.read(0, IoBuf::zeroed(128 * 65536)).await.unwrap();
    for i in 0..128usize {
        let blk = &back[i * 65536..(i + 1) * 65536];
        assert!(
            blk[..4096].iter().all(|&b| b == 0),
            "block {i}: zeroes lost"
        );
        assert_eq!(
            &blk[4096..],
            &pattern(i as u64 * 65536, 65536, 2)[4096..],
            "block {i}: wrong data"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_and_stops_listening() {
    let s = serve().await;
    s.export_file("vol", MIB, false);
    let c = client(&s.unix_uri("vol")).await;
    c.write(0, IoBuf::from_slice(&[1u8; 4096]), WriteFlags::default())
        .await
        .unwrap();
    // A client stuck in negotiation is closed too.
    let addr = tcp_addr(&s);
    let mut idle = TcpStream::connect(addr).await.unwrap();
    let mut g = [0u8; GREETING_LEN];
    idle.read_exact(&mut g).await.unwrap();
    s.server.shutdown();
    tokio::time::timeout(Duration::from_secs(5), s.server.wait_idle())
        .await
        .unwrap();
    expect_closed(&mut idle).await;
    assert!(c.read(0, IoBuf::zeroed(512)).await.is_err());
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(NbdClient::connect_uri(&s.tcp_uri("vol")).await.is_err());
    assert!(
        !s.dir.path().join("nbd.sock").exists(),
        "unix socket file left behind"
    );
}

/// With extended headers the client sends write-zeroes and block status over a whole 16 GiB export as single
/// requests, and the server answers with 64-bit descriptors (a hole longer than 4 GiB in one); a client that
/// asks for compact headers gets them and the same data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_headers_carry_64_bit_lengths() {
    const GIB: u64 = 1 << 30;
    let s = serve().await;
    s.export_file("big", 16 * GIB, false);
    let c = NbdClient::connect_uri_with(&s.tcp_uri("big"), &ConnectOptions::default())
        .await
        .unwrap();
    assert!(c.extended_headers() && c.has_block_status());
    let data = pattern(7, MIB as usize, 3);
    c.write(6 * GIB, IoBuf::from_slice(&data), WriteFlags::default())
        .await
        .unwrap();
    c.write(14 * GIB, IoBuf::from_slice(&data), WriteFlags::FUA)
        .await
        .unwrap();
    let ext = c.block_status(0, 16 * GIB).await.unwrap();
    assert_eq!(ext[0].kind, ExtentKind::Hole);
    assert_eq!(
        ext[0].length,
        6 * GIB,
        "one descriptor for a 6 GiB hole: {ext:?}"
    );
    assert_eq!(
        (ext[1].offset, ext[1].length, ext[1].kind),
        (6 * GIB, MIB, ExtentKind::Data)
    );

    // 12 GiB of zeroes in one request (the server runs it in slices), leaving the data at 14 GiB alone.
    c.write_zeroes(0, 12 * GIB, true, WriteFlags::FUA)
        .await
        .unwrap();
    let back = c.read(6 * GIB, IoBuf::zeroed(MIB as usize)).await.unwrap();
    assert!(back.iter().all(|&b| b == 0));
    let back = c.read(14 * GIB, IoBuf::zeroed(MIB as usize)).await.unwrap();
    assert!(back[..] == data[..]);
    let ext = c.block_status(0, 16 * GIB).await.unwrap();
    assert_eq!((ext[0].length, ext[0].kind), (14 * GIB, ExtentKind::Hole));

    // Compact headers: the same answers, in requests of at most 1 GiB.
    let opts = ConnectOptions {
        extended_headers: false,
        ..Default::default()
    };
    let old = NbdClient::connect_uri_with(&s.tcp_uri("big"), &opts)
        .await
        .unwrap();
    assert!(!old.extended_headers() && old.structured_replies());
    let ext = old.block_status(0, 16 * GIB).await.unwrap();
    assert_eq!((ext[0].length, ext[0].kind), (GIB, ExtentKind::Hole));
    let back = old
        .read(14 * GIB, IoBuf::zeroed(MIB as usize))
        .await
        .unwrap();
    assert!(back[..] == data[..]);
    old.discard(14 * GIB, MIB).await.unwrap();
    let back = c.read(14 * GIB, IoBuf::zeroed(MIB as usize)).await.unwrap();
    assert!(back.iter().all(|&b| b == 0));
}

/// Extended-header frames as the spec has them: every reply is a 32-byte chunk echoing the request's offset
/// (checked by `read_reply`), writes work with or without `NBD_CMD_FLAG_PAYLOAD_LEN` (qemu 10 omits it),
/// other commands with a payload are refused after it is skipped, block status comes as `BLOCK_STATUS_EXT`,
/// and a compact header on an extended connection, or `EXPORT_NAME` after extended headers, ends only that
/// connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_header_frames_follow_the_spec() {
    let s = serve().await;
    s.export_file("vol", 4 * MIB, false);
    let mut raw = RawConn::connect_extended(&s, "vol").await;
    let a = pattern(0, 4096, 1);
    let b = pattern(1, 4096, 2);
    raw.request(CMD_WRITE, CMD_FLAG_PAYLOAD_LEN, 0, 4096, Some(&a))
        .await
        .unwrap();
    raw.request(CMD_WRITE, CMD_FLAG_FUA, 4096, 4096, Some(&b))
        .await
        .unwrap();
    let back = raw.request(CMD_READ, 0, 0, 8192, None).await.unwrap();
    assert!(back[..4096] == a[..] && back[4096..] == b[..]);
    // A trim announcing a payload: EINVAL, the payload is skipped, the session goes on.
    assert_eq!(
        raw.request(CMD_TRIM, CMD_FLAG_PAYLOAD_LEN, 0, 512, Some(&[0u8; 512]))
            .await,
        errno_e(22)
    );
    raw.request(CMD_FLUSH, 0, 0, 0, None).await.unwrap();
    let st = raw
        .request(CMD_BLOCK_STATUS, 0, 0, 4 * MIB, None)
        .await
        .unwrap();
    let (id, descs) = codec::decode_block_status(REPLY_TYPE_BLOCK_STATUS_EXT, &st).unwrap();
    assert_eq!(id, 1);
    assert_eq!(descs[0], (8192, 0));
    assert_eq!(descs.iter().map(|d| d.0).sum::<u64>(), 4 * MIB);
    raw.request(CMD_WRITE_ZEROES, 0, 0, 4 * MIB, None)
        .await
        .unwrap();
    let back = raw.request(CMD_READ, 0, 0, 8192, None).await.unwrap();
    assert!(back.iter().all(|&b| b == 0));
    // Out-of-range and misaligned requests get errors as chunks (and the connection survives).
    assert_eq!(
        raw.request(CMD_READ, 0, 4 * MIB, 4096, None).await,
        errno_e(22)
    );
    raw.request(CMD_READ, 0, 0, 512, None).await.unwrap();

    // A compact request on the extended connection: the stream is out of sync, so it ends; others carry on.
    let mut other = RawConn::connect_extended(&s, "vol").await;
    let compact = codec::encode_request_header(&RequestHeader {
        command: CMD_READ,
        handle: 1,
        length: 512,
        ..Default::default()
    });
    // (Two of them: the server reads 32 bytes before it looks at the magic.)
    raw.s.write_all(&[compact, compact].concat()).await.unwrap();
    expect_closed(&mut raw.s).await;
    other.request(CMD_READ, 0, 0, 512, None).await.unwrap();
    other.disconnect().await;

    // EXPORT_NAME after extended headers breaks a MUST NOT: the server hangs up.
    let mut st = greeted(&s).await;
    let mut v = vec![];
    codec::encode_option(&codec::ClientOption::ExtendedHeaders, &mut v);
    st.write_all(&v).await.unwrap();
    let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
    st.read_exact(&mut h).await.unwrap();
    assert_eq!(
        codec::decode_option_reply_header(&h).unwrap().reply_type,
        REP_ACK
    );
    let mut v = vec![];
    codec::encode_option(&codec::ClientOption::ExportName("vol".into()), &mut v);
    st.write_all(&v).await.unwrap();
    expect_closed(&mut st).await;
}
