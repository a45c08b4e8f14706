//! TLS for NBD: the `NBD_OPT_STARTTLS` upgrade, on both ends, with X.509 certificates.
//!
//! NBD carries TLS as an in-session upgrade (the spec's "TLS support"): the client sends `NBD_OPT_STARTTLS`
//! during option haggling, the server answers `NBD_REP_ACK`, and from the next byte on both sides speak TLS and
//! start haggling again. Remote VM disks and backups cross the network through NBD, and NBD itself has no
//! authentication, so this is what makes a TCP export safe off loopback: the server proves its identity with a
//! certificate, and with a client CA configured, only clients holding a certificate that CA signed get in.
//!
//! - [`ServerTls`]: the server's certificate and key, and optionally the CA its clients' certificates must chain
//!   to (mutual TLS). [`TlsPolicy`] says whether a listener *requires* TLS (the spec's FORCEDTLS: every option
//!   but `STARTTLS` and `ABORT` is refused with `NBD_REP_ERR_TLS_REQD`) or merely offers it.
//! - [`ClientTls`]: the CA the server's certificate must chain to, the name to check it against, and optionally a
//!   client certificate.
//!
//! Built on rustls (the `ring` provider), the maintained TLS stack for tokio; TLS 1.2 and 1.3, as the spec asks
//! (1.2 at least). The connections interoperate with qemu's and libnbd's GnuTLS (`tls-creds-x509`,
//! `nbds://`/`tls-certificates=`), which the end-to-end tests check. Pre-shared keys (qemu's `tls-creds-psk`)
//! are not offered: rustls has no TLS-PSK.
//!
//! The handshake phase reads through a buffer and the connection may already be split into a read and a write
//! half when `STARTTLS` arrives, so the upgrade joins the halves back into one stream (`Joined`) for the TLS
//! layer, after checking that the buffer holds nothing the client sent before its TLS handshake.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What can go wrong setting up TLS credentials or a TLS session.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    #[error("cannot read {what} from {path}: {source}")]
    Pem {
        /// Which credential ("certificate", "private key", "CA certificate").
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: rustls::pki_types::pem::Error,
    },
    /// A PEM file held no certificate.
    #[error("no certificate in {0}")]
    NoCertificate(PathBuf),
    /// rustls refused the credentials or the configuration (a key that does not match, an unusable CA).
    #[error("TLS configuration: {0}")]
    Config(String),
    /// The name a client checks the server's certificate against is not a valid DNS name or IP address.
    #[error("invalid TLS server name {0:?}")]
    ServerName(String),
    /// The peer refused to upgrade, or the TLS handshake failed (an untrusted or mismatched certificate).
    #[error("TLS handshake: {0}")]
    Handshake(String),
}

impl From<rustls::Error> for TlsError {
    fn from(e: rustls::Error) -> Self {
        match e {
            rustls::Error::InconsistentKeys(_) => {
                TlsError::Config("the private key is not the certificate's".into())
            }
            e => TlsError::Config(e.to_string()),
        }
    }
}

/// Whether a listener's connections must, may or cannot use TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsPolicy {
    /// No TLS: `NBD_OPT_STARTTLS` is refused with `NBD_REP_ERR_POLICY` (the spec's NOTLS).
    #[default]
    Off,
    /// TLS at the client's choice: `STARTTLS` upgrades, clients that do not ask are served in the clear.
    Offer,
    /// TLS first: until `STARTTLS`, every option but `ABORT` is refused with `NBD_REP_ERR_TLS_REQD` and
    /// `NBD_OPT_EXPORT_NAME` ends the connection (the spec's FORCEDTLS).
    Require,
}

/// The server's TLS credentials, shared by every connection (cheap to clone).
#[derive(Clone)]
pub struct ServerTls {
    acceptor: tokio_rustls::TlsAcceptor,
    client_auth: bool,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("client_auth", &self.client_auth)
            .finish_non_exhaustive()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate in a PEM file, in order (a certificate chain: leaf first).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = |source| TlsError::Pem {
        what: "certificate",
        path: path.to_path_buf(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(pem)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.to_path_buf()));
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| TlsError::Pem {
        what: "private key",
        path: path.to_path_buf(),
        source,
    })
}

fn root_store(cas: Vec<CertificateDer<'static>>) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in cas {
        roots.add(c)?;
    }
    Ok(roots)
}

