//! The swarm, with real processes on loopback: one origin, one supernode, eight daemons that
//! each `d7q get` the same 256 MiB file at once through their local socket.

mod common;

use common::Env;

const LEN: u64 = 256 << 20;
const DAEMONS: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_daemons_share_one_origin_download_and_feed_each_other() {
    let env = Env::new();
    let origin = env.origin().await;
    let expected = origin.file("big.bin", LEN);
    let names: Vec<String> = (0..DAEMONS).map(|i| format!("d{i}")).collect();
    let mut nodes: Vec<&str> = vec!["sn"];
    nodes.extend(names.iter().map(|s| s.as_str()));
    let (_ca, pkis) = env.ca("cluster", &nodes).await;
    let sn = env.supernode(&pkis[0], Some(&origin.ca_file)).await;
    let mut daemons = Vec::new();
    for pki in &pkis[1..] {
        daemons.push(env.daemon(pki, &[&sn], &[]).await);
    }
    let out = env.dir("out");
    let url = origin.url("big.bin");
    let gets = daemons.iter().enumerate().map(|(i, d)| {
        env.get(&url, &out.join(format!("copy{i}")))
            .arg("--daemon")
            .arg(d.socket_arg())
            .run()
    });
    for o in futures_util::future::join_all(gets).await {
        o.ok();
    }
    for i in 0..DAEMONS {
        assert_eq!(
            common::sha256_file(&out.join(format!("copy{i}"))),
            expected,
            "copy {i}"
        );
    }
    assert_eq!(
        origin.gets("big.bin"),
        1,
        "the origin served the content more than once"
    );

    let (mut from_peers, mut from_supernode, mut uploaded) = (0.0, 0.0, 0.0);
    for d in &daemons {
        let m = d.metrics().await;
        from_peers += m["d7q_download_bytes_total{source=\"peer\"}"];
        from_supernode += m["d7q_download_bytes_total{source=\"supernode\"}"];
        uploaded += m["d7q_upload_bytes_total"];
    }
    let total = from_peers + from_supernode;
    // Why the supernode sent what it sent (its super-seeding answers), for a run that fails.
    let seed = common::scrape(sn.metrics.expect("supernode metrics")).await;
    let decisions: Vec<String> = seed
        .iter()
        .filter(|(k, _)| k.starts_with("d7q_seed_decisions_total"))
        .map(|(k, v)| format!("{}={v}", &k[k.find('"').map_or(0, |i| i + 1)..k.len() - 2]))
        .collect();
    assert!(
        total >= (DAEMONS as u64 * LEN) as f64,
        "received {total} bytes in all"
    );
    assert!(
        from_peers >= total / 2.0,
        "only {from_peers} of {total} bytes came from other daemons ({from_supernode} from the \
         supernode; its decisions: {})",
        decisions.join(" ")
    );
    // What the daemons received from each other, they uploaded to each other (uploads also
    // count endgame duplicates the receiver cancelled in flight).
    assert!(
        uploaded >= from_peers,
        "uploaded {uploaded} < received from peers {from_peers}"
    );
    eprintln!(
        "swarm: {:.1}% of {total} bytes from peers, {:.1}% from the supernode; seed decisions: {}",
        100.0 * from_peers / total,
        100.0 * from_supernode / total,
        decisions.join(" ")
    );
}
