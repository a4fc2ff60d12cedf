//! Several supernodes: each task has a home supernode by rendezvous hashing, and when it dies
//! mid-task the peers move to the next one and finish, keeping what they already verified.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::Env;
use d7q::devserver::Fault;

const LEN: u64 = 32 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_finish_through_the_next_supernode_when_the_home_one_dies() {
    let env = Env::new();
    let origin = env.origin().await;
    let expected = origin.file("f.bin", LEN);
    // Slow enough that the home supernode dies mid-transfer.
    origin.server.set_fault("/f.bin", Fault::Throttle(4 << 20));
    let (_ca, pkis) = env.ca("cluster", &["sn1", "sn2", "d1", "d2"]).await;
    let mut sn1 = env.supernode(&pkis[0], Some(&origin.ca_file)).await;
    let mut sn2 = env.supernode(&pkis[1], Some(&origin.ca_file)).await;
    let url = origin.url("f.bin");
    let task = d7q::task::task_id(&url, None, None);
    let order = d7q::engine::rendezvous(task, &[sn1.mesh, sn2.mesh]);
    let home_is_sn1 = order[0] == sn1.mesh;
    let daemons = [
        env.daemon(&pkis[2], &[&sn1, &sn2], &[]).await,
        env.daemon(&pkis[3], &[&sn2, &sn1], &[]).await,
    ];
    let out = env.dir("out");
    let gets = daemons.iter().enumerate().map(|(i, d)| {
        env.get(&url, &out.join(format!("copy{i}")))
            .arg("--daemon")
            .arg(d.socket_arg())
            .run()
    });
    let killer = async {
        // Once the daemons hold a few pieces, the home supernode dies.
        for _ in 0..600 {
            let mut got = 0.0;
            for d in &daemons {
                let m = d.metrics().await;
                got += m["d7q_download_bytes_total{source=\"supernode\"}"];
            }
            if got >= (4 << 20) as f64 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let home: &mut common::Supernode = if home_is_sn1 { &mut sn1 } else { &mut sn2 };
        home.kill().await;
        home.mesh
    };
    let (outputs, killed): (Vec<common::Output>, SocketAddr) =
        tokio::join!(futures_util::future::join_all(gets), killer);
    for o in &outputs {
        o.ok();
    }
    for i in 0..daemons.len() {
        assert_eq!(
            common::sha256_file(&out.join(format!("copy{i}"))),
            expected,
            "copy {i}"
        );
    }
    assert_eq!(killed, order[0]);
    // The next supernode had to go back to the origin for what the dead one never finished.
    assert_eq!(origin.gets("f.bin"), 2);
    // The peers kept what they had verified: together they received the file about twice,
    // not more (each piece once per daemon, plus endgame duplicates).
    let mut received = 0.0;
    for d in &daemons {
        let m = d.metrics().await;
        received += m["d7q_download_bytes_total{source=\"supernode\"}"]
            + m["d7q_download_bytes_total{source=\"peer\"}"];
    }
    assert!(
        received < 2.5 * LEN as f64,
        "the daemons started over: {received} bytes received for two copies of {LEN}"
    );
}