impl ServerTls {
    /// Credentials from PEM files: the server's certificate chain and key, and optionally the CA certificates
    /// that clients' certificates must chain to (then clients without such a certificate are refused).
    pub fn from_pem_files(
        cert: &Path,
        key: &Path,
        client_ca: Option<&Path>,
    ) -> Result<Self, TlsError> {
        let cas = client_ca.map(load_certs).transpose()?;
        Self::new(load_certs(cert)?, load_key(key)?, cas)
    }

    /// Credentials from parsed certificates and key (see [`ServerTls::from_pem_files`]).
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        client_ca: Option<Vec<CertificateDer<'static>>>,
    ) -> Result<Self, TlsError> {
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?;
        let client_auth = client_ca.is_some();
        let builder = match client_ca {
            Some(cas) => {
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(root_store(cas)?),
                    provider(),
                )
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let config = builder.with_single_cert(chain, key)?;
        Ok(ServerTls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            client_auth,
        })
    }

    /// Whether clients must present a certificate.
    pub fn client_auth(&self) -> bool {
        self.client_auth
    }

    /// Run the server side of the TLS handshake on `stream`.
    pub(crate) async fn accept<S>(
        &self,
        stream: S,
    ) -> Result<tokio_rustls::server::TlsStream<S>, TlsError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        self.acceptor
            .accept(stream)
            .await
            .map_err(|e| TlsError::Handshake(e.to_string()))
    }
}

/// A client's TLS settings: whom to trust, what name to expect, and optionally its own certificate.
#[derive(Clone)]
pub struct ClientTls {
    connector: tokio_rustls::TlsConnector,
    server_name: Option<String>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Trust servers whose certificate chains to a CA in the PEM file `ca`; present the certificate and key in
    /// `identity` (PEM files) when the server asks for one.
    pub fn from_pem_files(ca: &Path, identity: Option<(&Path, &Path)>) -> Result<Self, TlsError> {
        let identity = match identity {
            Some((cert, key)) => Some((load_certs(cert)?, load_key(key)?)),
            None => None,
        };
        Self::new(load_certs(ca)?, identity)
    }

    /// [`ClientTls::from_pem_files`] from parsed certificates and key.
    pub fn new(
        ca: Vec<CertificateDer<'static>>,
        identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    ) -> Result<Self, TlsError> {
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(root_store(ca)?);
        let config = match identity {
            Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
            None => builder.with_no_client_auth(),
        };
        Ok(ClientTls {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            server_name: None,
        })
    }

    /// Check the server's certificate against `name` (a DNS name or IP address) instead of the host the client
    /// connects to. Needed for Unix sockets, which have no host; they default to `localhost`.
    pub fn with_server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }

    /// The name the server's certificate must carry for a connection to `host` (None: a Unix socket).
    pub(crate) fn name_for(&self, host: Option<&str>) -> Result<ServerName<'static>, TlsError> {
        let name = match (&self.server_name, host) {
            (Some(n), _) => n.clone(),
            (None, Some(h)) => h.to_string(),
            (None, None) => "localhost".to_string(),
        };
        ServerName::try_from(name.clone()).map_err(|_| TlsError::ServerName(name))
    }

    /// Run the client side of the TLS handshake on `stream`, checking the server's certificate against `name`.
    pub(crate) async fn connect<S>(
        &self,
        name: ServerName<'static>,
        stream: S,
    ) -> Result<tokio_rustls::client::TlsStream<S>, TlsError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        self.connector
            .connect(name, stream)
            .await
            .map_err(|e| TlsError::Handshake(e.to_string()))
    }
}

/// The host part of a `host:port` address, without the brackets of an IPv6 literal.
pub(crate) fn host_of(hostport: &str) -> &str {
    let host = match hostport.rfind(':') {
        Some(i) if !hostport[i..].contains(']') => &hostport[..i],
        _ => hostport,
    };
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

/// A read half and a write half as one stream, for the TLS layer (which needs both directions of one
/// stream) when the connection was split before `STARTTLS`.
pub(crate) struct Joined<R, W> {
    pub(crate) rd: R,
    pub(crate) wr: W,
}

impl<R: AsyncRead + Unpin, W: Unpin> AsyncRead for Joined<R, W> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().rd).poll_read(cx, buf)
    }
}

impl<R: Unpin, W: AsyncWrite + Unpin> AsyncWrite for Joined<R, W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().wr).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().wr).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.wr.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().wr).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().wr).poll_shutdown(cx)
    }
}

