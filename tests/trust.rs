//! Mutual TLS on the mesh: a node holding a certificate from another CA can neither fetch from a
//! supernode nor serve one, and registers nothing; an unreachable supernode is a mesh failure.

mod common;

use common::{assert_only, closed_udp_port, Env};

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
