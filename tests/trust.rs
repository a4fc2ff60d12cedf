//! Mutual TLS on the mesh: a node holding a certificate from another CA can neither fetch from a
//! supernode nor serve one, and registers nothing; an unreachable supernode is a mesh failure.

mod common;

use std::sync::Arc;

use common::{assert_only, closed_udp_port, Env};
use d7q::pki::{NodeIdentity, MESH_SERVER_NAME};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};

/// Exit code of the command-line contract for mesh failures.
const MESH: i32 = 5;

/// A client whose certificate comes from a foreign CA is refused by the supernode, and the
/// origin is never asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_with_a_foreign_certificate_is_refused() {
    let env = Env::new();
    let origin = env.origin().await;
    origin.file("secret.bin", 1000);
    let cluster = env.cluster().await;
    let (_foreign, foreign_nodes) = env.ca("foreign", &["intruder"]).await;
    let sn = env
        .supernode(&cluster.supernode_pki, Some(&origin.ca_file))
        .await;
    let out = env.dir("out");
    env.get(&origin.url("secret.bin"), &out.join("secret.bin"))
        .via(&sn, &foreign_nodes[0])
        .run()
        .await
        .fails(MESH, "certificate");
    assert_only(&out, &[]);
    assert_eq!(
        origin.gets("secret.bin"),
        0,
        "an untrusted node registered a task"
    );

    // The supernode still serves its own cluster.
    env.get(&origin.url("secret.bin"), &out.join("secret.bin"))
        .via(&sn, &cluster.client_pki)
        .run()
        .await
        .ok();
}

/// A supernode whose certificate comes from a foreign CA is refused by the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_supernode_with_a_foreign_certificate_is_refused() {
    let env = Env::new();
    let origin = env.origin().await;
    origin.file("secret.bin", 1000);
    let cluster = env.cluster().await;
    let (_foreign, foreign_nodes) = env.ca("foreign", &["impostor"]).await;
    let impostor = env
        .supernode(&foreign_nodes[0], Some(&origin.ca_file))
        .await;
    let out = env.dir("out");
    env.get(&origin.url("secret.bin"), &out.join("secret.bin"))
        .via(&impostor, &cluster.client_pki)
        .run()
        .await
        .fails(MESH, "certificate");
    assert_only(&out, &[]);
    assert_eq!(
        origin.gets("secret.bin"),
        0,
        "the impostor fetched for a refused client"
    );
}

/// `d7q status --pki` refuses a node whose certificate comes from a foreign CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_with_pki_refuses_a_foreign_supernode() {
    let env = Env::new();
    let cluster = env.cluster().await;
    let (_foreign, foreign_nodes) = env.ca("foreign", &["impostor"]).await;
    let impostor = env.supernode(&foreign_nodes[0], None).await;
    let pki = cluster.client_pki.to_str().unwrap();
    env.run(&["status", "--json", "--pki", pki, &impostor.addr()])
        .await
        .fails(MESH, "certificate");
}

/// Nothing listens on the supernode's port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_supernode_is_a_mesh_failure() {
    let env = Env::new();
    let origin = env.origin().await;
    origin.file("x.bin", 1000);
    let cluster = env.cluster().await;
    let out = env.dir("out");
    let addr = format!("127.0.0.1:{}", closed_udp_port());
    env.get(&origin.url("x.bin"), &out.join("x.bin"))
        .arg("--supernode")
        .arg(&addr)
        .pki(&cluster.client_pki)
        .run()
        .await
        .fails(MESH, "");
    assert_only(&out, &[]);
    assert_eq!(origin.gets("x.bin"), 0);
}