/// Throwaway certificates for tests: a CA, and leaves it signed for servers and clients.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose, SanType,
    };

    /// A certificate authority that signs test certificates.
    pub(crate) struct TestCa {
        cert: rcgen::Certificate,
        key: KeyPair,
    }

    /// A leaf certificate and its key, parsed and as PEM.
    pub(crate) struct Identity {
        pub(crate) chain: Vec<CertificateDer<'static>>,
        pub(crate) key: PrivateKeyDer<'static>,
        pub(crate) cert_pem: String,
        pub(crate) key_pem: String,
    }

    impl Identity {
        pub(crate) fn parts(&self) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
            (self.chain.clone(), self.key.clone_key())
        }
    }

    impl TestCa {
        pub(crate) fn new(name: &str) -> TestCa {
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.distinguished_name.push(DnType::CommonName, name);
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let key = KeyPair::generate().unwrap();
            let cert = p.self_signed(&key).unwrap();
            TestCa { cert, key }
        }

        pub(crate) fn cert(&self) -> CertificateDer<'static> {
            self.cert.der().clone()
        }

        pub(crate) fn cert_pem(&self) -> String {
            self.cert.pem()
        }

        fn leaf(&self, cn: &str, sans: &[&str], purpose: ExtendedKeyUsagePurpose) -> Identity {
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.distinguished_name.push(DnType::CommonName, cn);
            p.subject_alt_names = sans
                .iter()
                .map(|s| match s.parse() {
                    Ok(ip) => SanType::IpAddress(ip),
                    Err(_) => SanType::DnsName((*s).try_into().unwrap()),
                })
                .collect();
            p.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ];
            p.extended_key_usages = vec![purpose];
            let key = KeyPair::generate().unwrap();
            let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
            Identity {
                chain: vec![cert.der().clone()],
                key: PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
                cert_pem: cert.pem(),
                key_pem: key.serialize_pem(),
            }
        }

        /// A server certificate for `localhost` and 127.0.0.1.
        pub(crate) fn server(&self) -> Identity {
            self.leaf(
                "shale test server",
                &["localhost", "127.0.0.1"],
                ExtendedKeyUsagePurpose::ServerAuth,
            )
        }

        /// A client certificate.
        pub(crate) fn client(&self) -> Identity {
            self.leaf(
                "shale test client",
                &[],
                ExtendedKeyUsagePurpose::ClientAuth,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::TestCa;
    use super::*;

    #[test]
    fn host_of_strips_port_and_brackets() {
        assert_eq!(host_of("127.0.0.1:10809"), "127.0.0.1");
        assert_eq!(host_of("[::1]:10809"), "::1");
        assert_eq!(host_of("example.org:1"), "example.org");
        assert_eq!(host_of("example.org"), "example.org");
    }

    #[test]
    fn server_name_defaults_to_host_then_localhost() {
        let ca = TestCa::new("ca");
        let c = ClientTls::new(vec![ca.cert()], None).unwrap();
        assert_eq!(
            c.name_for(Some("127.0.0.1")).unwrap(),
            ServerName::try_from("127.0.0.1").unwrap()
        );
        assert_eq!(
            c.name_for(None).unwrap(),
            ServerName::try_from("localhost").unwrap()
        );
        let c = c.with_server_name("nbd.example");
        assert_eq!(
            c.name_for(Some("127.0.0.1")).unwrap(),
            ServerName::try_from("nbd.example").unwrap()
        );
        assert!(matches!(
            c.with_server_name("bad name!").name_for(None),
            Err(TlsError::ServerName(_))
        ));
    }

    #[test]
    fn pem_files_load_and_mismatched_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("ca");
        let server = ca.server();
        let other = ca.server();
        let write = |name: &str, pem: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, pem).unwrap();
            p
        };
        let cert = write("cert.pem", &server.cert_pem);
        let key = write("key.pem", &server.key_pem);
        let other_key = write("other.pem", &other.key_pem);
        let cacert = write("ca.pem", &ca.cert_pem());
        ServerTls::from_pem_files(&cert, &key, None).unwrap();
        assert!(ServerTls::from_pem_files(&cert, &key, Some(&cacert))
            .unwrap()
            .client_auth());
        ClientTls::from_pem_files(&cacert, Some((&cert, &key))).unwrap();
        // A key that is not the certificate's.
        assert!(matches!(
            ServerTls::from_pem_files(&cert, &other_key, None),
            Err(TlsError::Config(_))
        ));
        // A key file given as the certificate; a missing file.
        assert!(matches!(
            ServerTls::from_pem_files(&key, &key, None),
            Err(TlsError::NoCertificate(_))
        ));
        assert!(matches!(
            ServerTls::from_pem_files(&dir.path().join("nope"), &key, None),
            Err(TlsError::Pem { .. })
        ));
    }
}

