//! In-process tests of the proxy's registry handling, through its mirror endpoint: the real
//! dev server as the registry (HTTPS, with its own CA) and an in-memory mesh of our own
//! [`MeshBlobs`] interface, so every outcome — bytes, statuses, who was asked — is countable.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use sha2::Digest;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::*;
use crate::blobs::{Blob, BlobError, BlobRequest, BlobSource};
use crate::devserver::{DevCa, DevServer, Fault};
use crate::metrics::Role;

/// A blob's bytes, and where the mesh breaks off reading it.
type Stored = (Bytes, Option<u64>);

/// The mesh: blobs by digest, each optionally cut (an error) after some bytes.
#[derive(Default)]
struct MemMesh {
    blobs: Mutex<HashMap<[u8; 32], Stored>>,
    opens: AtomicUsize,
    requests: Mutex<Vec<BlobRequest>>,
}

struct Mesh(Arc<MemMesh>);

impl MeshBlobs for Mesh {
    fn open(
        &self,
        req: BlobRequest,
    ) -> Pin<Box<dyn Future<Output = Result<Blob, BlobError>> + Send + 'static>> {
        let m = self.0.clone();
        Box::pin(async move {
            m.opens.fetch_add(1, Ordering::SeqCst);
            m.requests.lock().unwrap().push(req.clone());
            let found = m.blobs.lock().unwrap().get(&req.digest).cloned();
            let (data, cut) = found.ok_or_else(|| BlobError::Mesh("no such blob".into()))?;
            Ok(Blob::new(
                data.len() as u64,
                req.digest,
                true,
                Box::new(MemSource { data, cut }),
            ))
        })
    }
}

struct MemSource {
    data: Bytes,
    cut: Option<u64>,
}

impl BlobSource for MemSource {
    fn read(
        &self,
        range: Range<u64>,
        tx: mpsc::Sender<Result<Bytes, BlobError>>,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        let (data, cut) = (self.data.clone(), self.cut);
        Box::pin(async move {
            let mut at = range.start;
            while at < range.end {
                if cut.is_some_and(|c| at >= c) {
                    let _ = tx
                        .send(Err(BlobError::Mesh("parent vanished".into())))
                        .await;
                    return;
                }
                let end = (at + 65536).min(range.end);
                if tx
                    .send(Ok(data.slice(at as usize..end as usize)))
                    .await
                    .is_err()
                {
                    return;
                }
                at = end;
            }
        })
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    root: PathBuf,
    registry: DevServer,
    proxy: SocketAddr,
    mesh: Arc<MemMesh>,
    metrics: Arc<Metrics>,
    ca_pem: String,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("registry");
    std::fs::create_dir_all(&root).unwrap();
    let ca = DevCa::new();
    let ca_file = dir.path().join("registry-ca.pem");
    ca.write_pem(&ca_file).unwrap();
    let registry = DevServer::start(root.clone(), "127.0.0.1:0".parse().unwrap(), Some(&ca))
        .await
        .unwrap();
    let mesh = Arc::new(MemMesh::default());
    let metrics = Arc::new(Metrics::new(Role::Daemon));
    let proxy = Proxy::new(
        ProxyConfig {
            registries: Vec::new(),
            ca_dir: dir.path().join("proxy-ca"),
            origin_ca: vec![ca_file],
            mirror_upstream: registry.addr().to_string(),
            // The dev registry listens on loopback.
            allow: vec!["127.0.0.0/8".parse().unwrap()],
            own: Vec::new(),
            serve_metrics: true,
        },
        Arc::new(Mesh(mesh.clone())),
        metrics.clone(),
    )
    .unwrap();
    let ca_pem = proxy.ca_pem().to_string();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(listener, proxy, std::future::pending()));
    Setup {
        _dir: dir,
        root,
        registry,
        proxy: addr,
        mesh,
        metrics,
        ca_pem,
    }
}

impl Setup {
    /// A blob of `len` bytes in the registry, and in the mesh when `in_mesh`; its path.
    fn blob(&self, len: usize, seed: u8, in_mesh: Option<Option<u64>>) -> (String, Bytes) {
        let data: Vec<u8> = (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect();
        let digest: [u8; 32] = sha2::Sha256::digest(&data).into();
        let path = format!("/v2/lib/app/blobs/{}", crate::task::format_digest(&digest));
        let file = self.root.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, &data).unwrap();
        let data = Bytes::from(data);
        if let Some(cut) = in_mesh {
            self.mesh
                .blobs
                .lock()
                .unwrap()
                .insert(digest, (data.clone(), cut));
        }
        (path, data)
    }

