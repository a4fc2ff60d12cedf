//! The admin API: HTTP/3 on the mesh port (ALPN `h3`), read-only: `/health` and `/status`
//! (the node and its tasks with their progress, as JSON). `d7q status` is its client.
//!
//! Clients need no certificate for `/health` and the node part of `/status`. The task list
//! (URLs, repositories in them, digests, task ids derived from digests) goes only to a client
//! that presented a certificate of the cluster CA; anyone else gets the node and a count, with
//! `"redacted": true`. The mesh itself always requires a certificate.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes};
use d7q_wire::Labels;
use http::{Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use tracing::debug;

use crate::pki::{self, NodeIdentity};
use crate::transport;

/// Requests served at once on one admin connection.
pub const MAX_ADMIN_REQUESTS: usize = 16;
/// Largest status document a client accepts.
pub const MAX_STATUS_BYTES: usize = 16 << 20;
/// How long `d7q status` waits for an answer.
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the server waits for the rest of a request it has answered.
pub const REQUEST_DRAIN: Duration = Duration::from_secs(2);
/// Request body bytes the server reads (and throws away) after answering.
pub const MAX_REQUEST_BODY: usize = 64 << 10;

/// The node part of a status document.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeStatus {
    /// "supernode" or "daemon".
    pub role: String,
    /// Node id, hex.
    pub node_id: String,
    /// Locality labels.
    pub labels: Labels,
    /// Seconds since start.
    pub uptime_secs: u64,
}

/// One task in a status document.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TaskStatus {
    /// Task id, hex.
    pub id: String,
    /// URL without query.
    pub url: String,
    /// Content length, once known.
    pub length: Option<u64>,
    /// Piece count, once known.
    pub piece_count: Option<u32>,
    /// Pieces stored and verified.
    pub pieces_done: u32,
    /// "seeding", "complete" or "failed".
    pub state: String,
    /// SHA-256 of the content when complete.
    pub sha256: Option<String>,
}

/// A status document.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    /// The node.
    pub node: NodeStatus,
    /// Its tasks.
    pub tasks: Vec<TaskStatus>,
}

/// What a client without a cluster certificate is told: the node and how many tasks it holds,
/// nothing that names content.
#[derive(Serialize)]
struct RedactedStatus<'a> {
    node: &'a NodeStatus,
    tasks: [TaskStatus; 0],
    tasks_hidden: usize,
    redacted: bool,
}

/// The key of a status document that says its task list was withheld.
pub const REDACTED_KEY: &str = "redacted";

/// Something that can describe itself.
pub trait StatusSource: Send + Sync + 'static {
    /// The current status.
    fn status(&self) -> Status;
}

/// Serves admin requests on an accepted `h3` connection.
pub async fn serve<S: StatusSource>(conn: quinn::Connection, source: Arc<S>) {
    // The TLS layer verified any certificate presented against the cluster CA; admin clients
    // may present none.
    let member = transport::has_peer_certificate(&conn);
    let mut h3 =
        match h3::server::Connection::<_, Bytes>::new(h3_quinn::Connection::new(conn)).await {
            Ok(c) => c,
            Err(e) => {
                debug!(error = %e, "admin connection failed");
                return;
            }
        };
    let limit = Arc::new(tokio::sync::Semaphore::new(MAX_ADMIN_REQUESTS));
    while let Ok(Some(resolver)) = h3.accept().await {
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            continue;
        };
        let source = source.clone();
        tokio::spawn(async move {
            let Ok((req, mut stream)) = resolver.resolve_request().await else {
                return;
            };
            let (status, body) = route(&req, &*source, member);
            let resp = Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(())
                .expect("static response parts");
            if stream.send_response(resp).await.is_ok() {
                let _ = stream.send_data(Bytes::from(body)).await;
                let _ = stream.finish().await;
            }
            // Read the request to its end before the stream goes: dropping it unread asks the
            // client to stop sending, and a client still finishing its request then sees its
            // request reset (RFC 9114 §4.1 allows that; not every client copes). Bounded, as
            // everything a client controls.
            let _ = tokio::time::timeout(REQUEST_DRAIN, async {
                let mut left = MAX_REQUEST_BODY;
                while let Ok(Some(chunk)) = stream.recv_data().await {
                    left = left.saturating_sub(chunk.remaining());
                    if left == 0 {
                        break;
                    }
                }
            })
            .await;
            drop(permit);
        });
    }
}

/// Answers one request; `member` says whether the client holds a cluster certificate.
fn route<S: StatusSource>(req: &Request<()>, source: &S, member: bool) -> (StatusCode, Vec<u8>) {
    if req.method() != http::Method::GET {
        return (
            StatusCode::METHOD_NOT_ALLOWED,
            b"{\"error\":\"GET only\"}".to_vec(),
        );
    }
    match req.uri().path() {
        "/health" => (StatusCode::OK, b"{\"status\":\"ok\"}".to_vec()),
        "/status" | "/tasks" => {
            let status = source.status();
            let body = if member {
                serde_json::to_vec(&status)
            } else {
                serde_json::to_vec(&RedactedStatus {
                    node: &status.node,
                    tasks: [],
                    tasks_hidden: status.tasks.len(),
                    redacted: true,
                })
            };
            (StatusCode::OK, body.expect("status serializes"))
        }
        _ => (StatusCode::NOT_FOUND, b"{\"error\":\"not found\"}".to_vec()),
    }
}