/// Server and client together, in process: policies, certificates, and the protocol rules around `STARTTLS`.
#[cfg(test)]
mod end_to_end {
    use super::testing::TestCa;
    use super::*;
    use crate::file::FileDevice;
    use crate::nbd::codec::{self, ClientOption};
    use crate::nbd::proto::*;
    use crate::nbd::{
        ConnectOptions, Export, Listener, NbdAddr, NbdClient, NbdError, NbdServer, ServerConfig,
        ServerTlsConfig,
    };
    use crate::uring::{IoEngine, IoEngineConfig};
    use crate::{BlockDevice, IoBuf, WriteFlags};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    struct Setup {
        _dir: tempfile::TempDir,
        server: NbdServer,
        tcp: Listener,
        unix: Listener,
        ca: TestCa,
    }

    /// A server with `config` exporting `vol`, a 1 MiB file in `dir`.
    fn serving_vol(config: ServerConfig, dir: &tempfile::TempDir) -> NbdServer {
        let server = NbdServer::new(config);
        let path = dir.path().join("vol.raw");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let engine = IoEngine::new(IoEngineConfig::default()).unwrap();
        let dev = Arc::new(FileDevice::open(&path, false, engine).unwrap());
        server
            .add_export(Export::new("vol", dev as Arc<dyn BlockDevice>))
            .unwrap();
        server
    }