/// A node speaking another major version of the mesh protocol (ALPN `d7q/2`) is refused both
/// ways, even with a certificate from the right CA: the supernode refuses such a client, and
/// `d7q get` refuses such a supernode with exit 5.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_major_version_is_refused_both_ways() {
    let env = Env::new();
    let origin = env.origin().await;
    let sha = origin.file("v.bin", 1000);
    let (_ca, nodes) = env.ca("cluster", &["supernode", "client", "future"]).await;
    let sn = env.supernode(&nodes[0], Some(&origin.ca_file)).await;
    let future = NodeIdentity::load(&nodes[2]).expect("load identity");

    // A d7q/2 client against the real supernode.
    let tls = future.client_config(&[b"d7q/2"]).expect("client config");
    let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    client.set_default_client_config(quinn::ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(tls).unwrap(),
    )));
    let connecting = client.connect(sn.mesh, MESH_SERVER_NAME).unwrap();
    let refused = match tokio::time::timeout(common::TIMEOUT, connecting).await {
        Err(_) => panic!("the handshake with the supernode hung"),
        Ok(Err(e)) => e.to_string(),
        // Accepted at the TLS level: the supernode must then close it.
        Ok(Ok(conn)) => match tokio::time::timeout(common::TIMEOUT, conn.closed()).await {
            Ok(reason) => reason.to_string(),
            Err(_) => panic!("the supernode kept a d7q/2 connection open"),
        },
    };
    // TLS alert 120 (no_application_protocol), or an application close naming the version.
    assert!(
        refused.contains("120") || refused.contains("protocol") || refused.contains("version"),
        "the supernode refused a d7q/2 client for another reason: {refused}"
    );
    client.close(0u32.into(), b"");

    // A d7q/2 server against `d7q get`.
    let tls = future.server_config(&[b"d7q/2"]).expect("server config");
    let server = quinn::Endpoint::server(
        quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls).unwrap())),
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap();
    let fake = server.local_addr().unwrap().to_string();
    let acceptor = server.clone();
    tokio::spawn(async move {
        while let Some(incoming) = acceptor.accept().await {
            tokio::spawn(async move {
                if let Ok(conn) = incoming.await {
                    conn.closed().await;
                }
            });
        }
    });
    let out = env.dir("out");
    env.get(&origin.url("v.bin"), &out.join("v.bin"))
        .arg("--supernode")
        .arg(&fake)
        .pki(&nodes[1])
        .run()
        .await
        .fails(MESH, "version");
    assert_only(&out, &[]);
    server.close(0u32.into(), b"");
    assert_eq!(origin.gets("v.bin"), 0);

    // The real supernode still serves d7q/1 clients.
    env.get(&origin.url("v.bin"), &out.join("v.bin"))
        .via(&sn, &nodes[1])
        .run()
        .await
        .ok();
    assert_eq!(common::sha256_file(&out.join("v.bin")), sha);
}

/// A client that presents no certificate at all completes no mesh exchange: the supernode
/// closes the connection before any registration, and the origin is never asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_a_certificate_cannot_register() {
    use d7q_wire::{Capabilities, Control, Hello, Labels, NodeId, Register};

    let env = Env::new();
    let origin = env.origin().await;
    origin.file("secret.bin", 1000);
    let cluster = env.cluster().await;
    let sn = env
        .supernode(&cluster.supernode_pki, Some(&origin.ca_file))
        .await;
    let mut roots = rustls::RootCertStore::empty();
    for c in d7q::pki::load_certs_file(&cluster.client_pki.join("ca.pem")).unwrap() {
        roots.add(c).unwrap();
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(d7q::pki::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![d7q_wire::ALPN.to_vec()];
    let cfg = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).unwrap()));
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let url = origin.url("secret.bin");
    let attempt = async {
        let conn = ep
            .connect_with(cfg, sn.mesh, MESH_SERVER_NAME)
            .unwrap()
            .await?;
        let (mut send, recv) = conn.open_bi().await?;
        send.write_all(&[d7q_wire::stream_kind::CONTROL]).await.ok();
        let hello = Control::Hello(Hello {
            major: d7q_wire::MAJOR_VERSION,
            minor: 0,
            node_id: NodeId([9; 16]),
            labels: Labels::default(),
            upload_addr: None,
            capabilities: Capabilities(0),
        });
        let register = Control::Register(Register {
            task: d7q::task::task_id(&url, None, None),
            url: url.clone(),
            headers: vec![],
            digest: None,
            range: None,
        });
        let _ = d7q::proto::write_msg(&mut send, &hello).await;
        let _ = d7q::proto::write_msg(&mut send, &register).await;
        let answer = d7q::proto::FrameReader::new(recv).next::<Control>().await;
        Ok::<_, quinn::ConnectionError>((answer.ok().flatten(), conn.closed().await))
    };
    let err = match attempt.await {
        Ok((None, closed)) => d7q::transport::conn_error(sn.mesh, closed),
        Ok((Some(answer), _)) => panic!("a client without a certificate got an answer: {answer:?}"),
        Err(e) => d7q::transport::conn_error(sn.mesh, e),
    };
    assert!(
        matches!(err, d7q::transport::MeshError::CertificateRefused { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("no client certificate"), "{err}");
    assert_eq!(origin.gets("secret.bin"), 0, "a task was registered");
}