/// Fetches `path` from a node's admin API.
///
/// With an identity, the node's certificate is verified against the cluster CA; without one,
/// the connection is made with `DangerAcceptAnyServer` — acceptable only because the API is
/// read-only and its answer is merely displayed.
pub async fn fetch(
    addr: SocketAddr,
    path: &str,
    identity: Option<&NodeIdentity>,
) -> anyhow::Result<Vec<u8>> {
    let tls = match identity {
        Some(id) => id.client_config(&[d7q_wire::ADMIN_ALPN])?,
        None => {
            let mut cfg = rustls::ClientConfig::builder_with_provider(pki::provider())
                .with_protocol_versions(&[&rustls::version::TLS13])?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(DangerAcceptAnyServer))
                .with_no_client_auth();
            cfg.alpn_protocols = vec![d7q_wire::ADMIN_ALPN.to_vec()];
            cfg
        }
    };
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()?;
    let ep = quinn::Endpoint::client(bind)?;
    let work = async {
        let conn =
            transport::connect_with(&ep, addr, Some(quinn::ClientConfig::new(Arc::new(crypto))))
                .await?;
        let (mut driver, mut send) = h3::client::new(h3_quinn::Connection::new(conn)).await?;
        let drive =
            tokio::spawn(async move { std::future::poll_fn(|cx| driver.poll_close(cx)).await });
        let req = Request::get(format!("https://{}{path}", pki::MESH_SERVER_NAME)).body(())?;
        let got = match send.send_request(req).await {
            Ok(stream) => answer(stream).await,
            Err(e) => Err(e.into()),
        };
        drive.abort();
        let (status, body) = got?;
        if !status.is_success() {
            anyhow::bail!("{addr} answered {status} for {path}");
        }
        Ok(body)
    };
    let out = tokio::time::timeout(STATUS_TIMEOUT, work)
        .await
        .map_err(|_| anyhow::anyhow!("{addr}: no answer from the admin API in time"))?;
    ep.close(transport::close::DONE, b"");
    out
}

/// Ends a sent request and reads its answer, at most [`MAX_STATUS_BYTES`] of body.
///
/// A server may answer before it has read the request's end and then stop reading it
/// (RFC 9114 §4.1: a client must not discard a complete response because its request was cut
/// short), so a failed finish is not an error: the answer, or the lack of one, says what
/// happened.
async fn answer(
    mut stream: h3::client::RequestStream<h3_quinn::BidiStream<Bytes>, Bytes>,
) -> anyhow::Result<(StatusCode, Vec<u8>)> {
    let _ = stream.finish().await;
    let resp = stream.recv_response().await?;
    let mut body = Vec::new();
    while let Some(mut chunk) = stream.recv_data().await? {
        if body.len() + chunk.remaining() > MAX_STATUS_BYTES {
            anyhow::bail!("status answer larger than {MAX_STATUS_BYTES} bytes");
        }
        while chunk.has_remaining() {
            let c = chunk.chunk();
            body.extend_from_slice(c);
            let n = c.len();
            chunk.advance(n);
        }
    }
    Ok((resp.status(), body))
}

/// Accepts any server certificate. Only for the read-only admin client without an identity.
#[derive(Debug)]
struct DangerAcceptAnyServer;