    async fn get(
        &self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (StatusCode, HeaderMap, Result<Bytes, String>) {
        let stream = TcpStream::connect(self.proxy).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut req = Request::get(path).header(header::HOST, "mirror");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = sender
            .send_request(req.body(Empty::<Bytes>::new()).unwrap())
            .await
            .unwrap();
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .map(|c| c.to_bytes())
            .map_err(|e| e.to_string());
        (parts.status, parts.headers, body)
    }

    fn count(&self, kind: ProxyKind) -> u64 {
        self.metrics.proxy_requests(kind).value()
    }
}

#[tokio::test]
async fn blobs_come_from_the_mesh_with_ranges() {
    let s = setup().await;
    let (path, data) = s.blob(300_000, 1, Some(None));
    let (status, headers, body) = s.get(&path, &[("authorization", "Bearer t1")]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.unwrap(), data);
    assert_eq!(
        headers["docker-content-digest"].to_str().unwrap(),
        path.rsplit('/').next().unwrap()
    );
    assert_eq!(headers[header::CONTENT_LENGTH], "300000");
    assert_eq!(headers[header::ACCEPT_RANGES], "bytes");
    // The registry was asked (HEAD) but sent no bytes; the mesh was given the registry's URL
    // and the client's credentials.
    assert_eq!(s.registry.get_count(&path), 0);
    assert_eq!(s.registry.body_bytes_sent(), 0);
    {
        let reqs = s.mesh.requests.lock().unwrap();
        assert_eq!(reqs[0].url, format!("https://{}{path}", s.registry.addr()));
        assert_eq!(
            reqs[0].headers,
            vec![("Authorization".to_string(), "Bearer t1".to_string())]
        );
    }

    let (status, headers, body) = s.get(&path, &[("range", "bytes=10-19")]).await;
    assert_eq!(status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(body.unwrap(), data.slice(10..20));
    assert_eq!(headers[header::CONTENT_RANGE], "bytes 10-19/300000");
    let (status, _, body) = s.get(&path, &[("range", "bytes=-5")]).await;
    assert_eq!(status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(body.unwrap(), data.slice(299_995..));
    let (status, headers, _) = s.get(&path, &[("range", "bytes=300000-")]).await;
    assert_eq!(status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(headers[header::CONTENT_RANGE], "bytes */300000");
    assert_eq!(s.count(ProxyKind::BlobMesh), 3);
    assert_eq!(s.metrics.proxy_blob_bytes().value(), 300_000 + 10 + 5);
    assert_eq!(s.registry.get_count(&path), 0);
}

#[tokio::test]
async fn a_refused_client_gets_the_registry_answer_and_no_bytes() {
    let s = setup().await;
    let (path, data) = s.blob(5000, 2, Some(None));
    s.registry
        .set_fault(&path, Fault::RequireAuth("Basic Zm9vOmJhcg==".into()));
    let (status, headers, body) = s.get(&path, &[]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(headers[header::WWW_AUTHENTICATE], "Basic realm=\"d7q-dev\"");
    assert!(!body
        .unwrap()
        .windows(16)
        .any(|w| data.windows(16).any(|d| d == w)));
    let (status, _, _) = s.get(&path, &[("authorization", "Basic d3Jvbmc=")]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(s.mesh.opens.load(Ordering::SeqCst), 0, "mesh never asked");
    assert_eq!(s.count(ProxyKind::Denied), 2);

    let (status, _, body) = s
        .get(&path, &[("authorization", "Basic Zm9vOmJhcg==")])
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.unwrap(), data);
    assert_eq!(s.mesh.opens.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn mesh_failures_fall_back_or_abort_the_body() {
    let s = setup().await;
    // Not in the mesh: the registry serves it.
    let (path, data) = s.blob(70_000, 3, None);
    let (status, _, body) = s.get(&path, &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.unwrap(), data);
    assert_eq!(s.count(ProxyKind::BlobDirect), 1);
    assert_eq!(s.registry.get_count(&path), 1);

    // The mesh breaks after 100 000 bytes: the client sees a failed body, not a short one.
    let (path, _) = s.blob(400_000, 4, Some(Some(100_000)));
    let (status, _, body) = s.get(&path, &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.is_err(), "a cut body must fail");
}

#[tokio::test]
async fn passthrough_ca_health_and_unknown_paths() {
    let s = setup().await;
    let manifest = s.root.join("v2/lib/app/manifests");
    std::fs::create_dir_all(&manifest).unwrap();
    std::fs::write(manifest.join("latest"), b"{\"schemaVersion\":2}").unwrap();
    let ns = format!("/v2/lib/app/manifests/latest?ns={}", s.registry.addr());
    let (status, _, body) = s.get(&ns, &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(&body.unwrap()[..], b"{\"schemaVersion\":2}");
    assert_eq!(s.registry.get_count("/v2/lib/app/manifests/latest"), 1);
    assert_eq!(s.count(ProxyKind::Passthrough), 1);
    // containerd escapes the value: `ns=host%3Aport`.
    let escaped = format!(
        "/v2/lib/app/manifests/latest?ns={}",
        s.registry.addr().to_string().replace(':', "%3A")
    );
    let (status, _, _) = s.get(&escaped, &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(s.registry.get_count("/v2/lib/app/manifests/latest"), 2);
    let (status, _, _) = s.get("/v2/lib/app/manifests/latest?ns=bad%3", &[]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let (status, headers, body) = s.get("/ca.crt", &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[header::CONTENT_TYPE], "application/x-pem-file");
    assert_eq!(body.unwrap(), s.ca_pem.as_bytes());
    assert!(s.ca_pem.starts_with("-----BEGIN CERTIFICATE-----"));
    let (status, _, body) = s.get("/health", &[]).await;
    assert_eq!((status, &body.unwrap()[..]), (StatusCode::OK, &b"ok\n"[..]));
    let (status, _, body) = s.get("/metrics", &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert!(String::from_utf8_lossy(&body.unwrap())
        .contains("d7q_proxy_requests_total{kind=\"passthrough\"} 2\n"));
    assert_eq!(s.get("/nope", &[]).await.0, StatusCode::NOT_FOUND);
    assert_eq!(
        s.get("/v2/x?ns=bad_host!", &[]).await.0,
        StatusCode::BAD_REQUEST
    );
}

/// Protocol detection on an intercepted connection reads what it needs and no more, and gives
/// it back: an HTTP/1.1 request after its first read, the HTTP/2 preface once whole; a client
/// that stops inside the preface (or sends nothing) leaves it waiting, which is why `intercept`
/// runs it under [`HEADER_READ_TIMEOUT`].
#[tokio::test]
async fn first_bytes_read_what_detection_needs_within_the_deadline() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let (mut client, mut server) = tokio::io::duplex(1024);
    client
        .write_all(b"GET /v2/ HTTP/1.1\r\nHost: r\r\n\r\n")
        .await
        .unwrap();
    let head = first_bytes(&mut server).await.unwrap();
    assert!(head.starts_with(b"GET"), "{head:?}");
    let mut replayed = Prefixed {
        head,
        at: 0,
        inner: server,
    };
    drop(client);
    let mut all = Vec::new();
    replayed.read_to_end(&mut all).await.unwrap();
    assert_eq!(all, b"GET /v2/ HTTP/1.1\r\nHost: r\r\n\r\n");

    let (mut client, mut server) = tokio::io::duplex(1024);
    client.write_all(&H2_PREFACE[..5]).await.unwrap();
    client.write_all(&H2_PREFACE[5..]).await.unwrap();
    client.write_all(b"frames").await.unwrap();
    assert_eq!(first_bytes(&mut server).await.unwrap(), H2_PREFACE);

    for sent in [&H2_PREFACE[..3], b"".as_slice()] {
        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(sent).await.unwrap();
        let waited =
            tokio::time::timeout(Duration::from_millis(200), first_bytes(&mut server)).await;
        assert!(waited.is_err(), "{sent:?}: {waited:?}");
        drop(client);
    }
}

/// An escape is `%` and exactly two hex digits: `u8::from_str_radix` alone also takes a sign,
/// and read containerd's `ns` value `%+f` as the byte 0x0f. Found while writing the
/// `proxy_paths` fuzz target; its input is in `fuzz/regressions/proxy_paths/`.
#[test]
fn percent_escapes_are_two_hex_digits() {
    assert_eq!(
        percent_decode("registry.example%3A5000").as_deref(),
        Some("registry.example:5000")
    );
    assert_eq!(percent_decode("%41%e2%82%ac").as_deref(), Some("A€"));
    for bad in ["%+f", "%+3A5000", "%-1", "%4", "%zz", "%e2%82"] {
        assert_eq!(percent_decode(bad), None, "{bad:?}");
    }
}
