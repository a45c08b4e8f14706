//! The gRPC service in process: a real [`Host`] on the native engine, served on a Unix socket, driven through
//! the generated client. Checks what the CLI relies on: status codes per error kind, addressing rules, and how
//! the host handles an SR that cannot be attached at start.

use std::path::Path;
use std::sync::Arc;

use shale_block::uring::{IoEngine, IoEngineConfig};
use shale_sr::proto::{self, shale_client::ShaleClient};
use shale_sr::service::ShaleService;
use shale_sr::thin::ThinDriver;
use shale_sr::{Host, SrDriver};
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::Channel;
use tonic::Code;

fn drivers() -> Vec<Arc<dyn SrDriver>> {
    let io = IoEngine::new(IoEngineConfig::default()).expect("io engine");
    vec![Arc::new(ThinDriver::new(io))]
}

/// Serve `host` on `socket` until the returned sender is dropped or fired.
async fn serve(
    host: Arc<Host>,
    socket: &Path,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let listener = UnixListener::bind(socket).expect("bind");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let svc = ShaleService::new(host, socket.to_path_buf()).into_server();
    let task = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async {
                let _ = rx.await;
            })
            .await
            .expect("serve");
    });
    (tx, task)
}

async fn client(socket: &Path) -> ShaleClient<Channel> {
    shale_sr::client::connect(socket).await.expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_codes_and_addressing() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let host = Arc::new(Host::open(&state, drivers()).await.expect("open host"));
    let socket = dir.path().join("s.sock");
    let (stop, task) = serve(host.clone(), &socket).await;
    let mut c = client(&socket).await;

    let info = c
        .host_info(proto::HostInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.sr_types, ["thin"]);
    let srs = c
        .sr_list(proto::SrListRequest {})
        .await
        .unwrap()
        .into_inner()
        .srs;
    assert_eq!(srs.len(), 1);
    assert_eq!(srs[0].name, "local");

    let other = dir.path().join("other");
    let sr = c
        .sr_create(proto::SrCreateRequest {
            name: "other".into(),
            r#type: "thin".into(),
            path: other.display().to_string(),
            cluster_size: 4096,
            capacity: Some(1 << 20),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sr.cluster_size, 4096);
    assert_eq!(sr.capacity, Some(1 << 20));

    let create = |sr: &str, name: &str, size: u64| proto::VdiCreateRequest {
        sr: sr.into(),
        name: name.into(),
        size,
    };
    c.vdi_create(create("local", "a", 1 << 20)).await.unwrap();
    c.vdi_create(create("other", "a", 1 << 20)).await.unwrap();

    let code = |r: Result<tonic::Response<proto::Vdi>, tonic::Status>| r.unwrap_err().code();
    assert_eq!(
        code(c.vdi_create(create("", "b", 512)).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.vdi_create(create("nosuch", "b", 512)).await),
        Code::NotFound
    );
    assert_eq!(
        code(c.vdi_create(create("local", "a", 512)).await),
        Code::AlreadyExists
    );
    assert_eq!(
        code(c.vdi_create(create("local", "b", 1000)).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.vdi_show(proto::VdiRef { vdi: "a".into() }).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.vdi_show(proto::VdiRef { vdi: "zz".into() }).await),
        Code::NotFound
    );
    let a = c
        .vdi_show(proto::VdiRef {
            vdi: "other/a".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.sr_name, "other");
    let by_uuid = c
        .vdi_show(proto::VdiRef {
            vdi: a.uuid.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_uuid.sr_name, "other");

    // Shrink without opt-in, revert to a foreign snapshot: failed preconditions.
    let resize = proto::VdiResizeRequest {
        vdi: "local/a".into(),
        size: 512,
        allow_shrink: false,
    };
    assert_eq!(code(c.vdi_resize(resize).await), Code::FailedPrecondition);
    c.vdi_snapshot(proto::VdiSnapshotRequest {
        vdi: "other/a".into(),
        name: "s".into(),
    })
    .await
    .unwrap();
    let revert = proto::VdiRevertRequest {
        vdi: "local/a".into(),
        snapshot: "other/s".into(),
    };
    assert_eq!(code(c.vdi_revert(revert).await), Code::FailedPrecondition);

    // Changed blocks: both sides required, a snapshot from another SR or a VDI as the base refused, and a
    // snapshot against its own VDI answered.
    let diff = |vdi: &str, from: &str| proto::VdiDiffRequest {
        vdi: vdi.into(),
        from: from.into(),
    };
    for (vdi, from, want) in [
        ("", "s", Code::InvalidArgument),
        ("other/a", "", Code::InvalidArgument),
        ("local/a", "other/s", Code::FailedPrecondition),
        ("other/s", "other/a", Code::FailedPrecondition),
        ("other/a", "nosuch", Code::NotFound),
    ] {
        let st = c.vdi_diff(diff(vdi, from)).await.unwrap_err();
        assert_eq!(st.code(), want, "diff '{vdi}' --from '{from}': {st:?}");
    }
    let d = c.vdi_diff(diff("other/a", "s")).await.unwrap().into_inner();
    assert_eq!((d.size, d.granularity, d.changed_bytes), (1 << 20, 4096, 0));
    assert_eq!(d.from.map(|f| f.name), Some("s".to_string()));

    // A full SR is RESOURCE_EXHAUSTED, naming the SR.
    c.vdi_create(create("other", "big", 4 << 20)).await.unwrap();
    let w = proto::VdiWriteRequest {
        vdi: "other/big".into(),
        offset: 0,
        data: vec![1; 2 << 20],
        flush: true,
    };
    let st = c.vdi_write(w).await.unwrap_err();
    assert_eq!(st.code(), Code::ResourceExhausted, "{st:?}");
    assert!(
        st.message().contains("SR 'other' is full"),
        "{}",
        st.message()
    );

    // Unaligned scripted I/O round-trips.
    let w = proto::VdiWriteRequest {
        vdi: "local/a".into(),
        offset: 3,
        data: b"hello".to_vec(),
        flush: true,
    };
    c.vdi_write(w).await.unwrap();
    let r = c
        .vdi_read(proto::VdiReadRequest {
            vdi: "local/a".into(),
            offset: 0,
            length: 9,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.data, b"\0\0\0hello\0");

    // The host hands volumes to other front ends as BlockDevices.
    let (_, dev) = host.open_volume("local/a").await.unwrap();
    assert_eq!(dev.size(), 1 << 20);
    let exports: Vec<String> = host.exports().await.into_iter().map(|e| e.0).collect();
    assert!(exports.contains(&"other/s".to_string()), "{exports:?}");

    // Detach and attach: an open volume makes its SR busy (FAILED_PRECONDITION); a detached SR's objects are
    // UNAVAILABLE and not exported; attaching brings them back.
    let sr_ref = |sr: &str| proto::SrRef { sr: sr.into() };
    let st = c.sr_detach(sr_ref("local")).await.unwrap_err();
    assert_eq!(st.code(), Code::FailedPrecondition, "{st:?}");
    assert!(st.message().contains("'a' is open"), "{}", st.message());
    drop(dev);
    assert_eq!(
        c.sr_detach(sr_ref("")).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(
        c.sr_attach(sr_ref("nosuch")).await.unwrap_err().code(),
        Code::NotFound
    );
    let sr = c.sr_detach(sr_ref("other")).await.unwrap().into_inner();
    assert!(sr.status.starts_with("detached"), "{}", sr.status);
    assert_eq!(
        code(
            c.vdi_show(proto::VdiRef {
                vdi: "other/a".into()
            })
            .await
        ),
        Code::Unavailable
    );
    let exports: Vec<String> = host.exports().await.into_iter().map(|e| e.0).collect();
    assert_eq!(exports, ["local/a"]);
    let sr = c.sr_attach(sr_ref("other")).await.unwrap().into_inner();
    assert_eq!(sr.status, "attached");
    assert_eq!((sr.vdis, sr.snapshots), (2, 1));

    let destroy = proto::SrDestroyRequest {
        sr: "other".into(),
        force: false,
    };
    assert_eq!(
        c.sr_destroy(destroy).await.unwrap_err().code(),
        Code::FailedPrecondition
    );

    drop(c);
    let _ = stop.send(());
    task.await.unwrap();
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_sr_is_reported_then_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let gone = dir.path().join("gone");
    {
        let host = Host::open(&state, drivers()).await.unwrap();
        host.sr_create("gone", "thin", &gone, &Default::default())
            .await
            .unwrap();
        host.vdi_create(Some("gone"), "v", 1 << 20).await.unwrap();
        host.shutdown().await;
    }
    std::fs::remove_dir_all(&gone).unwrap();

    // Reopen: the default SR is not recreated, and the missing SR is listed as unavailable.
    let host = Host::open(&state, drivers()).await.unwrap();
    let list = host.sr_list().await;
    assert_eq!(list.len(), 2);
    let g = list.iter().find(|s| s.record.name == "gone").unwrap();
    assert!(g.unavailable.is_some());
    let e = host.vdi_create(Some("gone"), "w", 512).await.unwrap_err();
    assert!(e.to_string().contains("unavailable"), "{e}");
    // Other SRs keep working, and a bare name never resolves into the missing SR.
    host.vdi_create(Some("local"), "v", 512).await.unwrap();
    host.vdi_show("v").await.unwrap();
    assert!(host.sr_destroy("gone", false).await.is_err());
    host.sr_destroy("gone", true).await.unwrap();
    assert_eq!(host.sr_list().await.len(), 1);
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_registry_adopts_the_default_sr() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    {
        let host = Host::open(&state, drivers()).await.unwrap();
        host.vdi_create(None, "keep", 1 << 20).await.unwrap();
        host.shutdown().await;
    }
    std::fs::remove_file(state.join("registry.json")).unwrap();
    let host = Host::open(&state, drivers()).await.unwrap();
    let v = host.vdi_show("local/keep").await.unwrap();
    assert_eq!(v.info.size, 1 << 20);
    host.shutdown().await;
}