    /// A server exporting `vol` (1 MiB file) with TLS required on TCP and offered on the Unix socket; with
    /// `client_ca`, clients need a certificate from the setup's CA.
    async fn setup(client_ca: bool) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("shale test CA");
        let (chain, key) = ca.server().parts();
        let creds = ServerTls::new(chain, key, client_ca.then(|| vec![ca.cert()])).unwrap();
        let config = ServerConfig {
            tls: Some(ServerTlsConfig {
                creds,
                tcp: TlsPolicy::Require,
                unix: TlsPolicy::Offer,
            }),
            ..ServerConfig::default()
        };
        let server = serving_vol(config, &dir);
        let tcp = server.listen_tcp("127.0.0.1:0").await.unwrap();
        let unix = server
            .listen_unix(dir.path().join("nbd.sock"))
            .await
            .unwrap();
        Setup {
            _dir: dir,
            server,
            tcp,
            unix,
            ca,
        }
    }

    impl Setup {
        fn tcp_addr(&self) -> NbdAddr {
            NbdAddr::parse_uri(&self.tcp.uri("")).unwrap().0
        }
        fn unix_addr(&self) -> NbdAddr {
            NbdAddr::parse_uri(&self.unix.uri("")).unwrap().0
        }
        fn tls(&self) -> ConnectOptions {
            ConnectOptions {
                tls: Some(ClientTls::new(vec![self.ca.cert()], None).unwrap()),
                ..Default::default()
            }
        }
    }

    async fn round_trip(c: &NbdClient, seed: u8) {
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8 ^ seed).collect();
        c.write(4096, IoBuf::from_slice(&data), WriteFlags::FUA)
            .await
            .unwrap();
        c.flush().await.unwrap();
        let back = c.read(4096, IoBuf::zeroed(data.len())).await.unwrap();
        assert_eq!(&back[..], &data[..]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tls_required_on_tcp_offered_on_unix() {
        let s = setup(false).await;
        // TCP with TLS: full service, and the server shows the connection as TLS.
        let c = NbdClient::connect_with(&s.tcp_addr(), "vol", &s.tls())
            .await
            .unwrap();
        assert!(c.structured_replies() && c.has_block_status());
        round_trip(&c, 1).await;
        let conns = s.server.connections();
        assert!(conns.iter().all(|i| i.tls && i.structured), "{conns:?}");
        c.disconnect().await;

        // TCP without TLS: every option is refused with TLS_REQD, so the client cannot get an export.
        let e = NbdClient::connect(&s.tcp_addr(), "vol").await.unwrap_err();
        assert!(e.to_string().contains("requires TLS"), "{e}");

        // Listing exports: refused in the clear on TCP, answered over TLS.
        assert!(NbdClient::list_exports(&s.tcp_addr()).await.is_err());
        let list = NbdClient::list_exports_with(&s.tcp_addr(), &s.tls())
            .await
            .unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].0, "vol");

        // The Unix socket serves both.
        let plain = NbdClient::connect(&s.unix_addr(), "vol").await.unwrap();
        round_trip(&plain, 2).await;
        let tls = NbdClient::connect_with(&s.unix_addr(), "vol", &s.tls())
            .await
            .unwrap();
        round_trip(&tls, 3).await;
        let mut flags: Vec<bool> = s.server.connections().iter().map(|i| i.tls).collect();
        flags.sort();
        assert_eq!(flags, [false, true]);
        plain.disconnect().await;
        tls.disconnect().await;

        // nbds:// URIs need credentials; with them they connect, multi-conn included.
        let uri = s.tcp.uri("vol").replacen("nbd://", "nbds://", 1);
        assert!(matches!(
            NbdClient::connect_uri_with(&uri, &ConnectOptions::default()).await,
            Err(NbdError::BadUri { .. })
        ));
        assert!(NbdClient::connect_uri(&uri).await.is_err());
        let opts = ConnectOptions {
            connections: 2,
            ..s.tls()
        };
        let m = NbdClient::connect_uri_with(&uri, &opts).await.unwrap();
        assert_eq!(m.connections(), 2);
        round_trip(&m, 4).await;
        m.disconnect().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn untrusted_or_misnamed_certificates_are_refused() {
        let s = setup(false).await;
        // A client that trusts another CA.
        let other = TestCa::new("another CA");
        let opts = ConnectOptions {
            tls: Some(ClientTls::new(vec![other.cert()], None).unwrap()),
            ..Default::default()
        };
        let e = NbdClient::connect_with(&s.tcp_addr(), "vol", &opts)
            .await
            .unwrap_err();
        assert!(matches!(e, NbdError::Tls(TlsError::Handshake(_))), "{e}");
        // The right CA, the wrong name (the certificate is for localhost and 127.0.0.1).
        let opts = ConnectOptions {
            tls: Some(
                ClientTls::new(vec![s.ca.cert()], None)
                    .unwrap()
                    .with_server_name("nbd.example.org"),
            ),
            ..Default::default()
        };
        let e = NbdClient::connect_with(&s.tcp_addr(), "vol", &opts)
            .await
            .unwrap_err();
        assert!(matches!(e, NbdError::Tls(TlsError::Handshake(_))), "{e}");
        // The server lives on.
        let c = NbdClient::connect_with(&s.tcp_addr(), "vol", &s.tls())
            .await
            .unwrap();
        round_trip(&c, 5).await;
        c.disconnect().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn client_certificates_when_the_server_asks() {
        let s = setup(true).await;
        // No certificate.
        assert!(NbdClient::connect_with(&s.tcp_addr(), "vol", &s.tls())
            .await
            .is_err());
        // A certificate from another CA.
        let other = TestCa::new("another CA");
        let opts = |ident: super::testing::Identity| ConnectOptions {
            tls: Some(ClientTls::new(vec![s.ca.cert()], Some(ident.parts())).unwrap()),
            ..Default::default()
        };
        assert!(
            NbdClient::connect_with(&s.tcp_addr(), "vol", &opts(other.client()))
                .await
                .is_err()
        );
        // One from the server's client CA.
        let c = NbdClient::connect_with(&s.tcp_addr(), "vol", &opts(s.ca.client()))
            .await
            .unwrap();
        round_trip(&c, 6).await;
        c.disconnect().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_asking_for_tls_from_a_server_without_it_stops() {
        let dir = tempfile::tempdir().unwrap();
        let server = serving_vol(ServerConfig::default(), &dir);
        let l = server.listen_tcp("127.0.0.1:0").await.unwrap();
        let addr = NbdAddr::parse_uri(&l.uri("")).unwrap().0;
        let ca = TestCa::new("ca");
        let opts = ConnectOptions {
            tls: Some(ClientTls::new(vec![ca.cert()], None).unwrap()),
            ..Default::default()
        };
        let e = NbdClient::connect_with(&addr, "vol", &opts)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("refused STARTTLS"), "{e}");
    }

    /// A raw client: greeting read, fixed newstyle + no zeroes sent.
    async fn raw(s: &Setup) -> TcpStream {
        let addr = s.tcp.local_addr().to_string();
        let mut t = TcpStream::connect(addr.trim_start_matches("tcp:"))
            .await
            .unwrap();
        let mut g = [0u8; GREETING_LEN];
        t.read_exact(&mut g).await.unwrap();
        t.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
            .await
            .unwrap();
        t
    }

    async fn send<S: AsyncWriteExt + Unpin>(t: &mut S, opt: &ClientOption) {
        let mut v = Vec::new();
        codec::encode_option(opt, &mut v);
        t.write_all(&v).await.unwrap();
    }

    /// The next option reply's type (its payload skipped).
    async fn reply<S: AsyncReadExt + Unpin>(t: &mut S) -> std::io::Result<u32> {
        let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
        t.read_exact(&mut h).await?;
        let h = codec::decode_option_reply_header(&h).unwrap();
        let mut p = vec![0u8; h.length as usize];
        t.read_exact(&mut p).await?;
        Ok(h.reply_type)
    }

    /// Whether the server closes the connection within 10 s (whatever it sends first, a TLS alert say).
    async fn closed<S: AsyncReadExt + Unpin>(t: &mut S) -> bool {
        let mut b = [0u8; 512];
        let eof = async {
            loop {
                match t.read(&mut b).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), eof)
            .await
            .is_ok()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn forced_tls_follows_the_spec() {
        let s = setup(false).await;
        // Options before STARTTLS: TLS_REQD, and the session goes on; ABORT is still answered.
        let mut t = raw(&s).await;
        send(&mut t, &ClientOption::List).await;
        assert_eq!(reply(&mut t).await.unwrap(), REP_ERR_TLS_REQD);
        send(&mut t, &ClientOption::StructuredReply).await;
        assert_eq!(reply(&mut t).await.unwrap(), REP_ERR_TLS_REQD);
        send(&mut t, &ClientOption::Abort).await;
        assert_eq!(reply(&mut t).await.unwrap(), REP_ACK);

        // EXPORT_NAME cannot be refused: the server hangs up.
        let mut t = raw(&s).await;
        send(&mut t, &ClientOption::ExportName("vol".into())).await;
        assert!(closed(&mut t).await);

        // Cleartext sent right behind STARTTLS (before the ACK) ends the connection.
        let mut t = raw(&s).await;
        let mut v = Vec::new();
        codec::encode_option(&ClientOption::StartTls, &mut v);
        codec::encode_option(&ClientOption::List, &mut v);
        t.write_all(&v).await.unwrap();
        assert_eq!(reply(&mut t).await.unwrap(), REP_ACK);
        assert!(closed(&mut t).await);

        // Over TLS: options work, a second STARTTLS is INVALID, nothing negotiated before TLS carries over.
        let mut t = raw(&s).await;
        send(&mut t, &ClientOption::StartTls).await;
        assert_eq!(reply(&mut t).await.unwrap(), REP_ACK);
        let c = ClientTls::new(vec![s.ca.cert()], None).unwrap();
        let mut t = c
            .connect(c.name_for(Some("127.0.0.1")).unwrap(), t)
            .await
            .unwrap();
        send(&mut t, &ClientOption::StartTls).await;
        assert_eq!(reply(&mut t).await.unwrap(), REP_ERR_INVALID);
        send(&mut t, &ClientOption::List).await;
        assert_eq!(reply(&mut t).await.unwrap(), REP_SERVER);
        assert_eq!(reply(&mut t).await.unwrap(), REP_ACK);
        send(&mut t, &ClientOption::Abort).await;
        assert_eq!(reply(&mut t).await.unwrap(), REP_ACK);

        // A TLS handshake that goes wrong (garbage instead of a ClientHello) costs only its connection.
        let mut t = raw(&s).await;
        send(&mut t, &ClientOption::StartTls).await;
        assert_eq!(reply(&mut t).await.unwrap(), REP_ACK);
        t.write_all(&[0x16, 0x03, 0x01, 0xff, 0xff, 1, 2, 3])
            .await
            .unwrap();
        t.write_all(&[0u8; 4096]).await.unwrap_or(());
        assert!(closed(&mut t).await);
        let c = NbdClient::connect_with(&s.tcp_addr(), "vol", &s.tls())
            .await
            .unwrap();
        round_trip(&c, 7).await;
        c.disconnect().await;
    }
}
