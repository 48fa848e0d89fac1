//! Smoke run of the swarm on emulated hosts: a seed peer and three peers, each in its own
//! network namespace with its links shaped by tbf, on a bridge whose root side carries the
//! origin and the scheduler. Needs root (it creates namespaces, links and qdiscs) and cleans
//! up everything it made, also when an assertion fails.

use d7y_testkit::netns::{HostSwarm, Hosts, SUBNET_GW};
use d7y_testkit::{Origin, OriginOptions};
use std::process::Command;

const MIB: usize = 1024 * 1024;

#[test]
fn three_peers_on_emulated_hosts_get_identical_files_from_one_origin_copy() {
    if !d7y_testkit::netns::is_root() {
        eprintln!("SKIPPED: network namespaces need root");
        return;
    }
    let in_use = Command::new("ip").args(["-o", "addr"]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&in_use.stdout).contains(&format!("{SUBNET_GW}/24")),
        "10.200.0.1/24 is already configured (a leftover of netns.sh?); remove it first"
    );
    let hosts = match Hosts::up(
        &format!("d7t{:04x}", std::process::id() & 0xffff),
        4,
        "200mbit",
    ) {
        Ok(h) => h,
        // A container without CAP_NET_ADMIN: report, do not pretend.
        Err(e) if e.to_string().contains("Operation not permitted") => {
            eprintln!("SKIPPED: cannot create network namespaces here: {e}");
            return;
        }
        Err(e) => panic!("create emulated hosts: {e}"),
    };
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::start(OriginOptions {
        ip: Some(SUBNET_GW.parse().unwrap()),
        ..Default::default()
    });
    let swarm = HostSwarm::start(&hosts, dir.path(), 3, "").unwrap();
    let (scheduler, peers) = (&swarm.scheduler, &swarm.peers);

    let size = 32 * MIB;
    let data = d7y_testkit::content(size, 3);
    let url = origin.put("smoke.bin", data.clone());
    let children: Vec<_> = peers
        .iter()
        .enumerate()
        .map(|(i, p)| {
            p.dfget(&url, &dir.path().join(format!("out{i}")))
                .spawn()
                .unwrap()
        })
        .collect();
    for (i, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "peer{i}: {}\nscheduler:\n{}\npeer log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            scheduler.log(),
            peers[i].log()
        );
        assert!(
            std::fs::read(dir.path().join(format!("out{i}"))).unwrap() == data,
            "peer{i} output differs"
        );
    }
    let served = origin.bytes_served();
    assert!(
        served as f64 <= 1.1 * size as f64,
        "origin served {served} bytes for a {size}-byte file"
    );
    drop(swarm);
    drop(hosts);
}
