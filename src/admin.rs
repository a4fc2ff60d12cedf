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
        let mut stream = send.send_request(req).await?;
        stream.finish().await?;
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
        drive.abort();
        if !resp.status().is_success() {
            anyhow::bail!("{addr} answered {} for {path}", resp.status());
        }
        Ok(body)
    };
    let out = tokio::time::timeout(STATUS_TIMEOUT, work)
        .await
        .map_err(|_| anyhow::anyhow!("{addr}: no answer from the admin API in time"))?;
    ep.close(transport::close::DONE, b"");
    out
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
