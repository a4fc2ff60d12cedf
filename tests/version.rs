//! A node that speaks another major version of the mesh protocol is refused, with a clear error
//! on both sides: the ALPN carries the major version (`d7q/1`), and the `Hello` repeats it.

mod common;

use std::net::SocketAddr;

use common::Env;
use d7q::pki::NodeIdentity;
use d7q::transport::{self, MeshError};
use d7q_wire::{Capabilities, Control, ErrorCode, Hello, Labels, NodeId};

fn client(pki: &std::path::Path) -> (NodeIdentity, quinn::Endpoint) {
    let id = NodeIdentity::load(pki).expect("client identity");
    let bind: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let ep = transport::endpoint(&id, bind, false).expect("client endpoint");
    (id, ep)
}

#[tokio::test]
async fn another_major_version_in_the_alpn_is_refused_on_both_sides() {
    let env = Env::new();
    let cluster = env.cluster().await;
    let sn = env.supernode(&cluster.supernode_pki, None).await;
    let (id, ep) = client(&cluster.client_pki);
    let v2 = transport::client_config(&id, b"d7q/2").unwrap();
    let err = transport::connect_with(&ep, sn.mesh, Some(v2))
        .await
        .expect_err("a d7q/2 client must be refused");
    assert!(matches!(err, MeshError::VersionMismatch { .. }), "{err:?}");
    assert!(
        err.to_string().contains("protocol version mismatch"),
        "{err}"
    );
    // The supernode logs the refusal as it happens; give its log a moment to show it.
    let mut log = String::new();
    for _ in 0..100 {
        log = sn.log();
        if log.contains("handshake refused") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        log.contains("handshake refused") && log.contains("protocol version mismatch"),
        "supernode log says nothing of the mismatch:\n{log}"
    );
}

#[tokio::test]
async fn another_major_version_in_the_hello_is_refused() {
    let env = Env::new();
    let cluster = env.cluster().await;
    let sn = env.supernode(&cluster.supernode_pki, None).await;
    let (_id, ep) = client(&cluster.client_pki);
    let conn = transport::connect(&ep, sn.mesh)
        .await
        .expect("d7q/1 connects");
    let (mut send, recv) = d7q::proto::open_control(&conn).await.unwrap();
    let hello = Control::Hello(Hello {
        major: 2,
        minor: 0,
        node_id: NodeId([1; 16]),
        labels: Labels::default(),
        upload_addr: None,
        capabilities: Capabilities(0),
    });
    d7q::proto::write_msg(&mut send, &hello).await.unwrap();
    match d7q::proto::FrameReader::new(recv).expect::<Control>().await {
        Ok(Control::Error(e)) => assert_eq!(e.code, ErrorCode::VersionMismatch, "{e:?}"),
        other => panic!("expected a VersionMismatch error, got {other:?}"),
    }
    // And the connection is closed with the version code.
    let reason = conn.closed().await;
    let err = transport::conn_error(sn.mesh, reason);
    assert!(matches!(err, MeshError::VersionMismatch { .. }), "{err:?}");
}