impl rustls::client::danger::ServerCertVerifier for DangerAcceptAnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &pki::provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &pki::provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        pki::provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed;

    impl StatusSource for Fixed {
        fn status(&self) -> Status {
            Status {
                node: NodeStatus {
                    role: "supernode".into(),
                    node_id: "00ff".into(),
                    labels: Labels::default(),
                    uptime_secs: 1,
                },
                tasks: vec![TaskStatus {
                    id: "1234567890abcdef1234567890abcdef".into(),
                    url: "https://registry.example/v2/team/secret/blobs/sha256:".into(),
                    length: Some(10),
                    piece_count: Some(1),
                    pieces_done: 1,
                    state: "complete".into(),
                    sha256: Some("feedface".repeat(8)),
                }],
            }
        }
    }

    fn get(path: &str, member: bool) -> String {
        let req = Request::get(path).body(()).unwrap();
        let (status, body) = route(&req, &Fixed, member);
        assert_eq!(status, StatusCode::OK);
        String::from_utf8(body).unwrap()
    }

    type ClientStream = h3::client::RequestStream<h3_quinn::BidiStream<Bytes>, Bytes>;
    /// The connection's request side: a test keeps it while its stream lives.
    type Requests = h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>;

    /// A node's endpoint on loopback and a client connection to it with `identity`.
    async fn pair(identity: &NodeIdentity) -> (quinn::Endpoint, quinn::Endpoint, SocketAddr) {
        let server = transport::endpoint(identity, "127.0.0.1:0".parse().unwrap(), true).unwrap();
        let addr = server.local_addr().unwrap();
        let client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        (server, client, addr)
    }

    /// Opens an h3 request on a fresh admin connection and returns it unfinished, with the
    /// task that drives the connection.
    async fn open_request(
        client: &quinn::Endpoint,
        addr: SocketAddr,
        identity: &NodeIdentity,
    ) -> (ClientStream, Requests, tokio::task::JoinHandle<()>) {
        let tls = identity.client_config(&[d7q_wire::ADMIN_ALPN]).unwrap();
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
        let cfg = quinn::ClientConfig::new(Arc::new(crypto));
        let conn = transport::connect_with(client, addr, Some(cfg))
            .await
            .unwrap();
        let (mut driver, mut send) = h3::client::new(h3_quinn::Connection::new(conn))
            .await
            .unwrap();
        let drive = tokio::spawn(async move {
            let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
        });
        let req = Request::get("https://d7q/health").body(()).unwrap();
        let stream = send.send_request(req).await.unwrap();
        (stream, send, drive)
    }

    /// The admin server reads a request to its end after answering it, so a client that is
    /// slow to finish its request (a loaded machine between two calls) finishes it cleanly
    /// instead of being told its request was reset (what `d7q status` once failed with:
    /// "Remote reset: 0x0").
    #[tokio::test]
    async fn a_client_slow_to_end_its_request_is_not_reset() {
        let id = NodeIdentity::ephemeral().unwrap();
        let (server, client, addr) = pair(&id).await;
        let accept = tokio::spawn(async move {
            let conn = server.accept().await.unwrap().await.unwrap();
            serve(conn, Arc::new(Fixed)).await;
        });
        let (mut stream, _requests, drive) = open_request(&client, addr, &id).await;
        let resp = stream.recv_response().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let mut body = Vec::new();
        while let Some(mut chunk) = stream.recv_data().await.unwrap() {
            body.extend_from_slice(&chunk.copy_to_bytes(chunk.remaining()));
        }
        assert_eq!(body, b"{\"status\":\"ok\"}");
        // The whole answer is here; give a stop request all the time it needs to arrive.
        tokio::time::sleep(Duration::from_millis(300)).await;
        stream
            .finish()
            .await
            .expect("a request the server answered still ends cleanly");
        drive.abort();
        accept.abort();
    }

    /// A server that answers and stops reading before the request has ended (RFC 9114 §4.1
    /// allows it) still gets its answer read: the client's failed finish is not an error.
    #[tokio::test]
    async fn a_client_reads_an_answer_sent_before_its_request_ended() {
        let id = NodeIdentity::ephemeral().unwrap();
        let (server, client, addr) = pair(&id).await;
        let accept = tokio::spawn(async move {
            let conn = server.accept().await.unwrap().await.unwrap();
            let mut h3 = h3::server::Connection::<_, Bytes>::new(h3_quinn::Connection::new(conn))
                .await
                .unwrap();
            let mut streams = Vec::new();
            while let Ok(Some(resolver)) = h3.accept().await {
                let (_req, mut stream) = resolver.resolve_request().await.unwrap();
                let resp = Response::builder().status(200).body(()).unwrap();
                stream.send_response(resp).await.unwrap();
                stream
                    .send_data(Bytes::from_static(b"early"))
                    .await
                    .unwrap();
                stream.finish().await.unwrap();
                // Stop reading the request (what dropping it unread does), keep the rest.
                stream.stop_sending(h3::error::Code::H3_NO_ERROR);
                streams.push(stream);
            }
        });
        let (stream, _requests, drive) = open_request(&client, addr, &id).await;
        // Let the answer and the stop arrive before the client ends its request.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (status, body) = answer(stream).await.expect("the early answer is read");
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, b"early");
        drive.abort();
        accept.abort();
    }

    #[test]
    fn a_client_without_a_cluster_certificate_sees_no_task() {
        for path in ["/status", "/tasks"] {
            let body = get(path, false);
            for secret in [
                "registry.example",
                "team/secret",
                "feedface",
                "1234567890ab",
            ] {
                assert!(!body.contains(secret), "{path} shows {secret}: {body}");
            }
            let json: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(json[REDACTED_KEY], true, "{body}");
            assert_eq!(json["tasks_hidden"], 1, "{body}");
            assert_eq!(json["node"]["role"], "supernode", "{body}");
            // Still a status document to an older client.
            let st: Status = serde_json::from_str(&body).unwrap();
            assert!(st.tasks.is_empty());

            let full: Status = serde_json::from_str(&get(path, true)).unwrap();
            assert_eq!(full.tasks.len(), 1);
            assert!(full.tasks[0].url.contains("team/secret"));
        }
    }
}
